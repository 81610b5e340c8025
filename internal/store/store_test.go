package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const pods = "/v1/pods"

func openTest(t testing.TB) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "store.db"), Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// pod builds a test object; kv are label pairs, then "|" and field pairs.
func pod(ns, name, rv string, kv ...string) Object {
	o := Object{
		Namespace:       ns,
		Name:            name,
		ResourceVersion: rv,
		Fields:          map[string]string{"metadata.name": name, "metadata.namespace": ns},
		Data:            fmt.Appendf(nil, `{"metadata":{"namespace":%q,"name":%q,"resourceVersion":%q}}`, ns, name, rv),
	}
	m := &o.Labels
	for i := 0; i < len(kv); i++ {
		if kv[i] == "|" {
			m = &o.Fields
			continue
		}
		if *m == nil {
			*m = map[string]string{}
		}
		(*m)[kv[i]] = kv[i+1]
		i++
	}
	return o
}

func key(identity, ns, labels, fields string) ViewKey {
	return ViewKey{Identity: identity, Resource: pods, Namespace: ns, LabelSelector: labels, FieldSelector: fields}
}

func replace(k ViewKey, rv string, objs ...Object) func(*Store) error {
	return func(s *Store) error {
		return s.ReplaceView(View{Key: k, ResourceVersion: rv, Kind: "PodList", APIVersion: "v1"}, objs)
	}
}

func ev(t EventType, k ViewKey, o Object) Event { return Event{Type: t, View: k, Object: o} }

func apply(events ...Event) func(*Store) error {
	return func(s *Store) error { return s.Apply(events) }
}

