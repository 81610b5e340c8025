package codec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strconv"
	"strings"
	"testing"

	apimeta "k8s.io/apimachinery/pkg/api/meta"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/codec/codectest"
	"github.com/outposthq/outpost/internal/store"
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
	fromJSON, err := DecodeList("application/json", jsonBody, "/v1/pods", nil)
	if err != nil {
		t.Fatal(err)
	}
	fromPB, err := DecodeList("application/vnd.kubernetes.protobuf", pb.Bytes(), "/v1/pods", nil)
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
	if got := WithTypeMeta(o.Data, kind, apiVersion); !bytes.Equal(got, body) {
		t.Fatalf("round trip:\n%s\n%s", got, body)
	}
}

func TestWatchDecoder(t *testing.T) {
	pods := podList().Items
	for i := range pods {
		pods[i].TypeMeta = metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"}
	}
	end := &corev1.Pod{TypeMeta: metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{ResourceVersion: "99", Annotations: map[string]string{"k8s.io/initial-events-end": "true"}}}
	// An event larger than the stream decoder's first buffer, which its
	// frame reader then hands over in several reads.
	big := pods[0].DeepCopy()
	big.Name, big.Annotations = "big", map[string]string{"filler": strings.Repeat("x", 100<<10)}
	events := []watch.Event{{Type: watch.Added, Object: &pods[0]}, {Type: watch.Bookmark, Object: end}, {Type: watch.Deleted, Object: &pods[1]},
		{Type: watch.Modified, Object: big}, {Type: watch.Modified, Object: &pods[0]}}
	for _, ct := range []string{"application/json", "application/vnd.kubernetes.protobuf"} {
		t.Run(ct, func(t *testing.T) {
			d, err := NewWatchDecoder(ct, io.NopCloser(bytes.NewReader(codectest.WatchStream(t, ct, events))), "/v1/pods")
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
			if len(got) != 5 || got[0].Type != watch.Added || got[0].Object.Name != "a" || got[0].Kind != "Pod" {
				t.Fatalf("events = %+v", got)
			}
			if got[3].Object.Name != "big" || got[4].Object.Name != "a" {
				t.Fatalf("after the bookmark: %+v", got[3:])
			}
			// Protobuf events keep each object's encoding as sent.
			for i, ev := range got {
				var want []byte
				if p, ok := events[i].Object.(*corev1.Pod); ok && ct != "application/json" && ev.Type != watch.Bookmark {
					want, _ = p.Marshal()
				}
				if !bytes.Equal(ev.Object.Proto, want) {
					t.Errorf("event %d (%s): protobuf of %d bytes, want %d", i, ev.Type, len(ev.Object.Proto), len(want))
				}
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
	for h, want := range map[string]Accept{
		"":                                    {PlainJSON: true, Media: MediaJSON},
		"application/json":                    {PlainJSON: true, Media: MediaJSON},
		"application/vnd.kubernetes.protobuf": {Media: MediaProtobuf},
		"application/vnd.kubernetes.protobuf,application/json":                                                            {PlainJSON: true, Media: MediaProtobuf},
		"application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json": {As: "Table", PlainJSON: true, Media: MediaJSON},
		"application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json":                               {As: "PartialObjectMetadataList", PlainJSON: true, Media: MediaJSON},
	} {
		if got := ParseAccept(h); got != want {
			t.Errorf("parseAccept(%q) = %+v, want %+v", h, got, want)
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
		contentType := []string{MediaJSON, MediaProtobuf, MediaCBOR}[int(ct)%3]
		_, _ = DecodeList(contentType, body, "/v1/pods", nil)
		_, _ = DecodeList(contentType, body, "/v1/pods", func(ns, name, rv string) (store.Object, bool) {
			return store.Object{Namespace: ns, Name: name, ResourceVersion: rv}, rv == "41"
		})
		_, _, _, _ = DecodeObject(contentType, body, "/v1/pods")
		_, _, _ = PeekMeta(contentType, body, ct&4 == 0)
		_, _ = StripTypeMeta(body)
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

// typedObjects are objects of every type whose field-selector values are
// read from the typed object, with the resource they are listed as.
func typedObjects() map[string]runtime.Object {
	md := metav1.ObjectMeta{Name: "x", Namespace: "ns", ResourceVersion: "7", Labels: map[string]string{"a": "b"},
		ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "m", APIVersion: "v1", Operation: "Update"}}}
	pod := podList().Items[1]
	pod.Spec.RestartPolicy, pod.Spec.SchedulerName, pod.Spec.ServiceAccountName = corev1.RestartPolicyAlways, "default-scheduler", "sa"
	pod.Status.PodIP, pod.Status.NominatedNodeName = "10.0.0.1", "n2"
	return map[string]runtime.Object{
		"/v1/pods":                   &pod,
		"/v1/nodes":                  &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n", ResourceVersion: "3"}, Spec: corev1.NodeSpec{Unschedulable: true}, Status: corev1.NodeStatus{Phase: "Running"}},
		"/v1/secrets":                &corev1.Secret{ObjectMeta: md, Type: corev1.SecretTypeOpaque, Data: map[string][]byte{"k": []byte("v")}},
		"/v1/namespaces":             &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ns"}, Status: corev1.NamespaceStatus{Phase: corev1.NamespaceActive}},
		"/v1/services":               &corev1.Service{ObjectMeta: md, Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.1", Type: corev1.ServiceTypeClusterIP}},
		"/v1/replicationcontrollers": &corev1.ReplicationController{ObjectMeta: md, Status: corev1.ReplicationControllerStatus{Replicas: 3}},
		"apps/v1/replicasets":        &appsv1.ReplicaSet{ObjectMeta: md, Status: appsv1.ReplicaSetStatus{Replicas: 2}},
		"batch/v1/jobs":              &batchv1.Job{ObjectMeta: md, Status: batchv1.JobStatus{Succeeded: 1}},
		"certificates.k8s.io/v1/certificatesigningrequests": &certificatesv1.CertificateSigningRequest{ObjectMeta: metav1.ObjectMeta{Name: "csr"},
			Spec: certificatesv1.CertificateSigningRequestSpec{SignerName: "kubernetes.io/kubelet-serving"}},
		"/v1/events": &corev1.Event{ObjectMeta: md, Type: "Warning", Reason: "R", ReportingController: "kubelet", Source: corev1.EventSource{Component: "kubelet"},
			InvolvedObject: corev1.ObjectReference{Kind: "Pod", Namespace: "ns", Name: "p", UID: "u", APIVersion: "v1", ResourceVersion: "5", FieldPath: "spec"}},
		"/v1/configmaps":      &corev1.ConfigMap{ObjectMeta: md, Data: map[string]string{"k": "v"}},
		"apps/v1/deployments": &appsv1.Deployment{ObjectMeta: md, Status: appsv1.DeploymentStatus{Replicas: 4}},
		// A type unlike its resource's: indexed from its JSON instead.
		"/v1/pods#meta": &metav1.PartialObjectMetadata{ObjectMeta: md},
	}
}

// TestTypedAndJSONIndexingAgree: an object decoded from protobuf is stored
// exactly as the same object decoded from JSON.
func TestTypedAndJSONIndexingAgree(t *testing.T) {
	for resource, obj := range typedObjects() {
		data, err := json.Marshal(obj)
		if err != nil {
			t.Fatal(err)
		}
		want, err := ObjectFromJSON(data, resource)
		if err != nil {
			t.Fatal(err)
		}
		got, err := ObjectFromTyped(obj.DeepCopyObject(), resource)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s:\n typed %+v\n json  %+v", resource, got, want)
		}
	}
}

func TestStripTypeMeta(t *testing.T) {
	for in, want := range map[string]string{
		`{"kind":"Pod","apiVersion":"v1","metadata":{"name":"a"}}`:                        `{"metadata":{"name":"a"}}`,
		` {"apiVersion":"x/v1","data":{"kind":"k"},"kind":"Foo","metadata":{"name":"a"}}`: `{"data":{"kind":"k"},"metadata":{"name":"a"}}`,
		`{"metadata":{"name":"a","managedFields":[{"apiVersion":"v1"}]},"spec":{}}`:       `{"metadata":{"name":"a","managedFields":[{"apiVersion":"v1"}]},"spec":{}}`,
		`{"\u006bind":"Pod", "metadata" : {"name":"a\"}"}}`:                               `{"metadata" : {"name":"a\"}"}}`,
		`{"kind":"Pod"}`: `{}`,
		`{}`:             `{}`,
	} {
		got, err := StripTypeMeta([]byte(in))
		if err != nil || string(got) != want {
			t.Errorf("stripTypeMeta(%s) = %s, %v; want %s", in, got, err, want)
		}
	}
	for _, bad := range []string{``, `[]`, `{"kind":`, `{"a":1`, `{"a" 1}`, `{"a":1,}x`} {
		if got, err := StripTypeMeta([]byte(bad)); err == nil {
			t.Errorf("stripTypeMeta(%s) = %s, want an error", bad, got)
		}
	}
}

func TestDecodeJSONList(t *testing.T) {
	for body, n := range map[string]int{
		`{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"42"},"items":null}`: 0,
		`{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"42"},"items":[]}`:   0,
		// Unstructured lists put items before metadata.
		`{"apiVersion":"v1","items":[{"metadata":{"name":"a"}} , {"apiVersion":"v1","kind":"Pod","metadata":{"name":"b"}}],"kind":"PodList","metadata":{"resourceVersion":"42","continue":"c"}}`: 2,
	} {
		l, err := DecodeList(MediaJSON, []byte(body), "/v1/pods", nil)
		if err != nil || l.Kind != "PodList" || l.APIVersion != "v1" || l.ResourceVersion != "42" || len(l.Items) != n || l.Items == nil {
			t.Fatalf("DecodeList(%s) = %+v, %v", body, l, err)
		}
		if n == 2 && (l.Continue != "c" || string(l.Items[1].Data) != `{"metadata":{"name":"b"}}`) {
			t.Fatalf("DecodeList(%s) = %+v", body, l)
		}
	}
	for _, bad := range []string{`{"items":[{"metadata":{}}]}`, `{"items":[1]}`, `{"items":{}}`, `{"items":[{"metadata":{"name":"a"}}`, `[]`, `{"kind":1}`} {
		if _, err := DecodeList(MediaJSON, []byte(bad), "/v1/pods", nil); !errors.Is(err, ErrUndecodable) {
			t.Errorf("DecodeList(%s): %v, want ErrUndecodable", bad, err)
		}
	}
}

// TestPeekMeta: the resourceVersion (and continue token) read at the start
// of an answer are those a full decode finds, and a start too short to hold
// them says so.
func TestPeekMeta(t *testing.T) {
	l := podList()
	l.Continue = "tok"
	pod := l.Items[0]
	pod.TypeMeta = metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"}
	for _, c := range []struct {
		obj      runtime.Object
		list     bool
		rv, cont string
	}{{l, true, "42", "tok"}, {&pod, false, "40", ""}} {
		for _, ct := range []string{MediaJSON, MediaProtobuf} {
			var body bytes.Buffer
			if ct == MediaJSON {
				_ = json.NewEncoder(&body).Encode(c.obj)
			} else if err := protobufSerializer.Encode(c.obj, &body); err != nil {
				t.Fatal(err)
			}
			rv, cont, ok := PeekMeta(ct, body.Bytes(), c.list)
			if !ok || rv != c.rv || cont != c.cont {
				t.Errorf("%s list=%v: peekMeta = %q %q %v, want %q %q", ct, c.list, rv, cont, ok, c.rv, c.cont)
			}
			// Every start either has it all or says it has not.
			for n := range body.Len() {
				if rv, cont, ok := PeekMeta(ct, body.Bytes()[:n], c.list); ok && (rv != c.rv || cont != c.cont) {
					t.Fatalf("%s list=%v: peekMeta of %d bytes = %q %q", ct, c.list, n, rv, cont)
				}
			}
		}
	}
	l.Continue = ""
	var body bytes.Buffer
	_ = protobufSerializer.Encode(l, &body)
	if rv, cont, ok := PeekMeta(MediaProtobuf, body.Bytes(), true); !ok || rv != "42" || cont != "" {
		t.Errorf("protobuf list without continue: %q %q %v", rv, cont, ok)
	}
	if _, _, ok := PeekMeta(MediaCBOR, body.Bytes(), true); ok {
		t.Error("peekMeta claims to read CBOR")
	}
}

// TestItemwiseListDecoding: a protobuf list decoded item by item gives what
// decoding it whole gives, plus each item's protobuf encoding as it was in
// the list, and items the store holds at the same resourceVersion are
// taken from it, in both encodings.
func TestItemwiseListDecoding(t *testing.T) {
	pods := podList()
	deployments := &appsv1.DeploymentList{TypeMeta: metav1.TypeMeta{Kind: "DeploymentList", APIVersion: "apps/v1"}, ListMeta: metav1.ListMeta{ResourceVersion: "9", Continue: "next"},
		Items: []appsv1.Deployment{{ObjectMeta: metav1.ObjectMeta{Name: "d", Namespace: "ns", ResourceVersion: "8"}, Status: appsv1.DeploymentStatus{Replicas: 2}}}}
	meta := &metav1.PartialObjectMetadataList{TypeMeta: metav1.TypeMeta{Kind: "PartialObjectMetadataList", APIVersion: "meta.k8s.io/v1"}, ListMeta: metav1.ListMeta{ResourceVersion: "7"},
		Items: []metav1.PartialObjectMetadata{{ObjectMeta: metav1.ObjectMeta{Name: "m", ResourceVersion: "6", Labels: map[string]string{"a": "b"}}}}}
	never := func(string, string, string) (store.Object, bool) { return store.Object{}, false }
	// Enough items to be decoded by several workers.
	many := &corev1.PodList{TypeMeta: pods.TypeMeta, ListMeta: pods.ListMeta}
	for i := range 2000 {
		p := pods.Items[i%2].DeepCopy()
		p.Name, p.ResourceVersion = fmt.Sprintf("p-%04d", i), strconv.Itoa(100+i)
		many.Items = append(many.Items, *p)
	}
	for resource, list := range map[string]runtime.Object{"/v1/pods": pods, "apps/v1/deployments": deployments, "/v1/pods#meta": meta, "/v1/pods#many": many} {
		resource = strings.TrimSuffix(resource, "#many")
		var pb bytes.Buffer
		if err := protobufSerializer.Encode(list, &pb); err != nil {
			t.Fatal(err)
		}
		whole, err := decodeTypedList(MediaProtobuf, pb.Bytes(), resource)
		if err != nil {
			t.Fatal(err)
		}
		items, ok, err := decodeProtobufList(pb.Bytes(), resource, never)
		if !ok || err != nil || len(items.Items) != len(whole.Items) {
			t.Fatalf("%s: item by item (%v %v): %d items, whole %d", resource, ok, err, len(items.Items), len(whole.Items))
		}
		i := 0
		if err := apimeta.EachListItem(list, func(item runtime.Object) error {
			want, err := item.(interface{ Marshal() ([]byte, error) }).Marshal()
			if err != nil || !bytes.Equal(items.Items[i].Proto, want) {
				t.Errorf("%s: item %d kept protobuf %q, want %q (%v)", resource, i, items.Items[i].Proto, want, err)
			}
			items.Items[i].Proto = nil
			i++
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(items, whole) {
			t.Errorf("%s: item by item\n %+v\nwhole\n %+v", resource, items, whole)
		}
	}

	// Known items are not decoded.
	sentinel := store.Object{Namespace: "ns", Name: "b", ResourceVersion: "41", Data: []byte(`{"stored":true}`)}
	known := func(ns, name, rv string) (store.Object, bool) {
		return sentinel, ns == "ns" && name == "b" && rv == "41"
	}
	js, _ := json.Marshal(pods)
	var pb bytes.Buffer
	_ = protobufSerializer.Encode(pods, &pb)
	for ct, body := range map[string][]byte{MediaJSON: js, MediaProtobuf: pb.Bytes()} {
		l, err := DecodeList(ct, body, "/v1/pods", known)
		if err != nil || len(l.Items) != 2 || string(l.Items[1].Data) != `{"stored":true}` || string(l.Items[0].Data) == `{"stored":true}` ||
			l.ResourceVersion != "42" || l.Kind != "PodList" {
			t.Errorf("%s: %+v %v", ct, l, err)
		}
	}
}
