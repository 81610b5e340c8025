package cache

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/streaming"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/scheme"
)

func podList() *corev1.PodList {
	l := &corev1.PodList{TypeMeta: metav1.TypeMeta{Kind: "PodList", APIVersion: "v1"}, ListMeta: metav1.ListMeta{ResourceVersion: "42"}}
	for i, n := range []string{"a", "b"} {
		l.Items = append(l.Items, corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: n, Namespace: "ns", ResourceVersion: "4" + string(rune('0'+i)), Labels: map[string]string{"app": n}},
			Spec:       corev1.PodSpec{NodeName: "edge-1", HostNetwork: i == 1},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning},
		})
	}
	return l
}

func TestDecodeListJSONAndProtobufAgree(t *testing.T) {
	l := podList()
	jsonBody, err := json.Marshal(l)
	if err != nil {
		t.Fatal(err)
	}
	var pb bytes.Buffer
	if err := protobufSerializer.Encode(l, &pb); err != nil {
		t.Fatal(err)
	}
	fromJSON, err := DecodeList("application/json", jsonBody, "/v1/pods")
	if err != nil {
		t.Fatal(err)
	}
	fromPB, err := DecodeList("application/vnd.kubernetes.protobuf", pb.Bytes(), "/v1/pods")
	if err != nil {
		t.Fatal(err)
	}
	for _, got := range []List{fromJSON, fromPB} {
		if got.Kind != "PodList" || got.APIVersion != "v1" || got.ResourceVersion != "42" || len(got.Items) != 2 {
			t.Fatalf("list = %+v", got)
		}
		b := got.Items[1]
		if b.Name != "b" || b.Namespace != "ns" || b.ResourceVersion != "41" || b.Labels["app"] != "b" {
			t.Fatalf("item = %+v", b)
		}
		for field, want := range map[string]string{"spec.nodeName": "edge-1", "status.phase": "Running", "spec.hostNetwork": "true", "metadata.name": "b", "metadata.namespace": "ns"} {
			if b.Fields[field] != want {
				t.Errorf("field %s = %q, want %q", field, b.Fields[field], want)
			}
		}
		if bytes.Contains(b.Data, []byte(`"kind"`)) {
			t.Errorf("stored item keeps kind: %s", b.Data)
		}
	}
	// The stored JSON is what the apiserver's JSON list carries per item.
	var raw struct{ Items []json.RawMessage }
	_ = json.Unmarshal(jsonBody, &raw)
	if !bytes.Equal(fromPB.Items[0].Data, raw.Items[0]) || !bytes.Equal(fromJSON.Items[0].Data, raw.Items[0]) {
		t.Errorf("stored data differs from the list item:\n%s\n%s\n%s", fromPB.Items[0].Data, fromJSON.Items[0].Data, raw.Items[0])
	}
}

func TestTypeMetaRoundTrip(t *testing.T) {
	pod := podList().Items[0]
	pod.TypeMeta = metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"}
	body, _ := json.Marshal(pod)
	o, kind, apiVersion, err := DecodeObject("application/json", body, "/v1/pods")
	if err != nil || kind != "Pod" || apiVersion != "v1" {
		t.Fatalf("%v %q %q", err, kind, apiVersion)
	}
	if got := withTypeMeta(o.Data, kind, apiVersion); !bytes.Equal(got, body) {
		t.Fatalf("round trip:\n%s\n%s", got, body)
	}
}

