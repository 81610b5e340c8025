package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestInspectReadOnly: a store file is read without ever being changed:
// byte for byte the same after OpenReadOnly and Verify; a file a running
// outpost holds gives ErrLocked at once, and a Snapshot of it reads as the
// store itself; a missing file, garbage and a sealed value without its key
// each give their own error.
func TestInspectReadOnly(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "cache.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	withProto := pod("a", "p1", "5")
	withProto.Proto = []byte("\x0a\x03msg")
	if err := replace(key("node", "a", "", ""), "10", withProto, pod("a", "p2", "6"))(s); err != nil {
		t.Fatal(err)
	}
	if err := replace(key("sa", "", "", ""), "11", pod("a", "p1", "5"), pod("b", "p3", "7"))(s); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	if _, err := OpenReadOnly(path, Options{}); !errors.Is(err, ErrLocked) || time.Since(start) > 2*time.Second {
		t.Fatalf("a file held by a running outpost: %v after %v; want ErrLocked at once", err, time.Since(start))
	}
	snap := filepath.Join(dir, "snapshot.db")
	var buf bytes.Buffer
	if _, err := s.Snapshot(&buf); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(snap, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	for _, p := range []string{path, snap} {
		before, _ := os.ReadFile(p)
		r, err := OpenReadOnly(p, Options{})
		if err != nil {
			t.Fatal(err)
		}
		objects, views, err := r.Stats()
		if err != nil || objects != 3 || views != 2 {
			t.Errorf("%s: %d objects, %d views, %v; want 3 and 2", p, objects, views, err)
		}
		if o, ok, err := r.Get(pods, "a", "p1"); err != nil || !ok || string(o.Proto) != "\x0a\x03msg" {
			t.Errorf("%s: p1 %+v %v %v", p, o, ok, err)
		}
		if problems, err := r.Verify(0, nil); err != nil || len(problems) != 0 {
			t.Errorf("%s: a sound store: %v %v", p, problems, err)
		}
		// The agreement check sees each protobuf encoding with its JSON,
		// and what it says is reported.
		var seen []string
		problems, err := r.Verify(0, func(data, proto []byte) error {
			seen = append(seen, string(proto))
			return errors.New("they disagree")
		})
		if err != nil || len(seen) != 1 || seen[0] != "\x0a\x03msg" || len(problems) != 1 || !strings.Contains(problems[0].What, "they disagree") {
			t.Errorf("%s: agreement check saw %q, reported %v (%v)", p, seen, problems, err)
		}
		if err := r.PutDoc("x", "text/plain", nil); err == nil {
			t.Errorf("%s: a write to a read-only store succeeded", p)
		}
		_ = r.Close()
		if after, _ := os.ReadFile(p); !bytes.Equal(before, after) {
			t.Errorf("%s changed by reading it", p)
		}
	}

	if _, err := OpenReadOnly(filepath.Join(dir, "none.db"), Options{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v; want fs.ErrNotExist", err)
	}
	garbage := filepath.Join(dir, "garbage.db")
	if err := os.WriteFile(garbage, bytes.Repeat([]byte("not a store "), 2000), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenReadOnly(garbage, Options{}); !errors.Is(err, ErrCorrupt) {
		t.Errorf("garbage: %v; want ErrCorrupt", err)
	}

	sealedPath := filepath.Join(dir, "sealed.db")
	k := testKey(t)
	sealed, err := openSealed(sealedPath, k, nil)
	if err != nil {
		t.Fatal(err)
	}
	fill(t, sealed)
	_ = sealed.Close()
	r, err := OpenReadOnly(sealedPath, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.Get(secrets, "ns", "a"); !errors.Is(err, ErrSealedNoKey) {
		t.Errorf("a sealed Secret without the key: %v; want ErrSealedNoKey", err)
	}
	if o, ok, err := r.Get(configmaps, "ns", "cm"); err != nil || !ok || !strings.Contains(string(o.Data), "CLEAR-configmap") {
		t.Errorf("a ConfigMap in clear, without the key: %v %v", ok, err)
	}
	_ = r.Close()
	r, err = OpenReadOnly(sealedPath, Options{Sealer: k})
	if err != nil {
		t.Fatal(err)
	}
	if o, ok, err := r.Get(secrets, "ns", "a"); err != nil || !ok || !strings.Contains(string(o.Data), "SEALED-listed-a") {
		t.Errorf("a sealed Secret with the key: %v %v", ok, err)
	}
	_ = r.Close()
}

// alteredFile writes objs as one view of a new store file, closes it,
// changes the file behind the store's back with alter, and opens it
// read-only.
func alteredFile(t *testing.T, alter func(*bolt.Tx) error, objs ...Object) *Store {
	t.Helper()
	path := filepath.Join(t.TempDir(), "cache.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := replace(key("node", "a", "", ""), "10", objs...)(s); err != nil {
		t.Fatal(err)
	}
	_ = s.Close()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(alter); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	r, err := OpenReadOnly(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

// TestVerifyFindsDamage: Verify names each kind of inconsistency a file
// altered behind the store's back can hold.
func TestVerifyFindsDamage(t *testing.T) {
	p1 := pod("a", "p1", "5")
	p1.Proto = []byte("\x0a\x01x")
	r := alteredFile(t, func(btx *bolt.Tx) error {
		// An object gone from under its view, a counter off, a protobuf
		// encoding of another resourceVersion.
		if err := btx.Bucket(bucketObjects).Delete(objectKey(nil, pods, memberKey("a", "p2"))); err != nil {
			return err
		}
		if err := btx.Bucket(bucketMeta).Put(metaViews, binary.BigEndian.AppendUint64(nil, 7)); err != nil {
			return err
		}
		return btx.Bucket(bucketProtos).Put(objectKey(nil, pods, memberKey("a", "p1")), append(appendString(nil, "4"), "\x0a\x01x"...))
	}, p1, pod("a", "p2", "6"))
	problems, err := r.Verify(0, nil)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range problems {
		got = append(got, p.Where+": "+p.What)
	}
	all := strings.Join(got, "\n")
	for _, want := range []string{"members: view", "which is not stored", "meta: the views counter says 7; 1 are stored",
		"meta: the objects counter says 2; 1 are stored", "protos: protobuf encoding of", "is at resourceVersion 4, the object at 5"} {
		if !strings.Contains(all, want) {
			t.Errorf("Verify did not report %q; it said:\n%s", want, all)
		}
	}
}

// TestInspectOlderFile: a file an older outpost wrote, without the protos
// bucket that Open adds, is read and verified as it is.
func TestInspectOlderFile(t *testing.T) {
	r := alteredFile(t, func(btx *bolt.Tx) error { return btx.DeleteBucket(bucketProtos) }, pod("a", "p1", "5"))
	if o, ok, err := r.Get(pods, "a", "p1"); err != nil || !ok || o.Proto != nil {
		t.Errorf("get from an older file: %+v %v %v", o, ok, err)
	}
	n := 0
	if err := r.Read(func(tx *Tx) error {
		return tx.ListData(key("node", "a", "", ""), "", 0, true, func(string, []byte, []byte) error { n++; return nil })
	}); err != nil || n != 1 {
		t.Errorf("listing an older file: %d members, %v", n, err)
	}
	if problems, err := r.Verify(0, nil); err != nil || len(problems) != 0 {
		t.Errorf("verify of an older file: %v %v", problems, err)
	}
}
