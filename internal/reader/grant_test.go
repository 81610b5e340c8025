package reader

import (
	"encoding/json"
	"errors"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// TestGrantAnswersUpToItsPin: a caller served online from another
// identity's stream is answered offline from that view only as far as it
// was last served (its pin): what changed after may have been written
// after it lost the right to read it (a pod deleted, its node no longer
// allowed its ConfigMaps), and it never saw it. The store keeps only the
// newest version of each object, so a view with any object changed after
// the pin cannot answer as of the pin: leaving the object out would answer
// a list that lacks an object that exists. Such a grant answers nothing;
// the caller's own older view does, when it has one.
func TestGrantAnswersUpToItsPin(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	seedListAs(t, c, "system:serviceaccount:default:wide", "ns", 5, nil) // at 100..104, view at 20000
	asked := store.ViewKey{Resource: "/v1/configmaps", Namespace: "ns"}
	source := store.ViewKey{Identity: "system:serviceaccount:default:wide", Resource: "/v1/configmaps", Namespace: "ns"}
	put := func(pin uint64) {
		t.Helper()
		if err := PutGrant(c.Reader.Store, reader.Key(), asked, source, pin); err != nil {
			t.Fatal(err)
		}
	}
	for _, pin := range []uint64{102, 0} {
		put(pin)
		if w := serve(t, c, "/api/v1/namespaces/ns/configmaps", "application/json"); w.Code != 503 {
			t.Errorf("pinned at %d, with objects changed after it: status %d, want 503: %s", pin, w.Code, w.Body)
		}
	}
	put(104)
	if got := listed(t, c); len(got) != 5 {
		t.Errorf("pinned at 104: answered %v, want all 5", got)
	}
	// Pinned before its view's version, the answer says it is at the pin:
	// a client resuming its watch online from there gets what came after.
	var l struct {
		Metadata metav1.ListMeta `json:"metadata"`
	}
	if err := json.Unmarshal(serve(t, c, "/api/v1/namespaces/ns/configmaps", "application/json").Body.Bytes(), &l); err != nil || l.Metadata.ResourceVersion != "104" {
		t.Errorf("pinned at 104: the list says it is at %q (%v)", l.Metadata.ResourceVersion, err)
	}
	// With a view of its own, the caller is answered the fresher of the two
	// as far as it was served: its own over a grant pinned before it, the
	// grant when pinned after it and whole there, else its own.
	own := store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "ns"}
	objs := []store.Object{}
	if err := c.Reader.Store.List(source, "", 2, func(o store.Object) error { objs = append(objs, o); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := c.Reader.Store.ReplaceView(store.View{Key: own, ResourceVersion: "101", Kind: "ConfigMapList", APIVersion: "v1"}, objs); err != nil {
		t.Fatal(err)
	}
	for pin, want := range map[uint64]int{100: 2, 30000: 5, 102: 2} {
		put(pin)
		if got := listed(t, c); len(got) != want {
			t.Errorf("own view at 101, grant pinned at %d: answered %v, want %d items", pin, got, want)
		}
	}
	if err := c.Reader.Store.DeleteView(own); err != nil {
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

// TestGrantChangedWhileRead: a grant found whole at its pin, whose object
// then changed through another view (objects are shared, so the granted
// view's own version does not move), is found again rather than answered
// without that object.
func TestGrantChangedWhileRead(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	seedListAs(t, c, "wide", "ns", 5, nil)  // objects at 100..104, view at 20000
	seedListAs(t, c, "other", "ns", 5, nil) // the same objects, another identity's view
	st := c.Reader.Store
	source := store.ViewKey{Identity: "wide", Resource: "/v1/configmaps", Namespace: "ns"}
	v, ok, err := st.View(source)
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	src := grantedSource(v, 104, store.ViewKey{Resource: "/v1/configmaps", Namespace: "ns"},
		&request.Info{Labels: labels.Everything(), Fields: fields.Everything()})
	if whole, err := c.Reader.wholeAtPin(src); err != nil || !whole {
		t.Fatalf("whole at its pin: %v, %v", whole, err)
	}
	if objs, _, err := c.Reader.listFiltered(src, "", 0); err != nil || len(objs) != 5 {
		t.Fatalf("before the change: %d objects, %v", len(objs), err)
	}
	var objs []store.Object
	_ = st.List(source, "", 0, func(o store.Object) error { objs = append(objs, o); return nil })
	o := objs[2]
	o.ResourceVersion = "30000"
	if err := st.Apply([]store.Event{{Type: store.Modified, View: store.ViewKey{Identity: "other", Resource: "/v1/configmaps", Namespace: "ns"}, Object: o}}); err != nil {
		t.Fatal(err)
	}
	if got, _, err := c.Reader.listFiltered(src, "", 0); !errors.Is(err, errViewMoved) {
		t.Errorf("after an object changed past the pin: %d objects, %v; want errViewMoved", len(got), err)
	}
}
