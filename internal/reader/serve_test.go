package reader

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outposthq/outpost/internal/codec"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// seedList records a list of n ConfigMaps in namespace ns, as the reader
// read it online; item i keeps its protobuf encoding when proto(i) (as when
// recorded from a protobuf answer; nil: none does).
func seedList(t testing.TB, c *Cache, ns string, n int, proto func(int) bool) {
	t.Helper()
	seedListAs(t, c, reader.Key(), ns, n, proto)
}

// seedListAs is seedList as identity's view; item i is at resourceVersion
// 100+i.
func seedListAs(t testing.TB, c *Cache, identity, ns string, n int, proto func(int) bool) {
	t.Helper()
	objs := make([]store.Object, 0, n)
	for i := range n {
		item := corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cm-%05d", i), Namespace: ns, ResourceVersion: strconv.Itoa(100 + i),
			UID: types.UID(fmt.Sprintf("6b1e3ba4-6c07-4b59-a7a5-0c5a2d9e%04d", i)), Labels: map[string]string{"app": "bench"},
			CreationTimestamp: metav1.Unix(1700000000, 0),
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "bench.test", Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1",
				Time: &metav1.Time{Time: time.Unix(1700000000, 0)}, FieldsType: "FieldsV1",
				FieldsV1: metav1.NewFieldsV1(`{"f:data":{".":{},"f:payload":{}},"f:metadata":{"f:labels":{".":{},"f:app":{}}}}`)}}},
			Data: map[string]string{"payload": strings.Repeat("x", 256)}}
		o, err := codec.ObjectFromTyped(&item, "/v1/configmaps")
		if err != nil {
			t.Fatal(err)
		}
		if proto != nil && proto(i) {
			if o.Proto, err = item.Marshal(); err != nil {
				t.Fatal(err)
			}
		}
		objs = append(objs, o)
	}
	v := store.View{Key: store.ViewKey{Identity: identity, Resource: "/v1/configmaps", Namespace: ns},
		ResourceVersion: "20000", Kind: "ConfigMapList", APIVersion: "v1"}
	if err := c.Store.ReplaceView(v, objs); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkServeList measures an offline LIST of 10,000 objects in the
// encodings clients ask for.
func BenchmarkServeList(b *testing.B) {
	c, stop := newCache(b)
	defer stop()
	seedList(b, c, "json", 10000, nil)
	seedList(b, c, "protobuf", 10000, func(int) bool { return true })
	for _, bc := range []struct{ name, ns, accept string }{
		{"protobuf", "protobuf", "application/vnd.kubernetes.protobuf, */*"},
		{"protobuf-from-json", "json", "application/vnd.kubernetes.protobuf, */*"},
		{"json", "json", "application/json"},
	} {
		accept := bc.accept
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			r := httptest.NewRequest(http.MethodGet, "/api/v1/namespaces/"+bc.ns+"/configmaps", nil)
			r.Header.Set("Accept", accept)
			info, err := request.Parse(r, reader)
			if err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				w := &discardWriter{header: http.Header{}}
				c.Serve(w, r, info)
				if w.code != 200 {
					b.Fatalf("status %d", w.code)
				}
			}
		})
	}
}

// TestProtobufListAsBefore: a protobuf list is encoded item by item exactly
// as the whole JSON list decoded and encoded again would be, for every
// kind of list request, whether its items were stored with their protobuf
// encoding, without, or some with.
func TestProtobufListAsBefore(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	seedList(t, c, "json", 1000, nil)
	seedList(t, c, "protobuf", 1000, func(int) bool { return true })
	seedList(t, c, "mixed", 1000, func(i int) bool { return i%3 != 0 })
	var targets []string
	for _, ns := range []string{"json", "protobuf", "mixed"} {
		for _, q := range []string{"", "?limit=10", "?labelSelector=app%3Dbench&limit=300", "?fieldSelector=metadata.name%3Dcm-00042"} {
			targets = append(targets, "/api/v1/namespaces/"+ns+"/configmaps"+q)
		}
	}
	for _, target := range targets {
		for _, as := range []string{"", ";as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"} {
			pb := serve(t, c, target, codec.MediaProtobuf+as)
			js := serve(t, c, target, codec.MediaJSON+as)
			if pb.Code != 200 || js.Code != 200 || pb.Header().Get("Content-Type") != codec.MediaProtobuf {
				t.Fatalf("%s %s: %d %d %s", target, as, pb.Code, js.Code, pb.Header())
			}
			obj, err := codec.Decode(js.Body.Bytes(), nil)
			if err != nil {
				t.Fatal(err)
			}
			want, err := codec.EncodeProtobuf(obj)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(pb.Body.Bytes(), want) {
				t.Errorf("%s %s: protobuf list of %d bytes differs from the JSON list encoded (%d bytes)", target, as, pb.Body.Len(), len(want))
			}
		}
	}
}

