package store

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/outposthq/outpost/internal/seal"
)

const (
	secrets    = "/v1/secrets"
	configmaps = "/v1/configmaps"
	tokenDoc   = "sa-token\x00ns/sa\x00\x00aud"
)

// testRule seals what outpost seals, plus pods, which TestStore's cases
// use.
var testRule = SealRule{Resources: []string{secrets, pods, pods + "#meta"}, DocPrefixes: []string{"sa-token\x00", "table\x00"}}

func testKey(t testing.TB) *seal.Key {
	t.Helper()
	raw := make([]byte, seal.KeySize)
	if _, err := rand.Read(raw); err != nil {
		t.Fatal(err)
	}
	k, err := seal.NewKey(raw)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// openSealedTest opens the store at path sealed with key (nil: not
// sealed) and testRule.
func openSealedTest(t testing.TB, path string, key *seal.Key) *Store {
	t.Helper()
	s, err := openSealed(path, key, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func openSealed(path string, key *seal.Key, log *slog.Logger) (*Store, error) {
	opts := Options{NoSync: true, Logger: log}
	if key != nil {
		opts.Sealer, opts.Sealed = key, testRule
	}
	return Open(path, opts)
}

// secret is a Secret-like object whose data holds value.
func secret(ns, name, rv, value string) Object {
	return Object{Namespace: ns, Name: name, ResourceVersion: rv,
		Labels: map[string]string{"app": "web"},
		Fields: map[string]string{"metadata.name": name, "metadata.namespace": ns, "type": "Opaque"},
		Data:   fmt.Appendf(nil, `{"kind":"Secret","metadata":{"name":%q,"namespace":%q},"data":{"password":%q}}`, name, ns, value)}
}

func configMap(ns, name, rv, value string) Object {
	o := secret(ns, name, rv, value)
	o.Data = fmt.Appendf(nil, `{"kind":"ConfigMap","data":{"v":%q}}`, value)
	return o
}

var (
	secretView = ViewKey{Identity: "node", Resource: secrets, Namespace: "ns"}
	cmView     = ViewKey{Identity: "node", Resource: configmaps, Namespace: "ns"}
)

// fill writes secrets, configmaps and documents, each holding a
// distinctive value; it returns the values that must be sealed and those
// that stay in clear.
func fill(t *testing.T, s *Store) (sealed, clear []string) {
	t.Helper()
	if err := s.ReplaceView(View{Key: secretView, ResourceVersion: "10"},
		[]Object{secret("ns", "a", "5", "SEALED-listed-a"), secret("ns", "b", "6", "SEALED-listed-b")}); err != nil {
		t.Fatal(err)
	}
	if err := s.Apply([]Event{
		ev(Added, secretView, secret("ns", "c", "11", "SEALED-watched-c")),
		ev(Modified, secretView, secret("ns", "b", "12", "SEALED-modified-b")),
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.ReplaceView(View{Key: ViewKey{Identity: "node", Resource: secrets, Namespace: "ns", Name: "d"}},
		[]Object{secret("ns", "d", "13", "SEALED-get-d")}); err != nil {
		t.Fatal(err)
	}
	if err := s.ReplaceView(View{Key: cmView, ResourceVersion: "10"}, []Object{configMap("ns", "cm", "7", "CLEAR-configmap")}); err != nil {
		t.Fatal(err)
	}
	if err := s.PutDoc(tokenDoc, "application/json", []byte(`{"status":{"token":"SEALED-token"}}`)); err != nil {
		t.Fatal(err)
	}
	if err := s.PutDoc("table\x00node\x00/api/v1/namespaces/ns/secrets", "application/json", []byte(`{"rows":"SEALED-table"}`)); err != nil {
		t.Fatal(err)
	}
	if err := s.PutDoc("doc\x00/version", "application/json", []byte(`{"gitVersion":"CLEAR-version"}`)); err != nil {
		t.Fatal(err)
	}
	return []string{"SEALED-listed-a", "SEALED-modified-b", "SEALED-watched-c", "SEALED-get-d", "SEALED-token", "SEALED-table"},
		[]string{"CLEAR-configmap", "CLEAR-version"}
}

// fileHolds reports which of values occur in the bytes of the file at
// path.
func fileHolds(t *testing.T, path string, values []string) []string {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, v := range values {
		if bytes.Contains(raw, []byte(v)) {
			found = append(found, v)
		}
	}
	return found
}

// listed returns what List, ListData and Get give for view k.
func listed(t *testing.T, s *Store, k ViewKey) string {
	t.Helper()
	var a, b []string
	if err := s.List(k, "", 0, func(o Object) error {
		a = append(a, o.Name+"@"+o.ResourceVersion+"="+string(o.Data))
		got, ok, err := s.Get(k.Resource, o.Namespace, o.Name)
		if err != nil || !ok || !bytes.Equal(got.Data, o.Data) || got.Labels["app"] != "web" || got.Fields["type"] != "Opaque" {
			t.Errorf("Get %s/%s = %q %v %v", o.Namespace, o.Name, got.Data, ok, err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	var nsName []string
	if err := s.ListData(k, "", 0, false, func(mk string, data, _ []byte) error {
		b = append(b, string(data))
		nsName = append(nsName, mk)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for i := range a {
		if i >= len(b) || !strings.HasSuffix(a[i], "="+b[i]) {
			t.Errorf("ListData differs from List: %q vs %q", b, a)
			break
		}
	}
	return strings.Join(a, "\n")
}

func TestSealedRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	key := testKey(t)
	s := openSealedTest(t, path, key)
	fill(t, s)
	want := strings.Join([]string{
		`a@5={"kind":"Secret","metadata":{"name":"a","namespace":"ns"},"data":{"password":"SEALED-listed-a"}}`,
		`b@12={"kind":"Secret","metadata":{"name":"b","namespace":"ns"},"data":{"password":"SEALED-modified-b"}}`,
		`c@11={"kind":"Secret","metadata":{"name":"c","namespace":"ns"},"data":{"password":"SEALED-watched-c"}}`,
		`d@13={"kind":"Secret","metadata":{"name":"d","namespace":"ns"},"data":{"password":"SEALED-get-d"}}`,
	}, "\n")
	check := func(s *Store) {
		t.Helper()
		if got := listed(t, s, secretView); got != want {
			t.Errorf("secrets:\n%s\nwant\n%s", got, want)
		}
		if got := listed(t, s, cmView); !strings.Contains(got, "CLEAR-configmap") {
			t.Errorf("configmaps: %s", got)
		}
		if ct, body, ok, err := s.Doc(tokenDoc); err != nil || !ok || ct != "application/json" || string(body) != `{"status":{"token":"SEALED-token"}}` {
			t.Errorf("Doc(token) = %q %q %v %v", ct, body, ok, err)
		}
		var docs []string
		if err := s.Docs("", func(key, ct string, body []byte) error {
			docs = append(docs, fmt.Sprintf("%q %s %s", key, ct, body))
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		wantDocs := []string{
			`"doc\x00/version" application/json {"gitVersion":"CLEAR-version"}`,
			`"sa-token\x00ns/sa\x00\x00aud" application/json {"status":{"token":"SEALED-token"}}`,
			`"table\x00node\x00/api/v1/namespaces/ns/secrets" application/json {"rows":"SEALED-table"}`,
		}
		if !slices.Equal(docs, wantDocs) {
			t.Errorf("Docs:\n%s\nwant\n%s", strings.Join(docs, "\n"), strings.Join(wantDocs, "\n"))
		}
		checkInvariants(t, s)
	}
	check(s)
	// Deleting and releasing work on sealed records as on any other.
	if err := s.Apply([]Event{ev(Deleted, secretView, secret("ns", "c", "14", ""))}); err != nil {
		t.Fatal(err)
	}
	if err := s.Apply([]Event{ev(Added, secretView, secret("ns", "c", "11", "SEALED-watched-c"))}); err != nil {
		t.Fatal(err)
	}
	// Reopened with the same key: everything is still there.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	check(openSealedTest(t, path, key))
}

// TestSealedNotOnDisk: no sealed value is anywhere in the file, while the
// values in clear are (so that the check can fail).
func TestSealedNotOnDisk(t *testing.T) {
	for _, sealedStore := range []bool{true, false} {
		t.Run(fmt.Sprint("sealed=", sealedStore), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "store.db")
			var key *seal.Key
			if sealedStore {
				key = testKey(t)
			}
			s := openSealedTest(t, path, key)
			sealed, clear := fill(t, s)
			// Rewrites too: a relist with new values, then an unchanged one.
			for range 2 {
				if err := s.ReplaceView(View{Key: secretView, ResourceVersion: "20"},
					[]Object{secret("ns", "a", "15", "SEALED-relisted-a"), secret("ns", "c", "11", "SEALED-watched-c")}); err != nil {
					t.Fatal(err)
				}
			}
			sealed = append(sealed, "SEALED-relisted-a")
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			found := fileHolds(t, path, append(sealed, clear...))
			if sealedStore && !slices.Equal(found, clear) {
				t.Errorf("the file holds %q; want only the values in clear %q", found, clear)
			}
			// What is stored now; older values may be overwritten already.
			current := []string{"SEALED-watched-c", "SEALED-get-d", "SEALED-token", "SEALED-table", "SEALED-relisted-a"}
			if found := fileHolds(t, path, current); !sealedStore && len(found) != len(current) {
				t.Errorf("an unsealed file holds only %q of %q", found, current)
			}
		})
	}
}

// TestSealedRelistWritesNothing: sealing takes a fresh nonce each time,
// yet an unchanged object is not rewritten by a relist.
func TestSealedRelistWritesNothing(t *testing.T) {
	s := openSealedTest(t, filepath.Join(t.TempDir(), "store.db"), testKey(t))
	objs := []Object{secret("ns", "a", "5", "x"), secret("ns", "b", "6", "y")}
	raw := func() []string {
		var recs []string
		if err := s.Read(func(tx *Tx) error {
			return tx.objects.ForEach(func(_, v []byte) error { recs = append(recs, string(v)); return nil })
		}); err != nil {
			t.Fatal(err)
		}
		return recs
	}
	if err := s.ReplaceView(View{Key: secretView}, objs); err != nil {
		t.Fatal(err)
	}
	before := raw()
	if err := s.ReplaceView(View{Key: secretView}, objs); err != nil {
		t.Fatal(err)
	}
	// Another view of the same secrets changes only reference counts.
	if err := s.ReplaceView(View{Key: ViewKey{Identity: "other", Resource: secrets}}, objs); err != nil {
		t.Fatal(err)
	}
	after := raw()
	for i := range before {
		if b, a := before[i], after[i]; !strings.HasSuffix(a, b[len(b)-seal.Overhead-10:]) {
			t.Errorf("record %d was resealed by an unchanged relist", i)
		}
	}
	objs[1] = secret("ns", "b", "7", "z")
	if err := s.ReplaceView(View{Key: secretView}, objs); err != nil {
		t.Fatal(err)
	}
	if changed := raw(); changed[0] != after[0] || changed[1] == after[1] {
		t.Error("a relist changing one secret did not rewrite exactly that one")
	}
	checkInvariants(t, s)
}

// TestSealedTampered: a sealed record that was altered, or moved to
// another key, is ErrCorrupt for every reader, never a panic or wrong data.
func TestSealedTampered(t *testing.T) {
	key := testKey(t)
	tests := []struct {
		name   string
		change func(tx *bolt.Tx) error
	}{{
		name: "object data flipped",
		change: func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketObjects)
			k := objectKey(nil, secrets, "ns/a")
			v := bytes.Clone(b.Get(k))
			v[len(v)-20] ^= 0x40
			return b.Put(k, v)
		},
	}, {
		name: "object records swapped",
		change: func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketObjects)
			ka, kb := objectKey(nil, secrets, "ns/a"), objectKey(nil, secrets, "ns/b")
			va, vb := bytes.Clone(b.Get(ka)), bytes.Clone(b.Get(kb))
			if err := b.Put(ka, vb); err != nil {
				return err
			}
			return b.Put(kb, va)
		},
	}, {
		name: "object data replaced by plaintext",
		change: func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketObjects)
			k := objectKey(nil, secrets, "ns/a")
			v := b.Get(k)
			data, _ := objectData(v)
			rec := append(bytes.Clone(v[:len(v)-len(data)]), `{"kind":"Secret","data":{"password":"forged"}}`...)
			return b.Put(k, rec)
		},
	}, {
		name: "object data truncated",
		change: func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketObjects)
			k := objectKey(nil, secrets, "ns/a")
			v := b.Get(k)
			data, _ := objectData(v)
			return b.Put(k, bytes.Clone(v[:len(v)-len(data)+5]))
		},
	}, {
		name: "document flipped",
		change: func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketDocs)
			v := bytes.Clone(b.Get([]byte(tokenDoc)))
			v[len(v)-1] ^= 1
			return b.Put([]byte(tokenDoc), v)
		},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "store.db")
			s := openSealedTest(t, path, key)
			fill(t, s)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			rawBolt(t, path, tt.change)
			s = openSealedTest(t, path, key)
			object := strings.HasPrefix(tt.name, "object")
			errs := map[string]error{}
			errs["List"] = s.List(secretView, "", 0, func(Object) error { return nil })
			errs["ListData"] = s.ListData(secretView, "", 0, true, func(string, []byte, []byte) error { return nil })
			_, _, errs["Get"] = s.Get(secrets, "ns", "a")
			_, _, _, errs["Doc"] = s.Doc(tokenDoc)
			errs["Docs"] = s.Docs("sa-token\x00", func(string, string, []byte) error { return nil })
			for name, err := range errs {
				if object == (name == "Doc" || name == "Docs") {
					if err != nil {
						t.Errorf("%s of an untouched record: %v", name, err)
					}
					continue
				}
				if !errors.Is(err, ErrCorrupt) {
					t.Errorf("%s = %v; want ErrCorrupt", name, err)
				}
			}
			// The untouched secrets and the rest of the cache still serve.
			if _, ok, err := s.Get(secrets, "ns", "c"); !ok || err != nil {
				t.Errorf("Get of an untouched secret: %v %v", ok, err)
			}
			if got := listed(t, s, cmView); !strings.Contains(got, "CLEAR-configmap") {
				t.Errorf("configmaps: %q", got)
			}
			// A new list over the damaged record repairs it.
			if object {
				if err := s.ReplaceView(View{Key: secretView}, []Object{secret("ns", "a", "30", "new-a"), secret("ns", "b", "31", "new-b")}); err != nil {
					t.Fatal(err)
				}
				if o, _, err := s.Get(secrets, "ns", "a"); err != nil || !strings.Contains(string(o.Data), "new-a") {
					t.Errorf("after relist: %q %v", o.Data, err)
				}
			}
		})
	}
}

