package reader

import (
	"encoding/json"
	"fmt"

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
}

// grantKey names the grant of identity for the scope asked (a view key
// whose identity and name are ignored).
func grantKey(identity string, asked store.ViewKey) string {
	asked.Identity, asked.Name = "", ""
	b, _ := json.Marshal(asked)
	return grantPrefix + identity + "\x00" + string(b)
}

// PutGrant records that identity may read asked from view source.
func PutGrant(st *store.Store, identity string, asked, source store.ViewKey) error {
	b, err := json.Marshal(grant{Source: source})
	if err != nil {
		return err
	}
	return st.PutDoc(grantKey(identity, asked), "application/json", b)
}

// DeleteGrant forgets a grant: the apiserver said no.
func DeleteGrant(st *store.Store, identity string, asked store.ViewKey) error {
	return st.DeleteDoc(grantKey(identity, asked))
}

// granted returns the view identity may read for want, if a grant says so.
func (rd *Reader) granted(identity string, want store.ViewKey) (store.View, bool, error) {
	_, body, ok, err := rd.Store.Doc(grantKey(identity, want))
	if err != nil || !ok {
		return store.View{}, false, err
	}
	var g grant
	if err := json.Unmarshal(body, &g); err != nil {
		return store.View{}, false, fmt.Errorf("grant of %s: %w", identity, err)
	}
	return rd.Store.View(g.Source)
}
