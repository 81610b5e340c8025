package reader

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/outposthq/outpost/internal/codec"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/store"
)

// A kind no Go type of outpost's knows, laid out as generated Kubernetes
// protobuf is: ObjectMeta in field 1, a spec in field 2.
const (
	widgetAPIVersion = "example.com/v1"
	widgetResource   = "example.com/v1/widgets"
)

func widgetMessage(t testing.TB, name, ns, rv string, labels map[string]string, color string) []byte {
	t.Helper()
	om := metav1.ObjectMeta{Name: name, Namespace: ns, ResourceVersion: rv, Labels: labels}
	md, err := om.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	spec := protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), []byte(color))
	b := protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), md)
	return protowire.AppendBytes(protowire.AppendTag(b, 2, protowire.BytesType), spec)
}

func widgetList(t testing.TB, rv string, items ...[]byte) []byte {
	t.Helper()
	body, ok := codec.ProtobufList("WidgetList", widgetAPIVersion, rv, "", make([][]byte, len(items)), items)
	if !ok {
		t.Fatal("cannot assemble a WidgetList")
	}
	return body
}

func widgetEnvelope(kind string, msg []byte) []byte {
	return codec.ProtobufEnvelope(kind, widgetAPIVersion, len(msg), func(b []byte) []byte { return append(b, msg...) })
}

// TestUnknownProtobufKindRecordedAndServed: a list of a kind outpost has
// no type for is recorded from its envelope and ObjectMeta, and served
// offline to protobuf clients byte for byte, with selectors on labels and
// metadata fields; metadata-only and Table clients get the metadata; JSON
// and CBOR clients get 406 rather than objects without their spec.
func TestUnknownProtobufKindRecordedAndServed(t *testing.T) {
	reg := prometheus.NewRegistry()
	c, stop := newCache(t, func(c *Cache) { c.Metrics = metrics.New(reg) })
	defer stop()
	if codec.KnownKind(schema.GroupVersionKind{Group: "example.com", Version: "v1", Kind: "Widget"}) {
		t.Fatal("the test kind must be unknown to outpost")
	}
	a := widgetMessage(t, "a", "ns1", "7", map[string]string{"tier": "front"}, "blue")
	b := widgetMessage(t, "b", "ns2", "8", map[string]string{"tier": "back"}, "red")
	list := widgetList(t, "9", a, b)
	const pb = "application/vnd.kubernetes.protobuf"
	respond(t, c, "/apis/example.com/v1/widgets", pb+", application/json", pb, list)
	key := store.ViewKey{Identity: reader.Key(), Resource: widgetResource}
	waitFor(t, "the widgets view", func() bool {
		v, ok, _ := c.Store.View(key)
		return ok && v.ResourceVersion == "9" && !v.Stale
	})

	w := serve(t, c, "/apis/example.com/v1/widgets", pb)
	if w.Code != http.StatusOK || w.Header().Get("Content-Type") != pb {
		t.Fatalf("protobuf list: %d %s %s", w.Code, w.Header().Get("Content-Type"), w.Body)
	}
	if !bytes.Equal(w.Body.Bytes(), list) {
		t.Errorf("protobuf list differs from the recorded one:\n got %q\nwant %q", w.Body.Bytes(), list)
	}
	w = serve(t, c, "/apis/example.com/v1/widgets?labelSelector=tier%3Dback", pb)
	if want := widgetList(t, "9", b); w.Code != http.StatusOK || !bytes.Equal(w.Body.Bytes(), want) {
		t.Errorf("label-selected protobuf list: %d\n got %q\nwant %q", w.Code, w.Body.Bytes(), want)
	}
	w = serve(t, c, "/apis/example.com/v1/namespaces/ns1/widgets?fieldSelector=metadata.name%3Da", pb)
	if want := widgetList(t, "9", a); w.Code != http.StatusOK || !bytes.Equal(w.Body.Bytes(), want) {
		t.Errorf("field-selected protobuf list in ns1: %d\n got %q\nwant %q", w.Code, w.Body.Bytes(), want)
	}
	w = serve(t, c, "/apis/example.com/v1/namespaces/ns2/widgets/b", pb)
	if want := widgetEnvelope("Widget", b); w.Code != http.StatusOK || !bytes.Equal(w.Body.Bytes(), want) {
		t.Errorf("protobuf get: %d\n got %q\nwant %q", w.Code, w.Body.Bytes(), want)
	}

	w = serve(t, c, "/apis/example.com/v1/widgets", "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")
	var pom metav1.PartialObjectMetadataList
	if err := json.Unmarshal(w.Body.Bytes(), &pom); err != nil || w.Code != http.StatusOK || len(pom.Items) != 2 ||
		pom.Items[0].Name != "a" || pom.Items[1].Labels["tier"] != "back" || pom.Items[1].ResourceVersion != "8" {
		t.Errorf("metadata-only list: %d %v %s", w.Code, err, w.Body)
	}
	if strings.Contains(w.Body.String(), "protobuf-only") {
		t.Errorf("the marker leaked into a metadata-only answer: %s", w.Body)
	}
	w = serve(t, c, "/apis/example.com/v1/widgets", "application/json;as=Table;g=meta.k8s.io;v=v1, application/json")
	if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), `"kind":"Table"`) || strings.Contains(w.Body.String(), "protobuf-only") {
		t.Errorf("table: %d %s", w.Code, w.Body)
	}
	for _, accept := range []string{"application/json", "application/cbor", ""} {
		w = serve(t, c, "/apis/example.com/v1/widgets", accept)
		if w.Code != http.StatusNotAcceptable || !strings.Contains(w.Body.String(), "only as protobuf") {
			t.Errorf("list as %q: want 406 saying why, got %d %s", accept, w.Code, w.Body)
		}
	}
	w = serve(t, c, "/apis/example.com/v1/namespaces/ns1/widgets/a", "application/json")
	if w.Code != http.StatusNotAcceptable {
		t.Errorf("get as JSON: want 406, got %d %s", w.Code, w.Body)
	}
	if got := counterValue(t, reg, "outpost_cache_unrecorded_total"); got != 0 {
		t.Errorf("unrecorded answers counted: %v, want 0", got)
	}
}