// discardWriter is a ResponseWriter that keeps only the status, so that a
// benchmark measures the cache and not a recorder's growing buffer.
type discardWriter struct {
	header http.Header
	code   int
}

func (w *discardWriter) Header() http.Header { return w.header }

func (w *discardWriter) WriteHeader(code int) { w.code = code }

func (w *discardWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return len(b), nil
}

// TestProtobufFromStored: offline protobuf answers carry the protobuf
// encoding stored with an object as the apiserver sent it, not one derived
// from its JSON: a field outpost's types do not know survives.
func TestProtobufFromStored(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	seedList(t, c, "ns1", 3, func(int) bool { return true })
	unknownField := []byte{0xfa, 0x3f, 0x04, 'n', 'e', 'w', '!'} // field 1023, 4 bytes
	if err := c.Store.Update(func(tx *store.Tx) error {
		o, ok, err := tx.Get("/v1/configmaps", "ns1", "cm-00001")
		if err != nil || !ok {
			return fmt.Errorf("get: %v %v", ok, err)
		}
		o.Proto = append(o.Proto, unknownField...)
		return tx.Apply([]store.Event{{Type: store.Modified, View: store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "ns1"}, Object: o}})
	}); err != nil {
		t.Fatal(err)
	}
	for _, target := range []string{"/api/v1/namespaces/ns1/configmaps", "/api/v1/namespaces/ns1/configmaps/cm-00001"} {
		pb := serve(t, c, target, codec.MediaProtobuf)
		if pb.Code != 200 || pb.Header().Get("Content-Type") != codec.MediaProtobuf || !bytes.Contains(pb.Body.Bytes(), unknownField) {
			t.Errorf("%s: %d %s, stored protobuf not served: %q", target, pb.Code, pb.Header().Get("Content-Type"), pb.Body.Bytes())
		}
		obj, err := codec.Decode(pb.Body.Bytes(), nil)
		if err != nil {
			t.Fatalf("%s: %v", target, err)
		}
		switch o := obj.(type) {
		case *corev1.ConfigMapList:
			if len(o.Items) != 3 || o.Items[1].Name != "cm-00001" || o.ResourceVersion != "20000" {
				t.Errorf("%s: %d items, rv %q", target, len(o.Items), o.ResourceVersion)
			}
		case *corev1.ConfigMap:
			if o.Name != "cm-00001" || o.Data["payload"] == "" {
				t.Errorf("%s: %+v", target, o.ObjectMeta)
			}
		default:
			t.Errorf("%s: decoded %T", target, obj)
		}
		if js := serve(t, c, target, codec.MediaJSON); js.Code != 200 || bytes.Contains(js.Body.Bytes(), []byte("new!")) {
			t.Errorf("%s as JSON: %d %s", target, js.Code, js.Body.String())
		}
	}
	// And an offline watch's initial events.
	w := serve(t, c, "/api/v1/namespaces/ns1/configmaps?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1", codec.MediaProtobuf)
	if !bytes.Contains(w.Body.Bytes(), unknownField) {
		t.Errorf("offline protobuf watch: stored protobuf not served")
	}
	d, err := codec.NewWatchDecoder(w.Header().Get("Content-Type"), io.NopCloser(bytes.NewReader(w.Body.Bytes())), "/v1/configmaps")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for {
		ev, err := d.Next()
		if err != nil {
			break
		}
		if ev.Type == watch.Added {
			names = append(names, ev.Object.Name)
		}
	}
	if strings.Join(names, ",") != "cm-00000,cm-00001,cm-00002" {
		t.Errorf("offline protobuf watch: ADDED %v", names)
	}
}

func TestCheckListRV(t *testing.T) {
	for _, c := range []struct {
		rv, match string
		ok        bool
	}{{"", "", true}, {"0", "", true}, {"50", "NotOlderThan", true}, {"100", "NotOlderThan", true}, {"101", "NotOlderThan", false},
		{"100", "Exact", true}, {"50", "Exact", false}, {"abc", "", false}} {
		if err := checkListRV(c.rv, c.match, "100"); (err == nil) != c.ok {
			t.Errorf("rv=%s match=%s: %v", c.rv, c.match, err)
		}
	}
}

