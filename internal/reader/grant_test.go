package reader

import (
	"encoding/json"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/internal/store"
)

// TestGrantAnswersUpToItsPin: a caller served online from another
// identity's stream is answered offline from that view, but only the
// objects at or before the version it was last served: what changed after
// it may have lost the right to read (a pod deleted, its node no longer
// allowed its ConfigMaps) and never saw.
func TestGrantAnswersUpToItsPin(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	seedListAs(t, c, "system:serviceaccount:default:wide", "ns", 5, nil) // at 100..104
	asked := store.ViewKey{Resource: "/v1/configmaps", Namespace: "ns"}
	source := store.ViewKey{Identity: "system:serviceaccount:default:wide", Resource: "/v1/configmaps", Namespace: "ns"}
	for _, tc := range []struct {
		pin  uint64
		want []string
	}{
		{102, []string{"cm-00000", "cm-00001", "cm-00002"}},
		{104, []string{"cm-00000", "cm-00001", "cm-00002", "cm-00003", "cm-00004"}},
		{0, nil},
	} {
		if err := PutGrant(c.Reader.Store, reader.Key(), asked, source, tc.pin); err != nil {
			t.Fatal(err)
		}
		got := listed(t, c)
		if len(got) != len(tc.want) || (len(got) > 0 && got[len(got)-1] != tc.want[len(tc.want)-1]) {
			t.Errorf("pinned at %d: answered %v, want %v", tc.pin, got, tc.want)
		}
	}
	// Pinned before its view's version, the answer says it is at the pin:
	// a client resuming its watch online from there gets what was left
	// out.
	if err := PutGrant(c.Reader.Store, reader.Key(), asked, source, 102); err != nil {
		t.Fatal(err)
	}
	var l struct {
		Metadata metav1.ListMeta `json:"metadata"`
	}
	if err := json.Unmarshal(serve(t, c, "/api/v1/namespaces/ns/configmaps", "application/json").Body.Bytes(), &l); err != nil || l.Metadata.ResourceVersion != "102" {
		t.Errorf("pinned at 102: the list says it is at %q (%v)", l.Metadata.ResourceVersion, err)
	}
	// With a view of its own (at 20000), the caller is answered the fresher
	// of the two as far as it was served: its own over a grant pinned
	// before it, the grant when pinned after.
	seedListAs(t, c, reader.Key(), "ns", 2, nil)
	for pin, want := range map[uint64]int{102: 2, 30000: 5} {
		if err := PutGrant(c.Reader.Store, reader.Key(), asked, source, pin); err != nil {
			t.Fatal(err)
		}
		if got := listed(t, c); len(got) != want {
			t.Errorf("own view at 20000, grant pinned at %d: answered %v, want %d items", pin, got, want)
		}
	}
	if err := c.Reader.Store.DeleteView(store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "ns"}); err != nil {
		t.Fatal(err)
	}
	// The stored grants can be listed, for a review after a reconnect.
	var all []string
	if err := Grants(c.Reader.Store, func(identity string, a store.ViewKey) error {
		all = append(all, identity+" "+a.String())
		return nil
	}); err != nil || len(all) != 1 || all[0] != reader.Key()+" "+asked.String() {
		t.Errorf("stored grants %v (%v), want the reader's of %v", all, err, asked)
	}
	// A denied caller's grant goes, and then nothing answers it.
	if err := DeleteGrant(c.Reader.Store, reader.Key(), asked); err != nil {
		t.Fatal(err)
	}
	if w := serve(t, c, "/api/v1/namespaces/ns/configmaps", "application/json"); w.Code == 200 {
		t.Errorf("after the grant was deleted: status %d", w.Code)
	}
	// Deleting one that is not there writes nothing and says nothing.
	if err := DeleteGrant(c.Reader.Store, reader.Key(), asked); err != nil {
		t.Fatal(err)
	}
}

// listed is the names an offline list of namespace ns answers the reader.
func listed(t *testing.T, c *Cache) []string {
	t.Helper()
	w := serve(t, c, "/api/v1/namespaces/ns/configmaps", "application/json")
	if w.Code != 200 {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	var l struct {
		Items []struct {
			Metadata metav1.ObjectMeta `json:"metadata"`
		} `json:"items"`
	}
	if err := json.Unmarshal(w.Body.Bytes(), &l); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, it := range l.Items {
		got = append(got, it.Metadata.Name)
	}
	return got
}

// TestPutGrants: moved pins are written together, and one keep refuses
// (taken back meanwhile) is left out.
func TestPutGrants(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	st := c.Reader.Store
	source := store.ViewKey{Identity: "wide", Resource: "/v1/configmaps"}
	var grants []Grant
	for _, id := range []string{"a", "b", "c"} {
		grants = append(grants, Grant{Identity: id, Asked: store.ViewKey{Resource: "/v1/configmaps", Namespace: "ns"}, Source: source, RV: 7})
	}
	if err := PutGrants(st, grants, func(i int) bool { return grants[i].Identity != "b" }); err != nil {
		t.Fatal(err)
	}
	var got []string
	if err := Grants(st, func(identity string, _ store.ViewKey) error {
		got = append(got, identity)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != "a" || got[1] != "c" {
		t.Errorf("stored grants of %v, want a and c", got)
	}
	if _, rv, ok, err := c.Reader.granted("c", grants[2].Asked); err != nil || rv != 7 {
		t.Errorf("c's grant: pin %d, found %v, %v; want 7", rv, ok, err)
	}
}