// TestUnknownProtobufKindWatched: a protobuf watch of an unknown kind is
// recorded event by event, and an offline protobuf watch sends the
// recorded messages and bookmarks of that kind.
func TestUnknownProtobufKindWatched(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	const pb = "application/vnd.kubernetes.protobuf"
	a := widgetMessage(t, "a", "ns1", "7", nil, "blue")
	a2 := widgetMessage(t, "a", "ns1", "10", nil, "green")
	respond(t, c, "/apis/example.com/v1/widgets", pb, pb, widgetList(t, "9", a))
	key := store.ViewKey{Identity: reader.Key(), Resource: widgetResource}
	waitFor(t, "the list", func() bool { v, ok, _ := c.Store.View(key); return ok && v.ResourceVersion == "9" })

	var stream bytes.Buffer
	for _, ev := range []struct {
		typ string
		raw []byte
	}{{"MODIFIED", widgetEnvelope("Widget", a2)}} {
		frame, err := (&metav1.WatchEvent{Type: ev.typ, Object: runtime.RawExtension{Raw: ev.raw}}).Marshal()
		if err != nil {
			t.Fatal(err)
		}
		stream.Write(binary.BigEndian.AppendUint32(nil, uint32(len(frame))))
		stream.Write(frame)
	}
	respond(t, c, "/apis/example.com/v1/widgets?watch=true&resourceVersion=9", pb, pb+";stream=watch", stream.Bytes())
	waitFor(t, "the watch event", func() bool {
		o, ok, _ := c.Store.Get(widgetResource, "ns1", "a")
		return ok && o.ResourceVersion == "10" && bytes.Equal(o.Proto, a2)
	})

	w := serve(t, c, "/apis/example.com/v1/widgets?watch=true&timeoutSeconds=1&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan", pb)
	if w.Code != http.StatusOK || !strings.HasPrefix(w.Header().Get("Content-Type"), pb) {
		t.Fatalf("offline watch: %d %s %s", w.Code, w.Header().Get("Content-Type"), w.Body)
	}
	d, err := codec.NewWatchDecoder(pb, io.NopCloser(bytes.NewReader(w.Body.Bytes())), widgetResource)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := d.Next()
	if err != nil || ev.Type != watch.Added || ev.Kind != "Widget" || !bytes.Equal(ev.Object.Proto, a2) {
		t.Fatalf("first event: %v %+v", err, ev)
	}
	ev, err = d.Next()
	if err != nil || ev.Type != watch.Bookmark || !ev.InitialEventsEnd || ev.Object.ResourceVersion == "" {
		t.Fatalf("second event: want the initial-events-end bookmark, got %v %+v", err, ev)
	}

	w = serve(t, c, "/apis/example.com/v1/widgets?watch=true&timeoutSeconds=1", "application/json")
	if !strings.Contains(w.Body.String(), `"type":"ERROR"`) || !strings.Contains(w.Body.String(), "only as protobuf") {
		t.Errorf("JSON watch of a protobuf-only kind: want an ERROR event saying why, got %d %s", w.Code, w.Body)
	}
}