// TestSealChangesAtOpen reopens a filled store with other encryption
// settings: what either setting seals is dropped, once, the rest is kept,
// and no dropped plaintext stays in the file.
func TestSealChangesAtOpen(t *testing.T) {
	a, b := testKey(t), testKey(t)
	otherRule := SealRule{Resources: []string{secrets, configmaps}, DocPrefixes: []string{"sa-token\x00"}}
	tests := []struct {
		name       string
		before     *seal.Key
		after      *seal.Key
		afterRule  *SealRule
		dropped    bool // the secrets and sealed documents are gone
		droppedCMs bool
	}{
		{name: "same key", before: a, after: a},
		{name: "still unsealed", before: nil, after: nil},
		{name: "turned on", before: nil, after: a, dropped: true},
		{name: "new key", before: a, after: b, dropped: true},
		{name: "turned off", before: a, after: nil, dropped: true},
		{name: "rule changed", before: a, after: a, afterRule: &otherRule, dropped: true, droppedCMs: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "store.db")
			s, err := openSealed(path, tt.before, nil)
			if err != nil {
				t.Fatal(err)
			}
			sealed, clear := fill(t, s)
			// Records deleted before the change: still in free pages of an
			// unsealed file.
			if err := s.Update(func(tx *Tx) error { return tx.PutDoc("sa-token\x00old", "", []byte("SEALED-deleted-token")) }); err != nil {
				t.Fatal(err)
			}
			if err := s.DeleteDoc("sa-token\x00old"); err != nil {
				t.Fatal(err)
			}
			sealed = append(sealed, "SEALED-deleted-token")
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}

			var logs bytes.Buffer
			opts := Options{NoSync: true, Logger: slog.New(slog.NewTextHandler(&logs, nil))}
			if tt.after != nil {
				opts.Sealer, opts.Sealed = tt.after, testRule
				if tt.afterRule != nil {
					opts.Sealed = *tt.afterRule
				}
			}
			s, err = Open(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			checkInvariants(t, s)

			var secretsLeft int
			if err := s.List(secretView, "", 0, func(Object) error { secretsLeft++; return nil }); err != nil {
				t.Errorf("List of secrets: %v", err)
			}
			vs, _ := s.Views("node", secrets)
			_, _, tokenKept, err := s.Doc(tokenDoc)
			if err != nil {
				t.Errorf("Doc: %v", err)
			}
			if tt.dropped {
				if secretsLeft != 0 || len(vs) != 0 || tokenKept {
					t.Errorf("kept %d secrets, %d views, token %v; want all dropped", secretsLeft, len(vs), tokenKept)
				}
				if n := strings.Count(logs.String(), "encryption settings changed"); n != 1 {
					t.Errorf("logged %d times:\n%s", n, logs.String())
				}
			} else {
				if secretsLeft != 4 || len(vs) != 2 || !tokenKept {
					t.Errorf("kept %d secrets, %d views, token %v; want all kept", secretsLeft, len(vs), tokenKept)
				}
				if logs.Len() != 0 {
					t.Errorf("logged:\n%s", logs.String())
				}
			}
			if got := listed(t, s, cmView); strings.Contains(got, "CLEAR-configmap") == tt.droppedCMs {
				t.Errorf("configmaps: %q", got)
			}
			if _, _, ok, _ := s.Doc("doc\x00/version"); !ok {
				t.Error("an unsealed document was dropped")
			}
			if tt.afterRule != nil {
				if _, _, ok, _ := s.Doc("table\x00node\x00/api/v1/namespaces/ns/secrets"); ok {
					t.Error("a document only the old rule sealed was kept")
				}
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			// Straight after Open, before any write could reuse a free page.
			if tt.after != nil {
				if found := fileHolds(t, path, sealed); len(found) != 0 {
					t.Errorf("the file holds %q", found)
				}
			} else if found := fileHolds(t, path, clear); len(found) != len(clear) {
				t.Errorf("the file holds only %q of the values in clear", found)
			}
			if _, err := os.Stat(path + scrubSuffix); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the scrub copy is left: %v", err)
			}

			// Everything still works, and the next Open has nothing to do.
			logs.Reset()
			s, err = Open(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			fill(t, s)
			checkInvariants(t, s)
			if logs.Len() != 0 {
				t.Errorf("second Open logged:\n%s", logs.String())
			}
		})
	}
}

