package store

import (
	"bytes"
	"errors"
	"maps"
	"testing"
	"time"
)

// FuzzDecodeObject feeds malformed records to every decoder that reads
// bytes from the file: none may panic, each fails with ErrCorrupt, and
// what decodes re-encodes to the same object.
func FuzzDecodeObject(f *testing.F) {
	o := pod("ns", "p", "42", "app", "web", "tier", "", "|", "spec.nodeName", "n1")
	rec, _ := appendObject(nil, 3, &o, nil)
	f.Add(rec)
	f.Add(rec[:len(rec)/2])
	f.Add(rec[:7])
	f.Add(appendView(nil, &viewRecord{id: 7, rv: "10", kind: "PodList", apiVersion: "v1", updated: time.Unix(1, 2), stale: true}))
	f.Add(encodeViewKey(key("node", "ns", "app=web", "spec.nodeName=n1")))
	f.Add([]byte{})
	f.Add([]byte{1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Add([]byte{1, 1, 0, 0xff, 0xff, 0xff, 0x7f})
	f.Fuzz(func(t *testing.T, b []byte) {
		corrupt := func(what string, err error) {
			if err != nil && !errors.Is(err, ErrCorrupt) {
				t.Errorf("%s: %v is not ErrCorrupt", what, err)
			}
		}
		var got Object
		refs, err := decodeObject(b, &got)
		corrupt("decodeObject", err)
		if err == nil {
			again, _ := appendObject(nil, refs, &got, nil)
			var back Object
			if _, err := decodeObject(again, &back); err != nil || back.ResourceVersion != got.ResourceVersion ||
				!maps.Equal(back.Labels, got.Labels) || !maps.Equal(back.Fields, got.Fields) || !bytes.Equal(back.Data, got.Data) {
				t.Errorf("round trip: %+v, %v; want %+v", back, err, got)
			}
		}
		_, _, err = objectHeader(b)
		corrupt("objectHeader", err)
		_, err = withRefs(b, 9)
		corrupt("withRefs", err)
		ls, fs, err := objectMaps(b)
		corrupt("objectMaps", err)
		if err == nil {
			ls.Has("app")
			fs.Get("spec.nodeName")
		}
		_, err = objectData(b)
		corrupt("objectData", err)
		_, err = decodeView(b)
		corrupt("decodeView", err)
		k, err := decodeViewKey(b)
		corrupt("decodeViewKey", err)
		if err == nil {
			if back, err := decodeViewKey(encodeViewKey(k)); err != nil || back != k {
				t.Errorf("view key round trip: %+v, %v; want %+v", back, err, k)
			}
		}
		encodedMap(b).Has("x")
	})
}

func TestRecordRoundTrip(t *testing.T) {
	tests := []Object{
		{},
		{ResourceVersion: "1", Data: []byte("{}")},
		pod("ns", "p", "123456789", "a", "b", "c", "", "|", "spec.nodeName", "n", "status.phase", "Running"),
	}
	for _, o := range tests {
		for _, refs := range []uint64{0, 1, 127, 128, 1 << 40} {
			rec, _ := appendObject(nil, refs, &o, nil)
			var got Object
			gotRefs, err := decodeObject(rec, &got)
			if err != nil || gotRefs != refs || got.ResourceVersion != o.ResourceVersion ||
				!maps.Equal(got.Labels, o.Labels) || !maps.Equal(got.Fields, o.Fields) || !bytes.Equal(got.Data, o.Data) {
				t.Errorf("refs %d: %+v %d %v, want %+v", refs, got, gotRefs, err, o)
			}
			moved, err := withRefs(rec, refs+1)
			if r, _, err2 := objectHeader(moved); err != nil || err2 != nil || r != refs+1 || !sameContent(rec, moved) {
				t.Errorf("withRefs(%d): %d %v %v", refs+1, r, err, err2)
			}
			ls, fs, err := objectMaps(rec)
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range o.Labels {
				if got, ok := ls.Lookup(k); !ok || got != v {
					t.Errorf("label %s = %q %v", k, got, ok)
				}
			}
			for k, v := range o.Fields {
				if !fs.Has(k) || fs.Get(k) != v {
					t.Errorf("field %s = %q", k, fs.Get(k))
				}
			}
			if ls.Has("missing") || fs.Get("missing") != "" {
				t.Error("missing key found")
			}
		}
	}
	v := viewRecord{id: 1 << 33, rv: "9", kind: "PodList", apiVersion: "v1", updated: time.Unix(1700000000, 5), stale: true}
	if got, err := decodeView(appendView(nil, &v)); err != nil || got != v {
		t.Errorf("view record: %+v %v", got, err)
	}
	k := ViewKey{Identity: "a\x00b", Resource: "apps/v1/deployments#meta", Namespace: "ns", Name: "n", LabelSelector: "x in (a,b)", FieldSelector: "f=1"}
	if got, err := decodeViewKey(encodeViewKey(k)); err != nil || got != k {
		t.Errorf("view key: %+v %v", got, err)
	}
}