// TestUnrecordableCountedByResource: an answer outpost cannot decode is
// counted by group, version, resource and reason, listed by Unrecorded
// until an answer of the resource is recorded, and nothing is stored.
func TestUnrecordableCountedByResource(t *testing.T) {
	reg := prometheus.NewRegistry()
	c, stop := newCache(t, func(c *Cache) { c.Metrics = metrics.New(reg) })
	defer stop()
	const pb = "application/vnd.kubernetes.protobuf"
	bad := append([]byte("k8s\x00"), 0xff, 0xff, 0xff) // an envelope that breaks off
	respond(t, c, "/apis/example.com/v1/widgets", pb, pb, bad)
	waitFor(t, "the drop", func() bool { return len(c.Unrecorded()) == 1 })
	u := c.Unrecorded()[0]
	if u.Resource != widgetResource || u.Reason != "undecodable" || u.Count != 1 || u.Error == "" {
		t.Errorf("unrecorded: %+v", u)
	}
	if got := counterValue(t, reg, "outpost_cache_unrecorded_total"); got != 1 {
		t.Errorf("outpost_cache_unrecorded_total = %v, want 1", got)
	}
	if _, ok, _ := c.Store.View(store.ViewKey{Identity: reader.Key(), Resource: widgetResource}); ok {
		t.Error("a view was stored for an undecodable answer")
	}
	respond(t, c, "/apis/example.com/v1/widgets", pb, pb, widgetList(t, "3", widgetMessage(t, "a", "", "3", nil, "x")))
	waitFor(t, "the resource recorded again", func() bool { return len(c.Unrecorded()) == 0 })
}

func counterValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// TestProtobufOnlyNeverHidesJSON: for a kind outpost has no type for, a
// protobuf answer (a get, a list, a watch event) never replaces the whole
// JSON a JSON answer recorded of the same object at the same
// resourceVersion, and a JSON answer completes what protobuf answers
// recorded, even in the same view at the same resourceVersion.
func TestProtobufOnlyNeverHidesJSON(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	const pb = "application/vnd.kubernetes.protobuf"
	jsonList := func(rv string, names ...string) []byte {
		items := make([]string, len(names))
		for i, n := range names {
			items[i] = fmt.Sprintf(`{"metadata":{"name":%q,"namespace":"ns1","resourceVersion":"7"},"spec":{"color":"blue-%s"}}`, n, n)
		}
		return fmt.Appendf(nil, `{"kind":"WidgetList","apiVersion":"example.com/v1","metadata":{"resourceVersion":%q},"items":[%s]}`, rv, strings.Join(items, ","))
	}
	msg := widgetMessage(t, "a", "ns1", "7", nil, "blue")
	viewAt := func(k store.ViewKey, rv string) func() bool {
		return func() bool { v, ok, _ := c.Store.View(k); return ok && v.ResourceVersion == rv }
	}

	// JSON first, then protobuf at the same resourceVersion.
	respond(t, c, "/apis/example.com/v1/namespaces/ns1/widgets", "application/json", "application/json", jsonList("9", "a"))
	waitFor(t, "the JSON list", viewAt(store.ViewKey{Identity: reader.Key(), Resource: widgetResource, Namespace: "ns1"}, "9"))
	respond(t, c, "/apis/example.com/v1/namespaces/ns1/widgets/a", pb, pb, widgetEnvelope("Widget", msg))
	waitFor(t, "the protobuf get", viewAt(store.ViewKey{Identity: reader.Key(), Resource: widgetResource, Namespace: "ns1", Name: "a"}, "7"))
	w := serve(t, c, "/apis/example.com/v1/namespaces/ns1/widgets", "application/json")
	if w.Code != 200 || !strings.Contains(w.Body.String(), "blue-a") {
		t.Errorf("JSON list after a protobuf get at the same resourceVersion: %d %s", w.Code, w.Body)
	}
	if w := serve(t, c, "/apis/example.com/v1/namespaces/ns1/widgets/a", pb); w.Code != 200 || !bytes.Equal(w.Body.Bytes(), widgetEnvelope("Widget", msg)) {
		t.Errorf("protobuf get: %d %q", w.Code, w.Body.Bytes())
	}

	// Protobuf first, then JSON in the same view at the same version.
	b := widgetMessage(t, "b", "ns2", "7", nil, "red")
	respond(t, c, "/apis/example.com/v1/namespaces/ns2/widgets", pb, pb, widgetList(t, "9", b))
	k2 := store.ViewKey{Identity: reader.Key(), Resource: widgetResource, Namespace: "ns2"}
	waitFor(t, "the protobuf list", viewAt(k2, "9"))
	if w := serve(t, c, "/apis/example.com/v1/namespaces/ns2/widgets", "application/json"); w.Code != http.StatusNotAcceptable {
		t.Fatalf("JSON list of a protobuf-only view: %d, want 406", w.Code)
	}
	bJSON := []byte(`{"kind":"WidgetList","apiVersion":"example.com/v1","metadata":{"resourceVersion":"9"},"items":[{"metadata":{"name":"b","namespace":"ns2","resourceVersion":"7"},"spec":{"color":"red-b"}}]}`)
	respond(t, c, "/apis/example.com/v1/namespaces/ns2/widgets", "application/json", "application/json", bJSON)
	waitFor(t, "the JSON answer completing the view", func() bool {
		return serve(t, c, "/apis/example.com/v1/namespaces/ns2/widgets", "application/json").Code == 200
	})
	if w := serve(t, c, "/apis/example.com/v1/namespaces/ns2/widgets", "application/json"); !strings.Contains(w.Body.String(), "red-b") {
		t.Errorf("JSON list after the JSON answer: %d %s", w.Code, w.Body)
	}
}

// TestWatchOnlyViewNamesItsKind: a view that only a protobuf watch of a
// kind outpost has no type for ever filled records the kind the events
// named, so offline protobuf answers from it name it too.
func TestWatchOnlyViewNamesItsKind(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	const pb = "application/vnd.kubernetes.protobuf"
	a := widgetMessage(t, "a", "ns1", "10", nil, "green")
	frame, err := (&metav1.WatchEvent{Type: "ADDED", Object: runtime.RawExtension{Raw: widgetEnvelope("Widget", a)}}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	stream := append(binary.BigEndian.AppendUint32(nil, uint32(len(frame))), frame...)
	respond(t, c, "/apis/example.com/v1/namespaces/ns1/widgets?watch=true&resourceVersion=9", pb, pb+";stream=watch", stream)
	key := store.ViewKey{Identity: reader.Key(), Resource: widgetResource, Namespace: "ns1"}
	waitFor(t, "the watch-created view", func() bool { v, ok, _ := c.Store.View(key); return ok && v.ResourceVersion == "10" })
	if v, _, _ := c.Store.View(key); v.Kind != "WidgetList" || v.APIVersion != widgetAPIVersion {
		t.Errorf("watch-created view: kind %q, apiVersion %q; want WidgetList, %s", v.Kind, v.APIVersion, widgetAPIVersion)
	}
	if w := serve(t, c, "/apis/example.com/v1/namespaces/ns1/widgets/a", pb); w.Code != 200 || !bytes.Equal(w.Body.Bytes(), widgetEnvelope("Widget", a)) {
		t.Errorf("protobuf get from a watch-created view: %d %q", w.Code, w.Body.Bytes())
	}
}