// TestScrubAfterCrash: a crash between dropping records and rewriting the
// file leaves the mark, and the next Open rewrites it; a half-written copy
// is replaced.
func TestScrubAfterCrash(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	key := testKey(t)
	s := openSealedTest(t, path, key)
	fill(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// As if this had been stored in clear, deleted by the purge, and the
	// process then died.
	rawBolt(t, path, func(tx *bolt.Tx) error {
		docs := tx.Bucket(bucketDocs)
		for i := range 100 {
			if err := docs.Put(fmt.Appendf(nil, "x%d", i), []byte(strings.Repeat("SEALED-in-a-free-page ", 50))); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketMeta).Put(metaScrub, []byte{1})
	})
	rawBolt(t, path, func(tx *bolt.Tx) error {
		for i := range 100 {
			if err := tx.Bucket(bucketDocs).Delete(fmt.Appendf(nil, "x%d", i)); err != nil {
				return err
			}
		}
		return nil
	})
	if err := os.WriteFile(path+scrubSuffix, []byte("half a copy"), 0o600); err != nil {
		t.Fatal(err)
	}
	if found := fileHolds(t, path, []string{"SEALED-in-a-free-page"}); len(found) != 1 {
		t.Fatal("test setup: the deleted value is not in a free page")
	}
	s, err := openSealed(path, key, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if found := fileHolds(t, path, []string{"SEALED-in-a-free-page"}); len(found) != 0 {
		t.Error("the file still holds the deleted value")
	}
	s = openSealedTest(t, path, key)
	if _, err := os.Stat(path + scrubSuffix); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the scrub copy is left: %v", err)
	}
	if info, err := os.Stat(path); err != nil || info.Mode().Perm() != 0o600 {
		t.Errorf("rewritten file: %v %v", info.Mode(), err)
	}
	if got := listed(t, s, secretView); strings.Count(got, "SEALED-") != 4 {
		t.Errorf("secrets after the rewrite: %q", got)
	}
	if err := s.Read(func(tx *Tx) error {
		if tx.meta.Get(metaScrub) != nil {
			return errors.New("the mark is still set")
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	// View ids stay unique after the rewrite (the views bucket's sequence
	// is kept).
	if err := s.ReplaceView(View{Key: ViewKey{Identity: "new", Resource: secrets}}, []Object{secret("ns", "a", "5", "x")}); err != nil {
		t.Fatal(err)
	}
	checkInvariants(t, s)
}

// TestSealedUnusableFile: with a Sealer, an unusable file is deleted, not
// kept aside, since it may hold plaintext; a file whose format version
// does not match its encryption record is unusable.
func TestSealedUnusableFile(t *testing.T) {
	tests := []struct {
		name string
		make func(t *testing.T, path string)
	}{{
		name: "garbage",
		make: func(t *testing.T, path string) {
			if err := os.WriteFile(path, bytes.Repeat([]byte("SEALED-garbage "), 4096), 0o600); err != nil {
				t.Fatal(err)
			}
		},
	}, {
		name: "sealed format without a record",
		make: func(t *testing.T, path string) {
			filled(t, path, 10)
			rawBolt(t, path, func(tx *bolt.Tx) error {
				return tx.Bucket(bucketMeta).Put(metaFormat, []byte(formatSealed))
			})
		},
	}, {
		name: "plain format with a record",
		make: func(t *testing.T, path string) {
			filled(t, path, 10)
			rawBolt(t, path, func(tx *bolt.Tx) error {
				return tx.Bucket(bucketMeta).Put(metaSeal, appendSealState(nil, "fp", testRule))
			})
		},
	}, {
		name: "record garbled",
		make: func(t *testing.T, path string) {
			filled(t, path, 10)
			rawBolt(t, path, func(tx *bolt.Tx) error {
				meta := tx.Bucket(bucketMeta)
				if err := meta.Put(metaFormat, []byte(formatSealed)); err != nil {
					return err
				}
				return meta.Put(metaSeal, []byte{1, 200})
			})
		},
	}}
	for _, tt := range tests {
		for _, sealed := range []bool{true, false} {
			t.Run(fmt.Sprint(tt.name, "/sealed=", sealed), func(t *testing.T) {
				dir := t.TempDir()
				path := filepath.Join(dir, "store.db")
				tt.make(t, path)
				var key *seal.Key
				if sealed {
					key = testKey(t)
				}
				var logs bytes.Buffer
				s, err := openSealed(path, key, slog.New(slog.NewTextHandler(&logs, nil)))
				if err != nil {
					t.Fatal(err)
				}
				defer s.Close()
				if o, v, _ := s.Stats(); o != 0 || v != 0 {
					t.Errorf("new store holds %d objects, %d views", o, v)
				}
				asides, _ := filepath.Glob(filepath.Join(dir, "*.corrupt-*"))
				if sealed && (len(asides) != 0 || !strings.Contains(logs.String(), "removed it")) {
					t.Errorf("kept %v; log:\n%s", asides, logs.String())
				}
				if !sealed && len(asides) != 1 {
					t.Errorf("moved aside: %v; log:\n%s", asides, logs.String())
				}
			})
		}
	}
}

// TestSealedPlainResourcesAllocateNothingMore: a store that seals Secrets
// serves other resources exactly as one that seals nothing.
func TestSealedPlainResourcesAllocateNothingMore(t *testing.T) {
	allocs := func(s *Store) (list, data float64) {
		objs := benchObjects(100, 1)
		if err := s.ReplaceView(View{Key: cmView}, objs); err != nil {
			t.Fatal(err)
		}
		list = testing.AllocsPerRun(20, func() {
			if err := s.List(cmView, "", 0, func(Object) error { return nil }); err != nil {
				t.Fatal(err)
			}
		})
		data = testing.AllocsPerRun(20, func() {
			if err := s.ListData(cmView, "", 0, false, func(string, []byte, []byte) error { return nil }); err != nil {
				t.Fatal(err)
			}
		})
		return list, data
	}
	pl, pd := allocs(openSealedTest(t, filepath.Join(t.TempDir(), "plain.db"), nil))
	sl, sd := allocs(openSealedTest(t, filepath.Join(t.TempDir(), "sealed.db"), testKey(t)))
	// One allocation per call either way is bbolt's: it copies an inline
	// bucket's page when its place in the file is not aligned.
	if math.Abs(sl-pl) > 1 || math.Abs(sd-pd) > 1 {
		t.Errorf("allocations listing 100 configmaps: List %v, ListData %v with a Sealer; %v, %v without", sl, sd, pl, pd)
	}
}

// BenchmarkList1kSecrets lists a view of 1,000 Secret-sized objects, sealed
// and in clear, with List (decoding every object) and ListData (what
// serving an unfiltered list uses).
func BenchmarkList1kSecrets(b *testing.B) {
	const n = 1000
	objs := make([]Object, n)
	for i := range objs {
		objs[i] = secret("ns", fmt.Sprintf("secret-%04d", i), "1", strings.Repeat("c2VjcmV0", 200))
	}
	for _, sealed := range []bool{false, true} {
		opts := Options{NoSync: true}
		if sealed {
			opts.Sealer, opts.Sealed = testKey(b), testRule
		}
		s, err := Open(filepath.Join(b.TempDir(), "store.db"), opts)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = s.Close() })
		if err := s.ReplaceView(View{Key: secretView}, objs); err != nil {
			b.Fatal(err)
		}
		name := "plain"
		if sealed {
			name = "sealed"
		}
		b.Run("List/"+name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				got := 0
				if err := s.List(secretView, "", 0, func(Object) error { got++; return nil }); err != nil || got != n {
					b.Fatal(got, err)
				}
			}
			b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "objects/s")
		})
		b.Run("ListData/"+name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				got := 0
				if err := s.ListData(secretView, "", 0, true, func(string, []byte, []byte) error { got++; return nil }); err != nil || got != n {
					b.Fatal(got, err)
				}
			}
			b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "objects/s")
		})
		rv := 2 // across runs of the function below: an older rv would write nothing
		b.Run("ReplaceView/changed/"+name, func(b *testing.B) {
			// A relist in which every secret changed.
			for b.Loop() {
				b.StopTimer()
				for i := range objs {
					objs[i].ResourceVersion = fmt.Sprint(rv)
				}
				rv++
				b.StartTimer()
				if err := s.ReplaceView(View{Key: secretView}, objs); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "objects/s")
		})
		b.Run("ReplaceView/unchanged/"+name, func(b *testing.B) {
			// A relist after a reconnect: nothing changed, nothing written,
			// but sealed records are opened to compare them.
			for b.Loop() {
				if err := s.ReplaceView(View{Key: secretView}, objs); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "objects/s")
		})
	}
}