// dump returns every view's members as "ns/name@rv" and every stored
// object as "ns/name@rv", after checking the store's invariants.
func dump(t *testing.T, s *Store) (views map[ViewKey][]string, objects []string) {
	t.Helper()
	checkInvariants(t, s)
	views = map[ViewKey][]string{}
	all, err := s.AllViews()
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range all {
		ms := []string{}
		err := s.List(v.Key, "", 0, func(o Object) error {
			ms = append(ms, MemberKey(o.Namespace, o.Name)+"@"+o.ResourceVersion)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		views[v.Key] = ms
	}
	err = s.Read(func(tx *Tx) error {
		return tx.objects.ForEach(func(k, v []byte) error {
			n, size := binary.Uvarint(k)
			_, rv, err := objectHeader(v)
			objects = append(objects, string(k[size+int(n):])+"@"+string(rv))
			return err
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return views, objects
}

// checkInvariants recounts what the store keeps counted: each object's
// refs is the number of views holding it, every member is stored, and the
// meta counters match.
func checkInvariants(t testing.TB, s *Store) {
	t.Helper()
	err := s.Read(func(tx *Tx) error {
		byID := map[uint64]ViewKey{}
		err := tx.views.ForEach(func(k, v []byte) error {
			key, err := decodeViewKey(k)
			if err != nil {
				return err
			}
			rec, err := decodeView(v)
			if err != nil {
				return err
			}
			if _, dup := byID[rec.id]; dup {
				return fmt.Errorf("view id %d twice", rec.id)
			}
			byID[rec.id] = key
			return nil
		})
		if err != nil {
			return err
		}
		want := map[string]uint64{}
		err = tx.members.ForEach(func(k, _ []byte) error {
			id := binary.BigEndian.Uint64(k)
			vk, ok := byID[id]
			if !ok {
				return fmt.Errorf("member %q of unknown view %d", k[8:], id)
			}
			want[string(objectKey(nil, vk.Resource, string(k[8:])))]++
			return nil
		})
		if err != nil {
			return err
		}
		n := 0
		err = tx.objects.ForEach(func(k, v []byte) error {
			n++
			refs, _, err := objectHeader(v)
			if err != nil {
				return err
			}
			if refs != want[string(k)] {
				return fmt.Errorf("object %q has refs %d, held by %d views", k, refs, want[string(k)])
			}
			delete(want, string(k))
			return nil
		})
		if err != nil {
			return err
		}
		if len(want) != 0 {
			return fmt.Errorf("members not stored: %v", slices.Collect(maps.Keys(want)))
		}
		if objects, views := tx.Stats(); objects != n || views != len(byID) {
			return fmt.Errorf("stats say %d objects, %d views; store holds %d, %d", objects, views, n, len(byID))
		}
		// Every protobuf encoding is its object's, at its resourceVersion.
		return tx.protos.ForEach(func(k, v []byte) error {
			rec := tx.objects.Get(k)
			if rec == nil {
				return fmt.Errorf("protobuf encoding of %q, which is not stored", k)
			}
			_, rv, err := objectHeader(rec)
			r := reader{b: v}
			if prv := r.bytes("protobuf record"); err != nil || r.err != nil || !bytes.Equal(prv, rv) {
				return fmt.Errorf("protobuf encoding of %q at resourceVersion %q, object at %q (%v %v)", k, prv, rv, err, r.err)
			}
			return nil
		})
	})
	if err != nil {
		t.Fatalf("store invariants: %v", err)
	}
}

func TestStore(t *testing.T) {
	all := key("node", "", "", "")
	other := key("admin", "", "", "")
	web := key("node", "", "app=web", "")
	db := key("node", "", "app=db", "")
	nsA := key("node", "a", "", "")
	n1 := key("node", "", "", "spec.nodeName=n1")
	n2 := key("node", "", "", "spec.nodeName=n2")
	byName := ViewKey{Identity: "node", Resource: pods, Namespace: "a", Name: "p1"}
	meta := ViewKey{Identity: "node", Resource: pods + "#meta"}
	broken := key("node", "", "app in (", "")

	tests := []struct {
		name    string
		steps   []func(*Store) error
		views   map[ViewKey][]string // members of each view
		objects []string             // every stored object
	}{{
		name: "replace sets membership exactly",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1"), pod("a", "p2", "2"), pod("b", "p3", "3")),
			replace(all, "20", pod("b", "p3", "3"), pod("a", "p4", "4"), pod("a", "p2", "5")),
		},
		views:   map[ViewKey][]string{all: {"a/p2@5", "a/p4@4", "b/p3@3"}},
		objects: []string{"a/p2@5", "a/p4@4", "b/p3@3"},
	}, {
		name: "replace to empty deletes every object",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1"), pod("a", "p2", "2")),
			replace(all, "11"),
		},
		views: map[ViewKey][]string{all: {}},
	}, {
		name: "objects shared between views are stored once and kept while held",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1"), pod("a", "p2", "2")),
			replace(other, "10", pod("a", "p1", "1"), pod("a", "p2", "2"), pod("a", "p3", "3")),
			replace(all, "11", pod("a", "p2", "2")),
			replace(other, "12", pod("a", "p3", "3")),
		},
		views:   map[ViewKey][]string{all: {"a/p2@2"}, other: {"a/p3@3"}},
		objects: []string{"a/p2@2", "a/p3@3"},
	}, {
		name: "objects another list brings in join views they match",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1")),
			replace(web, "10"),
			replace(other, "12", pod("a", "p1", "1"), pod("a", "p2", "2", "app", "web")),
		},
		views:   map[ViewKey][]string{all: {"a/p1@1", "a/p2@2"}, web: {"a/p2@2"}, other: {"a/p1@1", "a/p2@2"}},
		objects: []string{"a/p1@1", "a/p2@2"},
	}, {
		// A list read slowly (a lossy link) arrives after the watch of
		// another view delivered a deletion: the object it brings back
		// must not join the view that saw it go, which no event would
		// ever clear again (chaos soak, --watch-cache, packet loss).
		name: "an older list does not bring a deleted object back into a view past its deletion",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1", "app", "web"), pod("a", "p2", "2")),
			replace(web, "10", pod("a", "p1", "1", "app", "web")),
			apply(ev(Deleted, all, pod("a", "p1", "20", "app", "web"))),
			replace(web, "15", pod("a", "p1", "1", "app", "web")), // asked before the deletion
			replace(web, "25"), // web lists again; all does not
		},
		views:   map[ViewKey][]string{all: {"a/p2@2"}, web: {}},
		objects: []string{"a/p2@2"},
	}, {
		name: "a late event does not bring a deleted object back into a view past its deletion",
		steps: []func(*Store) error{
			replace(all, "10"),
			replace(web, "10"),
			apply(ev(Added, all, pod("a", "p1", "12", "app", "web")), ev(Deleted, all, pod("a", "p1", "20", "app", "web"))),
			// web's watch lags behind all's
			apply(ev(Added, web, pod("a", "p1", "12", "app", "web"))),
			apply(ev(Deleted, web, pod("a", "p1", "20", "app", "web"))),
		},
		views: map[ViewKey][]string{all: {}, web: {}},
	}, {
		name: "an older list still fills a stale view, and views behind it",
		steps: []func(*Store) error{
			replace(all, "10"),
			replace(nsA, "8"),
			func(s *Store) error { return s.MarkStale(all) },
			apply(ev(Bookmark, all, Object{ResourceVersion: "30"})),
			replace(web, "15", pod("a", "p1", "1", "app", "web")),
		},
		views:   map[ViewKey][]string{all: {"a/p1@1"}, nsA: {"a/p1@1"}, web: {"a/p1@1"}},
		objects: []string{"a/p1@1"},
	}, {
		name: "unsorted and duplicate list items: newer wins",
		steps: []func(*Store) error{
			replace(all, "10", pod("b", "p", "3"), pod("a", "p", "2"), pod("b", "p", "7"), pod("b", "p", "5")),
		},
		views:   map[ViewKey][]string{all: {"a/p@2", "b/p@7"}},
		objects: []string{"a/p@2", "b/p@7"},
	}, {
		name: "suffixed resources are apart",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1")),
			func(s *Store) error {
				return s.ReplaceView(View{Key: meta, ResourceVersion: "10"}, []Object{pod("a", "p1", "1")})
			},
			apply(ev(Deleted, all, pod("a", "p1", "2"))),
		},
		views:   map[ViewKey][]string{all: {}, meta: {"a/p1@1"}},
		objects: []string{"a/p1@1"},
	}, {
		name: "newer stored object survives an older list",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1"), pod("a", "p2", "2")),
			apply(ev(Modified, all, pod("a", "p1", "30"))),
			replace(other, "20", pod("a", "p1", "15"), pod("a", "p2", "16")),
		},
		views:   map[ViewKey][]string{all: {"a/p1@30", "a/p2@16"}, other: {"a/p1@30", "a/p2@16"}},
		objects: []string{"a/p1@30", "a/p2@16"},
	}, {
		name: "unparsable resourceVersion: incoming wins",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "9")),
			apply(ev(Modified, all, pod("a", "p1", "x1"))),
			apply(ev(Modified, all, pod("a", "p1", "5"))),
		},
		views:   map[ViewKey][]string{all: {"a/p1@5"}},
		objects: []string{"a/p1@5"},
	}, {
		name: "older watch event is ignored",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "9", "app", "web")),
			replace(web, "10", pod("a", "p1", "9", "app", "web")),
			apply(ev(Modified, all, pod("a", "p1", "8", "app", "db"))),
		},
		views:   map[ViewKey][]string{all: {"a/p1@9"}, web: {"a/p1@9"}},
		objects: []string{"a/p1@9"},
	}, {
		name: "watch batch moves objects between label-selected views",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1", "app", "web"), pod("a", "p2", "2", "app", "db")),
			replace(web, "10", pod("a", "p1", "1", "app", "web")),
			replace(db, "10", pod("a", "p2", "2", "app", "db")),
			apply(
				ev(Modified, all, pod("a", "p1", "11", "app", "db")),
				ev(Modified, all, pod("a", "p2", "12", "app", "web")),
				ev(Added, all, pod("a", "p3", "13", "app", "web")),
				ev(Added, all, pod("a", "p4", "14")),
			),
		},
		views: map[ViewKey][]string{
			all: {"a/p1@11", "a/p2@12", "a/p3@13", "a/p4@14"},
			web: {"a/p2@12", "a/p3@13"},
			db:  {"a/p1@11"},
		},
		objects: []string{"a/p1@11", "a/p2@12", "a/p3@13", "a/p4@14"},
	}, {
		name: "field selectors follow spec.nodeName",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1", "|", "spec.nodeName", "n1"), pod("a", "p2", "2", "|", "spec.nodeName", "")),
			replace(n1, "10", pod("a", "p1", "1", "|", "spec.nodeName", "n1")),
			replace(n2, "10"),
			apply(ev(Modified, all, pod("a", "p2", "12", "|", "spec.nodeName", "n2"))),
		},
		views:   map[ViewKey][]string{all: {"a/p1@1", "a/p2@12"}, n1: {"a/p1@1"}, n2: {"a/p2@12"}},
		objects: []string{"a/p1@1", "a/p2@12"},
	}, {
		name: "a relist of one view moves objects in the others",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1", "app", "web")),
			replace(web, "10", pod("a", "p1", "1", "app", "web")),
			replace(db, "10"),
			replace(all, "20", pod("a", "p1", "15", "app", "db")),
		},
		views:   map[ViewKey][]string{all: {"a/p1@15"}, web: {}, db: {"a/p1@15"}},
		objects: []string{"a/p1@15"},
	}, {
		name: "DELETED from an unfiltered watch removes everywhere",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1", "app", "web"), pod("a", "p2", "2")),
			replace(web, "10", pod("a", "p1", "1", "app", "web")),
			replace(other, "10", pod("a", "p1", "1", "app", "web")),
			replace(byName, "10", pod("a", "p1", "1", "app", "web")),
			apply(ev(Deleted, all, pod("a", "p1", "20", "app", "web"))),
		},
		views:   map[ViewKey][]string{all: {"a/p2@2"}, web: {}, other: {}, byName: {}},
		objects: []string{"a/p2@2"},
	}, {
		name: "DELETED from a selected watch leaves only that view",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1", "app", "web")),
			replace(web, "10", pod("a", "p1", "1", "app", "web")),
			apply(ev(Deleted, web, pod("a", "p1", "20", "app", "web"))),
		},
		views:   map[ViewKey][]string{all: {"a/p1@1"}, web: {}},
		objects: []string{"a/p1@1"},
	}, {
		name: "DELETED from a selected watch of an object no other view holds",
		steps: []func(*Store) error{
			replace(n1, "10", pod("a", "p1", "1", "|", "spec.nodeName", "n1")),
			apply(ev(Deleted, n1, pod("a", "p1", "20", "|", "spec.nodeName", "n1"))),
		},
		views: map[ViewKey][]string{n1: {}},
	}, {
		name: "DELETED older than the stored object is ignored",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1")),
			replace(other, "10", pod("a", "p1", "1")),
			apply(ev(Deleted, all, pod("a", "p1", "15")), ev(Added, all, pod("a", "p1", "17"))),
			apply(ev(Deleted, other, pod("a", "p1", "15"))),
		},
		views:   map[ViewKey][]string{all: {"a/p1@17"}, other: {"a/p1@17"}},
		objects: []string{"a/p1@17"},
	}, {
		name: "namespace-scoped views ignore other namespaces",
		steps: []func(*Store) error{
			replace(nsA, "10", pod("a", "p1", "1")),
			replace(all, "10", pod("a", "p1", "1")),
			apply(ev(Added, all, pod("b", "p1", "11")), ev(Added, all, pod("a", "p2", "12"))),
		},
		views:   map[ViewKey][]string{nsA: {"a/p1@1", "a/p2@12"}, all: {"a/p1@1", "a/p2@12", "b/p1@11"}},
		objects: []string{"a/p1@1", "a/p2@12", "b/p1@11"},
	}, {
		name: "Name views hold their one object",
		steps: []func(*Store) error{
			replace(byName, "10", pod("a", "p1", "1")),
			replace(all, "10", pod("a", "p1", "1")),
			apply(
				ev(Added, all, pod("a", "p2", "12")),
				ev(Added, all, pod("b", "p1", "13")),
				ev(Modified, all, pod("a", "p1", "14")),
			),
		},
		views:   map[ViewKey][]string{byName: {"a/p1@14"}, all: {"a/p1@14", "a/p2@12", "b/p1@13"}},
		objects: []string{"a/p1@14", "a/p2@12", "b/p1@13"},
	}, {
		name: "Name view re-acquires its object when re-created",
		steps: []func(*Store) error{
			replace(byName, "10", pod("a", "p1", "1")),
			replace(all, "10", pod("a", "p1", "1")),
			apply(ev(Deleted, all, pod("a", "p1", "20")), ev(Added, all, pod("a", "p1", "21"))),
		},
		views:   map[ViewKey][]string{byName: {"a/p1@21"}, all: {"a/p1@21"}},
		objects: []string{"a/p1@21"},
	}, {
		name: "a view with a selector that does not parse keeps its own members",
		steps: []func(*Store) error{
			replace(broken, "10", pod("a", "p1", "1")),
			replace(all, "10", pod("a", "p1", "1")),
			apply(ev(Added, all, pod("a", "p2", "12")), ev(Modified, all, pod("a", "p1", "13"))),
			apply(ev(Deleted, broken, pod("a", "p1", "14"))),
		},
		views:   map[ViewKey][]string{broken: {}, all: {"a/p1@13", "a/p2@12"}},
		objects: []string{"a/p1@13", "a/p2@12"},
	}, {
		name: "events of a view never listed create it",
		steps: []func(*Store) error{
			apply(ev(Added, web, pod("a", "p1", "5", "app", "web")), ev(Bookmark, web, Object{ResourceVersion: "9"})),
		},
		views:   map[ViewKey][]string{web: {"a/p1@5"}},
		objects: []string{"a/p1@5"},
	}, {
		name: "DeleteView releases its objects",
		steps: []func(*Store) error{
			replace(all, "10", pod("a", "p1", "1"), pod("a", "p2", "2")),
			replace(other, "10", pod("a", "p2", "2")),
			func(s *Store) error { return s.DeleteView(all) },
			func(s *Store) error { return s.DeleteView(all) },
		},
		views:   map[ViewKey][]string{other: {"a/p2@2"}},
		objects: []string{"a/p2@2"},
	}}
	// Every case runs again with pods sealed (see Options.Sealer): sealing
	// must change nothing that callers see.
	for _, sealed := range []bool{false, true} {
		for _, tt := range tests {
			name := tt.name
			if sealed {
				name = "sealed/" + name
			}
			t.Run(name, func(t *testing.T) {
				s := openTest(t)
				if sealed {
					s = openSealedTest(t, filepath.Join(t.TempDir(), "store.db"), testKey(t))
				}
				for i, step := range tt.steps {
					if err := step(s); err != nil {
						t.Fatalf("step %d: %v", i, err)
					}
				}
				views, objects := dump(t, s)
				if !maps.EqualFunc(views, tt.views, slices.Equal) {
					t.Errorf("views:\n got %v\nwant %v", views, tt.views)
				}
				if !slices.Equal(objects, tt.objects) {
					t.Errorf("objects:\n got %v\nwant %v", objects, tt.objects)
				}
			})
		}
	}
}

