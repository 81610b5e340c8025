package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
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
	for i := range 160 {
		k := ViewKey{Identity: "node", Resource: configmaps, Namespace: "ns", Name: all[i].Name}
		if err := s.ReplaceView(View{Key: k, ResourceVersion: "500", Kind: "ConfigMap", APIVersion: "v1"}, all[i:i+1]); err != nil {
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
	for _, k := range allHealViews() {
		got, err := healListed(s, k)
		if err != nil {
			t.Fatal(err)
		}
		lists[k.String()] = got
	}
	return lists, docs
}

// allHealViews is healViews and the GET view of each object.
func allHealViews() []ViewKey {
	views := slices.Clone(healViews)
	for i := range 160 {
		views = append(views, ViewKey{Identity: "node", Resource: configmaps, Namespace: "ns", Name: healObject(i).Name})
	}
	return views
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
			var rebuilt, movedAside, lostViews, unnamedLosses int
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
				unnamed := false
				if s.scan(t.Context(), false) != nil {
					r, old, err := s.rebuild()
					if err != nil {
						t.Fatalf("page %d: rebuild: %v", page, err)
					}
					if err := old.Close(); err != nil {
						t.Fatal(err)
					}
					rebuilt++
					for _, k := range r.loss.Views {
						lost[k.String()] = true
					}
					unnamed = r.loss.Unnamed
					if unnamed {
						unnamedLosses++
					}
					lostViews += len(r.loss.Views)
					asides, _ := filepath.Glob(path + ".corrupt-*")
					if want := !sealed; (len(asides) == 1) != want {
						t.Errorf("page %d: files kept aside: %v (sealed=%v)", page, asides, sealed)
					}
				}
				if _, views, _ := s.Stats(); views == 0 {
					movedAside++ // Open found the damage and started empty
				} else {
					if err := s.scan(t.Context(), true); err != nil {
						t.Errorf("page %d: the file does not read whole after healing: %v", page, err)
					}
					problems, err := s.Verify(0, nil)
					if err != nil || len(problems) > 0 {
						t.Errorf("page %d: Verify: %v %v", page, problems, err)
					}
					for _, k := range allHealViews() {
						got, err := healListed(s, k)
						switch {
						case err != nil:
							t.Errorf("page %d: %s: %v", page, k, err)
						case got == "" && !lost[k.String()] && !unnamed:
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
			t.Logf("%d pages: %d rebuilt (%d views lost in all, by name; %d times views lost unnamed), %d moved aside by Open",
				used/pageSize-2, rebuilt, lostViews, unnamedLosses, movedAside)
			if rebuilt == 0 || lostViews == 0 || unnamedLosses == 0 {
				t.Fatal("no damage of each kind was healed: the test proves less than it says")
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
	damagePages(t, s, []byte(`{"metadata":{"name":"obj-081"`), 0xa5)
	if _, err := healListed(s, healViews[0]); err == nil {
		t.Fatal("a view on the damaged page reads")
	}

	ctx, cancel := context.WithCancel(t.Context())
	lostCh := make(chan []ViewKey, 1)
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, func(l Loss) { lostCh <- l.Views }) }()
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
	if err := s.scan(t.Context(), true); err != nil {
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

// damagePages fills with fill every page past the meta pages of s's file
// whose bytes hold needle: the one in use among them, and free ones (old
// copies).
func damagePages(t *testing.T, s *Store, needle []byte, fill byte) {
	t.Helper()
	_, pageSize := boltUsed(t, s)
	data, err := os.ReadFile(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(s.Path(), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	for p := int64(2); (p+1)*pageSize <= int64(len(data)); p++ {
		if bytes.Contains(data[p*pageSize:(p+1)*pageSize], needle) {
			if _, err := f.WriteAt(bytes.Repeat([]byte{fill}, int(pageSize)), p*pageSize); err != nil {
				t.Fatal(err)
			}
			n++
		}
	}
	if n == 0 {
		t.Fatalf("no page of %s holds %q", s.Path(), needle)
	}
}

func slogTo(w io.Writer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }

// runHealing runs s.Run with a short rebuildGap until the test ends.
func runHealing(t *testing.T, s *Store, lost func(Loss)) {
	t.Helper()
	gap := rebuildGap
	rebuildGap = 10 * time.Millisecond
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, lost) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		rebuildGap = gap
	})
}

// TestHealUndecodableDoc: a document whose page reads but whose record
// does not decode fails its reads; the rebuild drops it, once, and the
// store reads whole after.
func TestHealUndecodableDoc(t *testing.T) {
	s, _, logs := openFilled(t)
	if err := s.db.Load().Update(func(btx *bolt.Tx) error {
		return btx.Bucket(bucketDocs).Put([]byte("doc/07"), []byte{0xff, 0xff, 0xff})
	}); err != nil {
		t.Fatal(err)
	}
	runHealing(t, s, nil)
	if _, _, _, err := s.Doc("doc/07"); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("reading the undecodable document: %v", err)
	}
	for end := time.Now().Add(5 * time.Second); !strings.Contains(logs.String(), "rebuilt it"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("no rebuild:\n%s", logs.String())
		}
	}
	if _, _, ok, err := s.Doc("doc/07"); ok || err != nil {
		t.Errorf("after the rebuild, the undecodable document: ok=%v %v", ok, err)
	}
	if _, body, ok, err := s.Doc("doc/08"); !ok || err != nil || len(body) != 200 {
		t.Errorf("after the rebuild, a sound document: ok=%v %v %q", ok, err, body)
	}
	if !strings.Contains(logs.String(), "docsLost=1") {
		t.Errorf("the rebuild did not count the document lost:\n%s", logs.String())
	}
	time.Sleep(200 * time.Millisecond)
	if n := strings.Count(logs.String(), "rebuilt it"); n != 1 {
		t.Errorf("%d rebuilds; want one", n)
	}
}

// TestPanicInCallerIsNoDamage: a panic of the caller's function inside a
// transaction is ErrCorrupt to the caller (the store cannot tell it from a
// damaged page), but a sound file is not rebuilt for it.
func TestPanicInCallerIsNoDamage(t *testing.T) {
	s, path, logs := openFilled(t)
	runHealing(t, s, nil)
	for range 5 {
		if err := s.Read(func(*Tx) error { panic("a bug") }); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("a panicking read: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	if strings.Contains(logs.String(), "rebuilt it") {
		t.Errorf("a sound file was rebuilt for a caller's panic:\n%s", logs.String())
	}
	if asides, _ := filepath.Glob(path + ".corrupt-*"); len(asides) != 0 {
		t.Errorf("files kept aside: %v", asides)
	}
}

// TestRebuildDoesNotHoldWriters: a reader of the old file still running
// when the rebuild is done does not hold writers, which go to the new
// file; closing the old file waits for it.
func TestRebuildDoesNotHoldWriters(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cache.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	healFill(t, s)
	reading, release := make(chan struct{}), make(chan struct{})
	readDone := make(chan error, 1)
	go func() {
		readDone <- s.Read(func(tx *Tx) error {
			close(reading)
			<-release
			_, err := healListed(s, healViews[2])
			return err
		})
	}()
	<-reading
	var releaseOnce sync.Once
	defer releaseOnce.Do(func() { close(release) })
	var once sync.Once
	rebuilt := make(chan struct{})
	damagePages(t, s, []byte(`{"metadata":{"name":"obj-081"`), 0)
	runHealing(t, s, func(Loss) { once.Do(func() { close(rebuilt) }) })
	select {
	case <-rebuilt:
	case <-time.After(10 * time.Second):
		t.Fatal("no rebuild")
	}
	wrote := make(chan error, 1)
	go func() { wrote <- s.PutDoc("after", "text/plain", []byte("x")) }()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a write waited for a reader of the replaced file")
	}
	releaseOnce.Do(func() { close(release) })
	if err := <-readDone; err != nil {
		t.Errorf("the reader of the replaced file: %v", err)
	}
}

// openFilled opens a store in a new directory, filled by healFill, logging
// to logs; it is closed when the test ends.
func openFilled(t *testing.T) (s *Store, path string, logs *lockedBuffer) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "cache.db")
	logs = &lockedBuffer{}
	s, err := Open(path, Options{NoSync: true, Logger: slogTo(logs)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	healFill(t, s)
	return s, path, logs
}