var _ Sealer = (*seal.Key)(nil)

// TestSealedRemovesOldAsides: copies of unusable files moved aside before
// encryption was on are removed when it is.
func TestSealedRemovesOldAsides(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "store.db")
	aside := path + ".corrupt-1700000000"
	other := filepath.Join(dir, "other.db.corrupt-1700000000")
	for _, p := range []string{aside, other} {
		if err := os.WriteFile(p, []byte("SEALED-in-an-old-copy"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s := openSealedTest(t, path, nil)
	s.Close()
	if _, err := os.Stat(aside); err != nil {
		t.Fatalf("without encryption the copy is kept: %v", err)
	}
	var logs bytes.Buffer
	s, err := openSealed(path, testKey(t), slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := os.Stat(aside); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the old copy is kept: %v", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("another store's copy was touched: %v", err)
	}
	if !strings.Contains(logs.String(), "removed store files kept aside") {
		t.Errorf("log:\n%s", logs.String())
	}
}

func FuzzDecodeSealState(f *testing.F) {
	f.Add(appendSealState(nil, "0123456789abcdef", testRule))
	f.Add(appendSealState(nil, "", SealRule{}))
	f.Add([]byte{1, 0, 255, 255, 255, 255, 15})
	f.Fuzz(func(t *testing.T, b []byte) {
		fp, rule, err := decodeSealState(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v is not ErrCorrupt", err)
			}
			return
		}
		// Not byte for byte: a uvarint may be written longer than needed.
		fp2, rule2, err := decodeSealState(appendSealState(nil, fp, rule))
		if err != nil || fp2 != fp || !slices.Equal(rule2.Resources, rule.Resources) || !slices.Equal(rule2.DocPrefixes, rule.DocPrefixes) {
			t.Fatalf("round trip of %q: %q %v, %v", b, fp2, rule2, err)
		}
	})
}
