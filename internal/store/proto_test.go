package store

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// protoOf returns the protobuf encoding Get and ListData give for the pod
// ns/name of view k.
func protoOf(t *testing.T, s *Store, k ViewKey, ns, name string) (got, listed []byte) {
	t.Helper()
	o, ok, err := s.Get(k.Resource, ns, name)
	if err != nil || !ok {
		t.Fatalf("Get %s/%s: %v %v", ns, name, ok, err)
	}
	for _, protoFirst := range []bool{false, true} {
		found := false
		if err := s.ListData(k, "", 0, protoFirst, func(mk string, data, proto []byte) error {
			if mk != MemberKey(ns, name) {
				return nil
			}
			found = true
			switch {
			case data != nil && proto != nil:
				t.Errorf("ListData gave %s both JSON and protobuf", mk)
			case !protoFirst && !bytes.Equal(data, o.Data):
				t.Errorf("ListData's JSON of %s differs from Get's", mk)
			case protoFirst && proto == nil && !bytes.Equal(data, o.Data):
				t.Errorf("ListData's JSON of %s (no protobuf) differs from Get's", mk)
			case protoFirst:
				listed = bytes.Clone(proto)
			}
			return nil
		}); err != nil || !found {
			t.Fatalf("ListData: found %v, %v", found, err)
		}
	}
	if !bytes.Equal(o.Proto, listed) {
		t.Errorf("Get's protobuf %q, ListData's %q", o.Proto, listed)
	}
	var fromList []byte
	if err := s.List(k, "", 0, func(lo Object) error {
		if lo.Name == name && lo.Namespace == ns {
			fromList = lo.Proto
		}
		return nil
	}); err != nil || !bytes.Equal(fromList, o.Proto) {
		t.Errorf("List's protobuf %q, Get's %q (%v)", fromList, o.Proto, err)
	}
	return o.Proto, listed
}

// TestProto: an object's protobuf encoding is stored with it, kept when
// the same resourceVersion is written again without one (a JSON client
// reading what a protobuf client read), dropped with a newer
// resourceVersion, and never kept for a sealed resource.
func TestProto(t *testing.T) {
	s := openTest(t)
	node, admin := key("node", "ns", "", ""), key("admin", "ns", "", "")
	p := pod("ns", "p", "10", "app", "web")
	p.Proto = []byte("\x0a\x03pb1")
	if err := replace(node, "10", p)(s); err != nil {
		t.Fatal(err)
	}
	if got, _ := protoOf(t, s, node, "ns", "p"); string(got) != "\x0a\x03pb1" {
		t.Fatalf("stored protobuf %q", got)
	}

	// The same object from a JSON answer: the protobuf stays, nothing is
	// rewritten.
	asJSON := pod("ns", "p", "10", "app", "web")
	if err := replace(admin, "10", asJSON)(s); err != nil {
		t.Fatal(err)
	}
	if got, _ := protoOf(t, s, admin, "ns", "p"); string(got) != "\x0a\x03pb1" {
		t.Errorf("after a JSON answer at the same resourceVersion: protobuf %q", got)
	}

	// A newer version from a JSON watch: the old protobuf must go.
	newer := pod("ns", "p", "11", "app", "web")
	if err := apply(ev(Modified, node, newer))(s); err != nil {
		t.Fatal(err)
	}
	if got, _ := protoOf(t, s, node, "ns", "p"); got != nil {
		t.Errorf("after a newer object without protobuf: protobuf %q", got)
	}

	// And a newer one with it.
	newest := pod("ns", "p", "12", "app", "web")
	newest.Proto = []byte("\x0a\x03pb3")
	if err := apply(ev(Modified, node, newest))(s); err != nil {
		t.Fatal(err)
	}
	if got, _ := protoOf(t, s, admin, "ns", "p"); string(got) != "\x0a\x03pb3" {
		t.Errorf("after a newer object with protobuf: %q", got)
	}
	dump(t, s) // invariants
}

func TestProtoNotSealed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s := openSealedTest(t, path, testKey(t))
	sec := secret("ns", "s", "5", "hunter2")
	sec.Proto = []byte("\x0a\x07hunter2")
	if err := s.ReplaceView(View{Key: secretView, ResourceVersion: "5"}, []Object{sec}); err != nil {
		t.Fatal(err)
	}
	if got, listed := protoOf(t, s, secretView, "ns", "s"); got != nil || listed != nil {
		t.Errorf("a sealed resource kept its protobuf: %q %q", got, listed)
	}
	s.Close()
	if leaks := fileHolds(t, path, []string{"hunter2"}); len(leaks) > 0 {
		t.Errorf("in clear in the file: %v", leaks)
	}
}

