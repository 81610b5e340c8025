package reader

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/outposthq/outpost/internal/store"
)

// A grant lets one identity's reads be answered offline from another
// identity's view. The node watch cache (package share) serves a caller
// online from a stream recorded once, as its owner's view, after the
// apiserver said the caller may read what it asked; the grant keeps that
// answer for when the apiserver cannot be asked. It names the view read
// and, by its key, the scope the caller was allowed, which is what the
// view is filtered to.
const grantPrefix = "grant\x00"

type grant struct {
	Source store.ViewKey `json:"source"`
	// RV is the version of the source up to which the caller was served:
	// objects changed after it are not answered from the grant. A grant
	// without one (written before pins were) answers nothing newer than 0.
	RV uint64 `json:"rv,omitempty"`
}

// grantKey names the grant of identity for the scope asked (a view key
// whose identity and name are ignored).
func grantKey(identity string, asked store.ViewKey) string {
	asked.Identity, asked.Name = "", ""
	b, _ := json.Marshal(asked)
	return grantPrefix + identity + "\x00" + string(b)
}

// PutGrant records that identity may read asked from view source, as
// served to it up to resourceVersion rv.
func PutGrant(st *store.Store, identity string, asked, source store.ViewKey, rv uint64) error {
	return st.Update(func(tx *store.Tx) error { return putGrant(tx, Grant{identity, asked, source, rv}) })
}

// Grant is one grant as PutGrants writes it: Identity may read Asked
// from view Source, as served to it up to resourceVersion RV.
type Grant struct {
	Identity      string
	Asked, Source store.ViewKey
	RV            uint64
}

// PutGrants writes grants in one transaction: one commit (and sync),
// however many. keep, if set, is asked inside the transaction whether
// grants[i] is still to be written; as writing transactions run one at a
// time, a caller that takes a grant back before it calls DeleteGrant
// (so that keep then says no) is sure no PutGrants writes it after.
func PutGrants(st *store.Store, grants []Grant, keep func(i int) bool) error {
	if len(grants) == 0 {
		return nil
	}
	return st.Update(func(tx *store.Tx) error {
		for i, g := range grants {
			if keep != nil && !keep(i) {
				continue
			}
			if err := putGrant(tx, g); err != nil {
				return err
			}
		}
		return nil
	})
}

func putGrant(tx *store.Tx, g Grant) error {
	b, err := json.Marshal(grant{Source: g.Source, RV: g.RV})
	if err != nil {
		return err
	}
	return tx.PutDoc(grantKey(g.Identity, g.Asked), "application/json", b)
}

// DeleteGrant forgets a grant: the apiserver said no. Looked up first, so
// that a caller denied again and again, which mostly has none, costs no
// write each time.
func DeleteGrant(st *store.Store, identity string, asked store.ViewKey) error {
	key := grantKey(identity, asked)
	if _, _, ok, err := st.Doc(key); err == nil && !ok {
		return nil
	}
	return st.DeleteDoc(key)
}

// Grants calls fn with each grant the store holds: whose it is and the
// scope it was allowed.
func Grants(st *store.Store, fn func(identity string, asked store.ViewKey) error) error {
	return st.Docs(grantPrefix, func(key, _ string, _ []byte) error {
		identity, scope, ok := strings.Cut(strings.TrimPrefix(key, grantPrefix), "\x00")
		if !ok {
			return nil
		}
		var asked store.ViewKey
		if err := json.Unmarshal([]byte(scope), &asked); err != nil {
			return nil // not one of ours: left alone
		}
		return fn(identity, asked)
	})
}

// granted returns the view identity may read for want, and the version
// up to which it may, if a grant says so.
func (rd *Reader) granted(identity string, want store.ViewKey) (store.View, uint64, bool, error) {
	_, body, ok, err := rd.Store.Doc(grantKey(identity, want))
	if err != nil || !ok {
		return store.View{}, 0, false, err
	}
	var g grant
	if err := json.Unmarshal(body, &g); err != nil {
		return store.View{}, 0, false, fmt.Errorf("grant of %s: %w", identity, err)
	}
	v, ok, err := rd.Store.View(g.Source)
	return v, g.RV, ok, err
}