// TestStreamedList: a whole view of several MB goes out a page at a time,
// byte for byte what the assembled answer is, JSON and protobuf; should
// the view move under the stream, the answer is cut off.
func TestStreamedList(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	seedList(t, c, "big", 5000, func(int) bool { return true })
	for _, media := range []string{codec.MediaJSON, codec.MediaProtobuf} {
		// Alone, a whole view is assembled; while another is being
		// answered, streamed.
		whole := serve(t, c, "/api/v1/namespaces/big/configmaps", media)
		c.Reader.beginWhole()
		streamed := serve(t, c, "/api/v1/namespaces/big/configmaps", media)
		c.Reader.endWhole()
		if streamed.Code != 200 || whole.Code != 200 || streamed.Body.Len() < streamMin {
			t.Fatalf("%s: %d (%d bytes), %d", media, streamed.Code, streamed.Body.Len(), whole.Code)
		}
		if !bytes.Equal(streamed.Body.Bytes(), whole.Body.Bytes()) {
			t.Errorf("%s: the streamed list differs from the assembled one (%d and %d bytes)", media, streamed.Body.Len(), whole.Body.Len())
		}
		if got := streamed.Header().Get("Content-Length"); got != strconv.Itoa(streamed.Body.Len()) {
			t.Errorf("%s: Content-Length %s for %d bytes", media, got, streamed.Body.Len())
		}
	}

	// The view is re-listed (the cloud returned) after the first page.
	r := httptest.NewRequest(http.MethodGet, "/api/v1/namespaces/big/configmaps", nil)
	info, _ := request.Parse(r, reader)
	c.Reader.beginWhole()
	defer c.Reader.endWhole()
	w := &movingWriter{ResponseRecorder: httptest.NewRecorder(), move: func() {
		v := store.View{Key: store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "big"}, ResourceVersion: "30000", Kind: "ConfigMapList", APIVersion: "v1"}
		if err := c.Store.ReplaceView(v, nil); err != nil {
			t.Error(err)
		}
	}}
	defer func() {
		if p := recover(); p != http.ErrAbortHandler {
			t.Errorf("a view that moved under the stream: %v, want the answer cut off", p)
		}
	}()
	c.Serve(w, r, info)
}

// movingWriter calls move at the second write of a body.
type movingWriter struct {
	*httptest.ResponseRecorder
	writes int
	move   func()
}

func (m *movingWriter) Write(b []byte) (int, error) {
	m.writes++
	if m.writes == 2 {
		m.move()
	}
	return m.ResponseRecorder.Write(b)
}

// BenchmarkServeListConcurrent: fifty clients list the same view of 10,000
// objects at once, offline. It reports the peak of the Go heap in use
// while they do (peak-heap-MB), sampled every millisecond, beside the time.
func BenchmarkServeListConcurrent(b *testing.B) {
	c, stop := newCache(b)
	defer stop()
	seedList(b, c, "json", 10000, nil)
	seedList(b, c, "protobuf", 10000, func(int) bool { return true })
	for _, bc := range []struct{ name, ns, accept string }{
		{"protobuf", "protobuf", "application/vnd.kubernetes.protobuf, */*"},
		{"json", "json", "application/json"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			r := httptest.NewRequest(http.MethodGet, "/api/v1/namespaces/"+bc.ns+"/configmaps", nil)
			r.Header.Set("Accept", bc.accept)
			info, err := request.Parse(r, reader)
			if err != nil {
				b.Fatal(err)
			}
			runtime.GC()
			var peak atomic.Uint64
			done := make(chan struct{})
			go func() {
				var ms runtime.MemStats
				for {
					select {
					case <-done:
						return
					case <-time.After(time.Millisecond):
					}
					runtime.ReadMemStats(&ms)
					if ms.HeapInuse > peak.Load() {
						peak.Store(ms.HeapInuse)
					}
				}
			}()
			for b.Loop() {
				var wg sync.WaitGroup
				for range 50 {
					wg.Go(func() {
						w := &discardWriter{header: http.Header{}}
						c.Serve(w, r, info)
						if w.code != 200 {
							b.Errorf("status %d", w.code)
						}
					})
				}
				wg.Wait()
			}
			close(done)
			b.ReportMetric(float64(peak.Load())/(1<<20), "peak-heap-MB")
		})
	}
}