// TestProtoBucketAdded: a store written before protobuf encodings were
// kept opens with its objects, and keeps them from then on.
func TestProtoBucketAdded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	k := key("node", "ns", "", "")
	if err := replace(k, "10", pod("ns", "old", "10"))(s); err != nil {
		t.Fatal(err)
	}
	s.Close()
	editFile(t, path, func(tx *bolt.Tx) error { return tx.DeleteBucket(bucketProtos) })

	s, err = Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, ok, err := s.Get(pods, "ns", "old"); !ok || err != nil {
		t.Fatalf("the object from before: %v %v", ok, err)
	}
	p := pod("ns", "new", "11")
	p.Proto = []byte("\x0a\x01x")
	if err := apply(ev(Added, k, p))(s); err != nil {
		t.Fatal(err)
	}
	if got, _ := protoOf(t, s, k, "ns", "new"); string(got) != "\x0a\x01x" {
		t.Errorf("protobuf after reopening: %q", got)
	}
}

// TestProtoPurgedWhenSealingStarts: turning encryption on drops the
// protobuf encodings kept for Secrets while they were in clear, and no
// copy stays in the file.
func TestProtoPurgedWhenSealingStarts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s := openSealedTest(t, path, nil)
	sec := secret("ns", "s", "5", "hunter2")
	sec.Proto = []byte("\x0a\x07hunter2")
	if err := s.ReplaceView(View{Key: secretView, ResourceVersion: "5"}, []Object{sec}); err != nil {
		t.Fatal(err)
	}
	if got, _ := protoOf(t, s, secretView, "ns", "s"); got == nil {
		t.Fatal("a Secret in clear kept no protobuf")
	}
	s.Close()
	s = openSealedTest(t, path, testKey(t))
	if err := s.Read(func(tx *Tx) error {
		return tx.protos.ForEach(func(k, _ []byte) error { return fmt.Errorf("protobuf of %q kept", k) })
	}); err != nil {
		t.Error(err)
	}
	s.Close()
	if leaks := fileHolds(t, path, []string{"hunter2"}); len(leaks) > 0 {
		t.Errorf("in clear in the file: %v", leaks)
	}
}

// TestProtoCorrupt: a protobuf record damaged on disk is an ErrCorrupt
// error when listed, never a panic or a wrong answer.
func TestProtoCorrupt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	k := key("node", "ns", "", "")
	var objs []Object
	for _, name := range []string{"a", "b", "c"} {
		p := pod("ns", name, "7")
		p.Proto = []byte("\x0a\x01" + name)
		objs = append(objs, p)
	}
	if err := replace(k, "7", objs...)(s); err != nil {
		t.Fatal(err)
	}
	s.Close()
	editFile(t, path, func(tx *bolt.Tx) error {
		// The middle record: Open checks the first and the last. Damage,
		// not a write by another program: the stamp says the store wrote
		// last (see TestProtoDroppedAfterOtherWriter).
		if err := tx.Bucket(bucketProtos).Put(objectKey(nil, pods, "ns/b"), []byte{0xff, 0xff, 0xff}); err != nil {
			return err
		}
		return stampProtos(tx)
	})
	s, err = Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	err = s.ListData(k, "", 0, true, func(string, []byte, []byte) error { return nil })
	if !errors.Is(err, ErrCorrupt) {
		t.Errorf("listing over a damaged protobuf record: %v, want ErrCorrupt", err)
	}
}

// editFile changes the closed store file at path behind the store's back.
func editFile(t *testing.T, path string, fn func(*bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(fn); err != nil {
		t.Fatal(err)
	}
}

// TestProtoDroppedAfterOtherWriter: when something else wrote the file
// last (an older outpost updates objects without their protobuf
// encodings), the encodings are dropped at Open rather than served behind
// their objects.
func TestProtoDroppedAfterOtherWriter(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	k := key("node", "ns", "", "")
	p := pod("ns", "p", "10")
	p.Proto = []byte("\x0a\x02v1")
	if err := replace(k, "10", p)(s); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// Reopened as it was left: kept.
	if s, err = Open(path, Options{NoSync: true}); err != nil {
		t.Fatal(err)
	}
	if got, _ := protoOf(t, s, k, "ns", "p"); string(got) != "\x0a\x02v1" {
		t.Fatalf("protobuf after a plain reopen: %q", got)
	}
	s.Close()
	// Another program writes: the object moves on, its encoding does not.
	editFile(t, path, func(tx *bolt.Tx) error {
		newer := pod("ns", "p", "11")
		rec, _ := appendObject(nil, 1, &newer, nil)
		return tx.Bucket(bucketObjects).Put(objectKey(nil, pods, "ns/p"), rec)
	})
	if s, err = Open(path, Options{NoSync: true}); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	o, ok, err := s.Get(pods, "ns", "p")
	if err != nil || !ok || o.ResourceVersion != "11" {
		t.Fatalf("the object: %+v %v %v", o, ok, err)
	}
	if err := s.ListData(k, "", 0, true, func(_ string, _, proto []byte) error {
		if proto != nil {
			return fmt.Errorf("stale protobuf %q served", proto)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
}
