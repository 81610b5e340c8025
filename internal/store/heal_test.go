package store

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/outposthq/outpost/internal/seal"
)

// healObject is a ConfigMap-like object of about 600 bytes.
func healObject(i int) Object {
	name := fmt.Sprintf("obj-%03d", i)
	parity := []string{"even", "odd"}[i%2]
	return Object{Namespace: "ns", Name: name, ResourceVersion: fmt.Sprint(100 + i),
		Labels: map[string]string{"parity": parity},
		Fields: map[string]string{"metadata.name": name, "metadata.namespace": "ns"},
		Data:   fmt.Appendf(nil, `{"metadata":{"name":%q,"namespace":"ns"},"data":{"v":%q}}`, name, strings.Repeat(parity, 70)),
		Proto:  fmt.Appendf(nil, "proto-%s", name)}
}

var healViews = []ViewKey{
	{Identity: "node", Resource: configmaps, Namespace: "ns"},
	{Identity: "node", Resource: configmaps, Namespace: "ns", LabelSelector: "parity=even"},
	{Identity: "node", Resource: configmaps, Namespace: "ns", Name: "obj-007"},
	{Identity: "other", Resource: configmaps},
	{Identity: "node", Resource: secrets, Namespace: "ns"},
}

// healFill writes the views of healViews and 40 documents into s, and
// returns what each view lists and each document holds.
func healFill(t *testing.T, s *Store) (lists, docs map[string]string) {
	t.Helper()
	var all, even []Object
	for i := range 160 {
		o := healObject(i)
		all = append(all, o)
		if i%2 == 0 {
			even = append(even, o)
		}
	}
	var secretObjs []Object
	for i := range 20 {
		secretObjs = append(secretObjs, secret("ns", fmt.Sprintf("s-%02d", i), "7", strings.Repeat("x", 300)))
	}
	for _, vo := range []struct {
		k    ViewKey
		objs []Object
	}{{healViews[0], all}, {healViews[1], even}, {healViews[2], all[7:8]}, {healViews[3], all}, {healViews[4], secretObjs}} {
		if err := s.ReplaceView(View{Key: vo.k, ResourceVersion: "500", Kind: "List", APIVersion: "v1"}, vo.objs); err != nil {
			t.Fatal(err)
		}
	}
	docs = map[string]string{}
	for i := range 40 {
		k, body := fmt.Sprintf("doc/%02d", i), strings.Repeat(fmt.Sprint(i%10), 200)
		if err := s.PutDoc(k, "text/plain", []byte(body)); err != nil {
			t.Fatal(err)
		}
		docs[k] = body
	}
	lists = map[string]string{}
	for _, k := range healViews {
		got, err := healListed(s, k)
		if err != nil {
			t.Fatal(err)
		}
		lists[k.String()] = got
	}
	return lists, docs
}

// healListed renders view k whole: its metadata, then every member.
func healListed(s *Store, k ViewKey) (string, error) {
	var b strings.Builder
	err := s.Read(func(tx *Tx) error {
		v, ok, err := tx.View(k)
		if err != nil || !ok {
			return err
		}
		fmt.Fprintf(&b, "%s rv=%s kind=%s stale=%v\n", v.Key, v.ResourceVersion, v.Kind, v.Stale)
		return tx.List(k, "", 0, func(o Object) error {
			fmt.Fprintf(&b, "%s/%s %s %v %v %s %s\n", o.Namespace, o.Name, o.ResourceVersion, o.Labels, o.Fields, o.Data, o.Proto)
			return nil
		})
	})
	return b.String(), err
}

// TestRebuildEveryPage damages, in turn, each page of a store file in use
// and checks that the store heals: after a rebuild of what still reads,
// the file reads whole, every view is either exactly as it was or gone and
// reported lost, and every document is as it was or gone.
func TestRebuildEveryPage(t *testing.T) {
	for _, sealed := range []bool{false, true} {
		t.Run(fmt.Sprintf("sealed=%v", sealed), func(t *testing.T) {
			var key *seal.Key
			opts := Options{NoSync: true}
			if sealed {
				key = testKey(t)
				opts.Sealer, opts.Sealed = key, SealRule{Resources: []string{secrets}}
			}
			dir := t.TempDir()
			orig := filepath.Join(dir, "orig.db")
			s, err := Open(orig, opts)
			if err != nil {
				t.Fatal(err)
			}
			lists, docs := healFill(t, s)
			used, pageSize := boltUsed(t, s)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			pristine, err := os.ReadFile(orig)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(1, 2))
			var rebuilt, movedAside, lostViews int
			for page := int64(2); page < used/pageSize; page++ {
				path := filepath.Join(dir, fmt.Sprintf("p%03d", page), "cache.db")
				damaged := bytes.Clone(pristine)
				for i := page * pageSize; i < (page+1)*pageSize; i++ {
					damaged[i] = byte(rng.Uint32())
				}
				if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, damaged, 0o600); err != nil {
					t.Fatal(err)
				}
				s, err := Open(path, opts)
				if err != nil {
					t.Fatalf("page %d: %v", page, err)
				}
				lost := map[string]bool{}
				if s.scan() != nil {
					r, err := s.rebuild()
					if err != nil {
						t.Fatalf("page %d: rebuild: %v", page, err)
					}
					rebuilt++
					for _, k := range r.lost {
						lost[k.String()] = true
					}
					lostViews += len(r.lost)
					asides, _ := filepath.Glob(path + ".corrupt-*")
					if want := !sealed; (len(asides) == 1) != want {
						t.Errorf("page %d: files kept aside: %v (sealed=%v)", page, asides, sealed)
					}
				}
				if _, views, _ := s.Stats(); views == 0 {
					movedAside++ // Open found the damage and started empty
				} else {
					if err := s.scan(); err != nil {
						t.Errorf("page %d: the file does not read whole after healing: %v", page, err)
					}
					problems, err := s.Verify(0, nil)
					if err != nil || len(problems) > 0 {
						t.Errorf("page %d: Verify: %v %v", page, problems, err)
					}
					for _, k := range healViews {
						got, err := healListed(s, k)
						switch {
						case err != nil:
							t.Errorf("page %d: %s: %v", page, k, err)
						case got == "" && !lost[k.String()]:
							t.Errorf("page %d: %s is gone but was not reported lost", page, k)
						case got != "" && got != lists[k.String()]:
							t.Errorf("page %d: %s changed:\n%s\nwant\n%s", page, k, got, lists[k.String()])
						}
					}
					for k, want := range docs {
						_, body, ok, err := s.Doc(k)
						if err != nil || (ok && string(body) != want) {
							t.Errorf("page %d: document %s: %q %v", page, k, body, err)
						}
					}
				}
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
			}
			t.Logf("%d pages: %d rebuilt (%d views lost in all), %d moved aside by Open", used/pageSize-2, rebuilt, lostViews, movedAside)
			if rebuilt == 0 || lostViews == 0 {
				t.Fatal("no damage was healed: the test proves nothing")
			}
		})
	}
}