func watchStream(t *testing.T, contentType string, events []watch.Event) []byte {
	t.Helper()
	info, ok := runtime.SerializerInfoForMediaType(scheme.Codecs.SupportedMediaTypes(), contentType)
	if !ok {
		t.Fatal("no serializer")
	}
	var buf bytes.Buffer
	enc := streaming.NewEncoder(info.StreamSerializer.Framer.NewFrameWriter(&buf), info.StreamSerializer.Serializer)
	for _, ev := range events {
		var raw bytes.Buffer
		if err := info.Serializer.Encode(ev.Object, &raw); err != nil {
			t.Fatal(err)
		}
		if err := enc.Encode(&metav1.WatchEvent{Type: string(ev.Type), Object: runtime.RawExtension{Raw: raw.Bytes()}}); err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

func TestWatchDecoder(t *testing.T) {
	pods := podList().Items
	for i := range pods {
		pods[i].TypeMeta = metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"}
	}
	end := &corev1.Pod{TypeMeta: metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{ResourceVersion: "99", Annotations: map[string]string{"k8s.io/initial-events-end": "true"}}}
	events := []watch.Event{{Type: watch.Added, Object: &pods[0]}, {Type: watch.Bookmark, Object: end}, {Type: watch.Deleted, Object: &pods[1]}}
	for _, ct := range []string{"application/json", "application/vnd.kubernetes.protobuf"} {
		t.Run(ct, func(t *testing.T) {
			d, err := NewWatchDecoder(ct, io.NopCloser(bytes.NewReader(watchStream(t, ct, events))), "/v1/pods")
			if err != nil {
				t.Fatal(err)
			}
			var got []Event
			for {
				ev, err := d.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				got = append(got, ev)
			}
			if len(got) != 3 || got[0].Type != watch.Added || got[0].Object.Name != "a" || got[0].Kind != "Pod" {
				t.Fatalf("events = %+v", got)
			}
			if got[1].Type != watch.Bookmark || !got[1].InitialEventsEnd || got[1].Object.ResourceVersion != "99" {
				t.Fatalf("bookmark = %+v", got[1])
			}
			if got[2].Type != watch.Deleted || got[2].Object.Name != "b" || got[2].Object.Fields["spec.nodeName"] != "edge-1" {
				t.Fatalf("deleted = %+v", got[2])
			}
		})
	}
}

func TestParseAccept(t *testing.T) {
	for h, want := range map[string]accept{
		"":                                    {plainJSON: true, media: mediaJSON},
		"application/json":                    {plainJSON: true, media: mediaJSON},
		"application/vnd.kubernetes.protobuf": {media: mediaProtobuf},
		"application/vnd.kubernetes.protobuf,application/json":                                                            {plainJSON: true, media: mediaProtobuf},
		"application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json": {as: "Table", plainJSON: true, media: mediaJSON},
		"application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json":                               {as: "PartialObjectMetadataList", plainJSON: true, media: mediaJSON},
	} {
		if got := parseAccept(h); got != want {
			t.Errorf("parseAccept(%q) = %+v, want %+v", h, got, want)
		}
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

// FuzzDecode feeds malformed bodies to every decoder: errors, never panics.
func FuzzDecode(f *testing.F) {
	l := podList()
	j, _ := json.Marshal(l)
	var pb bytes.Buffer
	_ = protobufSerializer.Encode(l, &pb)
	f.Add(j, uint8(0))
	f.Add(pb.Bytes(), uint8(1))
	f.Add([]byte(`{"type":"ADDED","object":{"metadata":{"name":"x"}}}`), uint8(0))
	f.Add([]byte("k8s\x00\x0a\x02"), uint8(1))
	f.Fuzz(func(t *testing.T, body []byte, ct uint8) {
		contentType := []string{mediaJSON, mediaProtobuf, mediaCBOR}[int(ct)%3]
		_, _ = DecodeList(contentType, body, "/v1/pods")
		_, _, _, _ = DecodeObject(contentType, body, "/v1/pods")
		if d, err := NewWatchDecoder(contentType, io.NopCloser(bytes.NewReader(body)), "/v1/pods"); err == nil {
			for range 100 {
				if _, err := d.Next(); err != nil {
					if !errors.Is(err, ErrUndecodable) && err != io.EOF {
						t.Fatalf("unexpected error kind: %v", err)
					}
					break
				}
			}
		}
	})
}