func TestViewMetadata(t *testing.T) {
	s := openTest(t)
	all := key("node", "", "", "")
	web := key("node", "", "app=web", "")
	svc := ViewKey{Identity: "node", Resource: "/v1/services"}
	updated := time.Unix(1700000000, 0)
	if err := s.ReplaceView(View{Key: all, ResourceVersion: "10", Kind: "PodList", APIVersion: "v1", Updated: updated}, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.ReplaceView(View{Key: svc, ResourceVersion: "3", Kind: "ServiceList", APIVersion: "v1"}, nil); err != nil {
		t.Fatal(err)
	}
	// The view's resourceVersion advances with its watch, never back.
	err := s.Apply([]Event{
		ev(Bookmark, all, Object{ResourceVersion: "15"}),
		ev(Added, all, pod("a", "p1", "12")),
		ev(Bookmark, web, Object{ResourceVersion: "16"}),
	})
	if err != nil {
		t.Fatal(err)
	}
	v, ok, err := s.View(all)
	if err != nil || !ok {
		t.Fatalf("View: %v %v", ok, err)
	}
	if v.ResourceVersion != "15" || v.Kind != "PodList" || v.APIVersion != "v1" || v.Stale || !v.Updated.After(updated) {
		t.Errorf("view after watch: %+v", v)
	}
	// A watch-only view exists, without a kind, and is stale.
	if v, ok, _ := s.View(web); !ok || v.ResourceVersion != "16" || v.Kind != "" || !v.Stale {
		t.Errorf("watch-created view: %v %+v", ok, v)
	}
	if err := s.MarkStale(all); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkStale(key("nobody", "", "", "")); err != nil {
		t.Errorf("MarkStale of a missing view: %v", err)
	}
	if v, _, _ := s.View(all); !v.Stale {
		t.Error("MarkStale did not mark")
	}
	if err := s.ReplaceView(View{Key: all, ResourceVersion: "20", Kind: "PodList", APIVersion: "v1"}, nil); err != nil {
		t.Fatal(err)
	}
	if v, _, _ := s.View(all); v.Stale || v.ResourceVersion != "20" {
		t.Errorf("ReplaceView did not clear stale: %+v", v)
	}
	if _, ok, err := s.View(key("nobody", "", "", "")); ok || err != nil {
		t.Errorf("missing view: %v %v", ok, err)
	}

	vs, err := s.Views("node", pods)
	if err != nil {
		t.Fatal(err)
	}
	var got []ViewKey
	for _, v := range vs {
		got = append(got, v.Key)
	}
	if len(got) != 2 || !slices.Contains(got, all) || !slices.Contains(got, web) {
		t.Errorf("Views(node, pods) = %v", got)
	}
	if vs, _ := s.Views("other", pods); len(vs) != 0 {
		t.Errorf("Views(other, pods) = %v", vs)
	}
	if vs, _ := s.AllViews(); len(vs) != 3 {
		t.Errorf("AllViews = %d views", len(vs))
	}
	checkInvariants(t, s)
}

func TestList(t *testing.T) {
	s := openTest(t)
	all := key("node", "", "", "")
	// "a" < "a-b" as namespaces, but the apiserver orders "a-b/x" before
	// "a/x" (its keys compare as strings); so does the store.
	objs := []Object{pod("a", "x", "1"), pod("a-b", "x", "2"), pod("a", "y", "3"), pod("b", "a", "4"), pod("a.c", "z", "5")}
	if err := s.ReplaceView(View{Key: all, ResourceVersion: "10"}, objs); err != nil {
		t.Fatal(err)
	}
	order := []string{"a-b/x", "a.c/z", "a/x", "a/y", "b/a"}
	tests := []struct {
		after string
		limit int
		want  []string
	}{
		{"", 0, order},
		{"", 2, order[:2]},
		{"a.c/z", 2, order[2:4]},
		{"a/y", 0, order[4:]},
		{"a/xx", 0, order[3:]}, // a member that is gone: continue after it
		{"b/a", 0, nil},
		{"z", 10, nil},
	}
	for _, tt := range tests {
		var got []string
		err := s.List(all, tt.after, tt.limit, func(o Object) error {
			got = append(got, MemberKey(o.Namespace, o.Name))
			if !bytes.Contains(o.Data, []byte(o.Name)) {
				t.Errorf("%s: data %s", MemberKey(o.Namespace, o.Name), o.Data)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("List(after %q, limit %d) = %v, want %v", tt.after, tt.limit, got, tt.want)
		}
	}
	// Paging through with every limit visits everything once.
	for limit := 1; limit <= len(order); limit++ {
		var got []string
		after := ""
		for {
			n := 0
			err := s.List(all, after, limit, func(o Object) error {
				after = MemberKey(o.Namespace, o.Name)
				got = append(got, after)
				n++
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if n < limit {
				break
			}
		}
		if !slices.Equal(got, order) {
			t.Errorf("paging by %d: %v", limit, got)
		}
	}
	stop := errors.New("stop")
	n := 0
	if err := s.List(all, "", 0, func(Object) error { n++; return stop }); err != stop || n != 1 {
		t.Errorf("List with fn failing: %v after %d", err, n)
	}
	if err := s.List(key("nobody", "", "", ""), "", 0, func(Object) error { return stop }); err != nil {
		t.Errorf("List of a missing view: %v", err)
	}

	// Cluster-scoped objects have bare names as member keys.
	nodes := ViewKey{Identity: "node", Resource: "/v1/nodes"}
	node := Object{Name: "edge-1", ResourceVersion: "3", Labels: map[string]string{"zone": "z1"}, Data: []byte(`{}`)}
	if err := s.ReplaceView(View{Key: nodes}, []Object{node}); err != nil {
		t.Fatal(err)
	}
	got, ok, err := s.Get("/v1/nodes", "", "edge-1")
	if err != nil || !ok || got.Name != "edge-1" || got.Namespace != "" || got.Labels["zone"] != "z1" || string(got.Data) != "{}" {
		t.Errorf("Get node: %+v %v %v", got, ok, err)
	}
	if err := s.List(nodes, "", 0, func(o Object) error {
		if o.Name != "edge-1" || o.Namespace != "" {
			t.Errorf("listed node %q/%q", o.Namespace, o.Name)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := s.Get(pods, "a", "nope"); ok || err != nil {
		t.Errorf("Get missing: %v %v", ok, err)
	}
}

func TestObjectRoundTrip(t *testing.T) {
	s := openTest(t)
	o := pod("ns", "p", "42", "app", "web", "tier", "", "|", "spec.nodeName", "n1", "status.phase", "Running")
	if err := s.ReplaceView(View{Key: key("node", "", "", "")}, []Object{o}); err != nil {
		t.Fatal(err)
	}
	got, ok, err := s.Get(pods, "ns", "p")
	if err != nil || !ok {
		t.Fatalf("Get: %v %v", ok, err)
	}
	if got.Namespace != o.Namespace || got.Name != o.Name || got.ResourceVersion != o.ResourceVersion ||
		!maps.Equal(got.Labels, o.Labels) || !maps.Equal(got.Fields, o.Fields) || !bytes.Equal(got.Data, o.Data) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, o)
	}
}

func TestDocs(t *testing.T) {
	s := openTest(t)
	if err := s.PutDoc("/version", "application/json", []byte(`{"major":"1"}`)); err != nil {
		t.Fatal(err)
	}
	if err := s.PutDoc("/openapi/v3", "application/json", []byte("a")); err != nil {
		t.Fatal(err)
	}
	if err := s.PutDoc("/openapi/v3", "application/com.github.proto-openapi.spec.v3@v1.0+protobuf", []byte("b")); err != nil {
		t.Fatal(err)
	}
	if err := s.PutDoc("/empty", "", nil); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		key, ct, body string
		ok            bool
	}{
		{"/version", "application/json", `{"major":"1"}`, true},
		{"/openapi/v3", "application/com.github.proto-openapi.spec.v3@v1.0+protobuf", "b", true},
		{"/empty", "", "", true},
		{"/api", "", "", false},
		{"", "", "", false},
	}
	for _, tt := range tests {
		ct, body, ok, err := s.Doc(tt.key)
		if err != nil || ok != tt.ok || ct != tt.ct || string(body) != tt.body {
			t.Errorf("Doc(%q) = %q %q %v %v", tt.key, ct, body, ok, err)
		}
	}
	if err := s.PutDoc("", "x", nil); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("PutDoc with no key: %v", err)
	}
}

func TestStats(t *testing.T) {
	s := openTest(t)
	all, other := key("node", "", "", ""), key("admin", "", "", "")
	steps := []struct {
		do             func(*Store) error
		objects, views int
	}{
		{func(*Store) error { return nil }, 0, 0},
		{replace(all, "1", pod("a", "p1", "1"), pod("a", "p2", "1")), 2, 1},
		{replace(other, "1", pod("a", "p2", "1"), pod("a", "p3", "1")), 3, 2},
		{apply(ev(Deleted, all, pod("a", "p2", "2"))), 2, 2},
		{apply(ev(Added, key("x", "", "", ""), pod("b", "p", "3"))), 3, 3},
		{func(s *Store) error { return s.DeleteView(other) }, 3, 2}, // p3 had joined all too
		{replace(all, "4"), 1, 2},
		{func(s *Store) error { return s.PutDoc("/version", "", nil) }, 1, 2},
	}
	for i, st := range steps {
		if err := st.do(s); err != nil {
			t.Fatal(err)
		}
		objects, views, err := s.Stats()
		if err != nil || objects != st.objects || views != st.views {
			t.Errorf("step %d: Stats = %d objects, %d views, %v; want %d, %d", i, objects, views, err, st.objects, st.views)
		}
	}
	checkInvariants(t, s)
}

func TestInvalid(t *testing.T) {
	s := openTest(t)
	all := key("node", "", "", "")
	tests := []struct {
		name string
		do   func() error
		want error
	}{
		{"empty resource", func() error { return s.ReplaceView(View{}, nil) }, ErrInvalidKey},
		{"empty name", func() error { return s.ReplaceView(View{Key: all}, []Object{pod("a", "", "1")}) }, ErrInvalidKey},
		{"slash in name", func() error { return s.ReplaceView(View{Key: all}, []Object{pod("a", "b/c", "1")}) }, ErrInvalidKey},
		{"slash in namespace", func() error { return s.Apply([]Event{ev(Added, all, pod("a/b", "c", "1"))}) }, ErrInvalidKey},
		{"event type", func() error { return s.Apply([]Event{ev("ERROR", all, pod("a", "b", "1"))}) }, ErrInvalidEvent},
		{"event without resource", func() error { return s.Apply([]Event{{Type: Bookmark}}) }, ErrInvalidKey},
	}
	for _, tt := range tests {
		if err := tt.do(); !errors.Is(err, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, err, tt.want)
		}
	}
	// A failing batch leaves nothing behind.
	err := s.Apply([]Event{ev(Added, all, pod("a", "p1", "1")), ev("ERROR", all, Object{})})
	if !errors.Is(err, ErrInvalidEvent) {
		t.Fatal(err)
	}
	if objects, views, _ := s.Stats(); objects != 0 || views != 0 {
		t.Errorf("after a failed batch: %d objects, %d views", objects, views)
	}
	if _, ok, _ := s.Get(pods, "a", "p1"); ok {
		t.Error("failed batch was kept")
	}
}

func TestUpdateRollsBack(t *testing.T) {
	s := openTest(t)
	all := key("node", "", "", "")
	boom := errors.New("boom")
	err := s.Update(func(tx *Tx) error {
		if err := tx.ReplaceView(View{Key: all}, []Object{pod("a", "p1", "1")}); err != nil {
			return err
		}
		if err := tx.PutDoc("/version", "", nil); err != nil {
			return err
		}
		return boom
	})
	if err != boom {
		t.Fatalf("Update: %v", err)
	}
	err = s.Update(func(tx *Tx) error { panic("oops") })
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "oops") {
		t.Fatalf("Update panicking: %v", err)
	}
	if o, v, _ := s.Stats(); o != 0 || v != 0 {
		t.Errorf("rolled back Update kept %d objects, %d views", o, v)
	}
	// One transaction sees its own writes, and a Read cannot write.
	err = s.Update(func(tx *Tx) error {
		if err := tx.ReplaceView(View{Key: all, ResourceVersion: "5"}, []Object{pod("a", "p1", "1")}); err != nil {
			return err
		}
		if v, ok, err := tx.View(all); err != nil || !ok || v.ResourceVersion != "5" {
			return fmt.Errorf("view in same tx: %+v %v %v", v, ok, err)
		}
		if o, v := tx.Stats(); o != 1 || v != 1 {
			return fmt.Errorf("stats in same tx: %d %d", o, v)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Read(func(tx *Tx) error { return tx.PutDoc("/x", "", nil) }); err == nil {
		t.Error("PutDoc in a Read succeeded")
	}
	checkInvariants(t, s)
}

func TestClosed(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "store.db"), Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Stats(); !errors.Is(err, ErrClosed) {
		t.Errorf("Stats after Close: %v", err)
	}
	if err := s.PutDoc("/x", "", nil); !errors.Is(err, ErrClosed) {
		t.Errorf("PutDoc after Close: %v", err)
	}
}

func TestPersists(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	all := key("node", "", "", "")
	if err := s.ReplaceView(View{Key: all, ResourceVersion: "7", Kind: "PodList"}, []Object{pod("a", "p1", "1")}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(path, Options{}); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if v, ok, err := s.View(all); err != nil || !ok || v.ResourceVersion != "7" || v.Kind != "PodList" {
		t.Errorf("view after reopen: %+v %v %v", v, ok, err)
	}
	if _, ok, _ := s.Get(pods, "a", "p1"); !ok {
		t.Error("object lost on reopen")
	}
	checkInvariants(t, s)
}

// TestSnapshots lists a view while another goroutine replaces it and sends
// it events: each List sees one whole generation.
func TestSnapshots(t *testing.T) {
	s := openTest(t)
	const n = 1000
	gen := func(g, rv int) []Object {
		objs := make([]Object, n)
		for i := range objs {
			objs[i] = crashObject(g, i, rv)
		}
		return objs
	}
	if err := s.ReplaceView(View{Key: crashMain, ResourceVersion: "1"}, gen(0, 1)); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		defer close(done)
		for rv := 2; rv < 22; rv++ {
			g := rv % 2
			if err := s.ReplaceView(View{Key: crashMain}, gen(g, rv)); err != nil {
				done <- err
				return
			}
			if err := s.Apply([]Event{ev(Modified, crashMain, crashObject(g, rv, rv))}); err != nil {
				done <- err
				return
			}
		}
	}()
	for lists := 0; ; lists++ {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d consistent lists", lists)
			return
		default:
		}
		count, gens := 0, map[string]bool{}
		err := s.List(crashMain, "", 0, func(o Object) error {
			count++
			gens[o.Labels["gen"]] = true
			return nil
		})
		if err != nil || count != n || len(gens) != 1 {
			t.Fatalf("List saw %d objects of generations %v: %v", count, gens, err)
		}
	}
}