// TestRunHealsDamageAtRuntime damages a page under a running store, in
// the middle of a view's objects: Run rebuilds the file, reports the view
// lost, keeps the damaged file aside, and the store goes on writing to the
// new file, which a later Open finds whole.
func TestRunHealsDamageAtRuntime(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cache.db")
	var logs lockedBuffer
	s, err := Open(path, Options{NoSync: true, Logger: slogTo(&logs)})
	if err != nil {
		t.Fatal(err)
	}
	lists, _ := healFill(t, s)
	_, pageSize := boltUsed(t, s)
	page := pageHolding(t, path, pageSize, []byte("obj-081"))
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xa5}, int(pageSize)), page*pageSize); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := healListed(s, healViews[0]); err == nil {
		t.Fatal("a view on the damaged page reads")
	}

	ctx, cancel := context.WithCancel(t.Context())
	lostCh := make(chan []ViewKey, 1)
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, func(l []ViewKey) { lostCh <- l }) }()
	var lost []ViewKey
	select {
	case lost = <-lostCh:
	case <-time.After(10 * time.Second):
		t.Fatalf("no rebuild; log:\n%s", logs.String())
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(fmt.Sprint(lost), healViews[0].String()) {
		t.Errorf("lost %v; want %s among them", lost, healViews[0])
	}
	if got, err := healListed(s, healViews[0]); err != nil || got != "" {
		t.Errorf("the lost view after the rebuild: %q, %v", got, err)
	}
	if got, err := healListed(s, healViews[2]); err != nil || got != lists[healViews[2].String()] {
		t.Errorf("a view off the damaged page after the rebuild: %q, %v", got, err)
	}
	if n := strings.Count(logs.String(), "rebuilt it from what still reads"); n != 1 {
		t.Errorf("logged the rebuild %d times:\n%s", n, logs.String())
	}
	asides, _ := filepath.Glob(path + ".corrupt-*")
	if len(asides) != 1 {
		t.Fatalf("files kept aside: %v", asides)
	}
	if held, _ := os.ReadFile(asides[0]); !bytes.Contains(held, bytes.Repeat([]byte{0xa5}, 64)) {
		t.Error("the file kept aside is not the damaged one")
	}

	// The fetch of the lost view lands in the new file.
	if err := s.ReplaceView(View{Key: healViews[0], ResourceVersion: "600"}, []Object{healObject(3)}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(path, Options{NoSync: true, Logger: slogTo(&logs)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.scan(); err != nil {
		t.Fatalf("the rebuilt file does not read whole: %v", err)
	}
	if got, _ := healListed(s, healViews[0]); !strings.Contains(got, "obj-003") || strings.Count(got, "\n") != 2 {
		t.Errorf("after reopening: %q", got)
	}
	if asides2, _ := filepath.Glob(path + ".corrupt-*"); len(asides2) != 1 {
		t.Errorf("Open moved the rebuilt file aside: %v", asides2)
	}
}

// boltUsed is the size of the pages in use of s's file, and its page
// size.
func boltUsed(t *testing.T, s *Store) (used, pageSize int64) {
	t.Helper()
	db := s.db.Load()
	if err := db.View(func(btx *bolt.Tx) error {
		used = btx.Size()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return used, int64(db.Info().PageSize)
}

// pageHolding is the first page past the meta pages of the file at path
// whose bytes hold needle.
func pageHolding(t *testing.T, path string, pageSize int64, needle []byte) int64 {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for p := int64(2); (p+1)*pageSize <= int64(len(data)); p++ {
		if bytes.Contains(data[p*pageSize:(p+1)*pageSize], needle) {
			return p
		}
	}
	t.Fatalf("no page of %s holds %q", path, needle)
	return 0
}

func slogTo(w io.Writer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }
