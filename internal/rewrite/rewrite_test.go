package rewrite

//lint:file-ignore SA1019 core/v1 Endpoints are deprecated but still served, and older service proxies read them.

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/outposthq/outpost/internal/request"
)

var rules = &Rules{
	Address:  netip.MustParseAddrPort("169.254.2.1:10269"),
	NodeUser: "system:node:n1",
	Proxies:  []string{"system:serviceaccount:kube-system:kube-proxy"},
}

var (
	node      = request.Identity{Kind: request.NodeCert, User: "system:node:n1"}
	kubeProxy = request.Identity{Kind: request.BearerToken, User: "system:serviceaccount:kube-system:kube-proxy"}
	someone   = request.Identity{Kind: request.BearerToken, User: "system:serviceaccount:default:app"}
)

func info(id request.Identity, verb, group, resource, ns, name string) *request.Info {
	return &request.Info{Identity: id, Verb: verb, IsResourceRequest: true, APIGroup: group, Resource: resource,
		Namespace: ns, Name: name, Watch: verb == "watch"}
}

func TestTarget(t *testing.T) {
	for _, tc := range []struct {
		name string
		info *request.Info
		want kind
	}{
		{"kubelet lists services", info(node, "list", "", "services", "", ""), service},
		{"kubelet gets the kubernetes service", info(node, "get", "", "services", "default", "kubernetes"), service},
		{"kubelet gets another service", info(node, "get", "", "services", "default", "web"), none},
		{"kubelet lists services elsewhere", info(node, "list", "", "services", "kube-system", ""), none},
		{"another node", info(request.Identity{Kind: request.NodeCert, User: "system:node:n2"}, "list", "", "services", "", ""), none},
		{"kube-proxy lists services", info(kubeProxy, "list", "", "services", "", ""), none},
		{"kube-proxy watches slices", info(kubeProxy, "watch", "discovery.k8s.io", "endpointslices", "", ""), endpointSlice},
		{"kube-proxy reads endpoints", info(kubeProxy, "get", "", "endpoints", "default", "kubernetes"), endpoints},
		{"an app lists slices", info(someone, "list", "discovery.k8s.io", "endpointslices", "", ""), none},
		{"a write", info(node, "update", "", "services", "default", "kubernetes"), none},
		{"a status", func() *request.Info {
			i := info(node, "get", "", "services", "default", "kubernetes")
			i.Subresource = "status"
			return i
		}(), none},
	} {
		if got := rules.target(tc.info); got != tc.want {
			t.Errorf("%s: target = %d, want %d", tc.name, got, tc.want)
		}
	}
	var off *Rules
	if off.target(info(node, "list", "", "services", "", "")) != none {
		t.Error("nil Rules rewrites")
	}
}

func kubernetesService() corev1.Service {
	return corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "kubernetes", Namespace: "default", ResourceVersion: "7"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.0.0.1", ClusterIPs: []string{"10.0.0.1"}, IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol},
			Ports: []corev1.ServicePort{{Name: "https", Port: 443, Protocol: corev1.ProtocolTCP}}},
	}
}

func webService() corev1.Service {
	return corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default", ResourceVersion: "8"},
		Spec:       corev1.ServiceSpec{ClusterIP: "10.0.0.9", Ports: []corev1.ServicePort{{Port: 80}}},
	}
}

func kubernetesSlice() discoveryv1.EndpointSlice {
	port, name := int32(6443), "https"
	return discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "kubernetes", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"192.0.2.10"}}, {Addresses: []string{"192.0.2.11"}}},
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port}},
	}
}

// serve writes body through a Writer for in, as the proxy does, and returns
// what the client got.
func serve(t *testing.T, in *request.Info, header http.Header, writes ...[]byte) *httptest.ResponseRecorder {
	t.Helper()
	rec := httptest.NewRecorder()
	w := rules.Wrap(rec, in, slog.New(slog.DiscardHandler))
	for k, v := range header {
		w.Header()[k] = v
	}
	w.WriteHeader(http.StatusOK)
	for _, p := range writes {
		if _, err := w.Write(p); err != nil {
			t.Fatal(err)
		}
		_ = http.NewResponseController(w).Flush()
	}
	if fw, ok := w.(*Writer); ok {
		fw.Finish()
	}
	return rec
}

func jsonOf(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestJSONListForKubelet(t *testing.T) {
	list := corev1.ServiceList{TypeMeta: metav1.TypeMeta{Kind: "ServiceList", APIVersion: "v1"},
		Items: []corev1.Service{webService(), kubernetesService()}}
	body := jsonOf(t, list)
	var zipped bytes.Buffer
	zw := gzip.NewWriter(&zipped)
	_, _ = zw.Write(body)
	_ = zw.Close()
	rec := serve(t, info(node, "list", "", "services", "", ""),
		http.Header{"Content-Type": {"application/json"}, "Content-Encoding": {"gzip"}, "Content-Length": {"1"}}, zipped.Bytes())
	if rec.Header().Get("Content-Encoding") != "" {
		t.Error("rewritten answer still says it is gzipped")
	}
	var got corev1.ServiceList
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if rec.Header().Get("Content-Length") != strconv.Itoa(rec.Body.Len()) {
		t.Errorf("Content-Length %s for %d bytes", rec.Header().Get("Content-Length"), rec.Body.Len())
	}
	if s := got.Items[1]; s.Spec.ClusterIP != "169.254.2.1" || s.Spec.Ports[0].Port != 10269 || s.ResourceVersion != "7" {
		t.Errorf("kubernetes Service not pointed at outpost: %+v", s.Spec)
	}
	if s := got.Items[0]; s.Spec.ClusterIP != "10.0.0.9" || s.Spec.Ports[0].Port != 80 {
		t.Errorf("another Service changed: %+v", s.Spec)
	}
}

func TestUnchangedAnswersGoOutByteForByte(t *testing.T) {
	body := jsonOf(t, corev1.ServiceList{TypeMeta: metav1.TypeMeta{Kind: "ServiceList", APIVersion: "v1"}, Items: []corev1.Service{webService()}})
	rec := serve(t, info(node, "list", "", "services", "", ""), http.Header{"Content-Type": {"application/json"}}, body[:10], body[10:])
	if !bytes.Equal(rec.Body.Bytes(), body) {
		t.Errorf("unchanged list altered:\n%s\n%s", rec.Body.Bytes(), body)
	}
	// Another caller's answer is not even wrapped.
	svc := kubernetesService()
	body = jsonOf(t, &svc)
	rec = serve(t, info(someone, "get", "", "services", "default", "kubernetes"), http.Header{"Content-Type": {"application/json"}}, body)
	if !bytes.Equal(rec.Body.Bytes(), body) {
		t.Error("another identity's answer was changed")
	}
	// An error Status passes through.
	status := []byte(`{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}`)
	rec = httptest.NewRecorder()
	w := rules.Wrap(rec, info(node, "get", "", "services", "default", "kubernetes"), slog.New(slog.DiscardHandler))
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusNotFound)
	_, _ = w.Write(status)
	w.(*Writer).Finish()
	if rec.Code != http.StatusNotFound || !bytes.Equal(rec.Body.Bytes(), status) {
		t.Errorf("Status changed: %d %s", rec.Code, rec.Body.Bytes())
	}
}

func envelope(t *testing.T, kind, apiVersion string, obj interface{ Marshal() ([]byte, error) }) []byte {
	t.Helper()
	raw, err := obj.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	unk := runtime.Unknown{TypeMeta: runtime.TypeMeta{Kind: kind, APIVersion: apiVersion}, Raw: raw}
	env, err := unk.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte("k8s\x00"), env...)
}

func unwrap(t *testing.T, data []byte, into interface{ Unmarshal([]byte) error }) {
	t.Helper()
	var unk runtime.Unknown
	if err := unk.Unmarshal(bytes.TrimPrefix(data, []byte("k8s\x00"))); err != nil {
		t.Fatal(err)
	}
	if err := into.Unmarshal(unk.Raw); err != nil {
		t.Fatal(err)
	}
}

func TestProtobufGetForKubelet(t *testing.T) {
	svc := kubernetesService()
	rec := serve(t, info(node, "get", "", "services", "default", "kubernetes"),
		http.Header{"Content-Type": {"application/vnd.kubernetes.protobuf"}}, envelope(t, "Service", "v1", &svc))
	var got corev1.Service
	unwrap(t, rec.Body.Bytes(), &got)
	if got.Spec.ClusterIP != "169.254.2.1" || got.Spec.ClusterIPs[0] != "169.254.2.1" || got.Spec.Ports[0].Port != 10269 {
		t.Errorf("protobuf Service not rewritten: %+v", got.Spec)
	}
}

func protobufFrame(t *testing.T, typ string, obj []byte) []byte {
	t.Helper()
	ev := metav1.WatchEvent{Type: typ, Object: runtime.RawExtension{Raw: obj}}
	msg, err := ev.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(msg))), msg...)
}

func TestProtobufWatchForKubeProxy(t *testing.T) {
	slice := kubernetesSlice()
	other := kubernetesSlice()
	other.Name, other.Labels = "web-abc", map[string]string{discoveryv1.LabelServiceName: "web"}
	f1 := protobufFrame(t, "ADDED", envelope(t, "EndpointSlice", "discovery.k8s.io/v1", &other))
	f2 := protobufFrame(t, "MODIFIED", envelope(t, "EndpointSlice", "discovery.k8s.io/v1", &slice))
	stream := append(append([]byte(nil), f1...), f2...)
	// Split mid-frame, as the network does.
	rec := serve(t, info(kubeProxy, "watch", "discovery.k8s.io", "endpointslices", "", ""),
		http.Header{"Content-Type": {"application/vnd.kubernetes.protobuf;stream=watch"}}, stream[:3], stream[3:len(f1)+7], stream[len(f1)+7:])
	out := rec.Body.Bytes()
	if !bytes.HasPrefix(out, f1) {
		t.Fatal("the first event (another Service's slice) was changed")
	}
	out = out[len(f1):]
	n := binary.BigEndian.Uint32(out)
	var ev metav1.WatchEvent
	if err := ev.Unmarshal(out[4 : 4+n]); err != nil {
		t.Fatal(err)
	}
	var got discoveryv1.EndpointSlice
	unwrap(t, ev.Object.Raw, &got)
	if ev.Type != "MODIFIED" || len(got.Endpoints) != 1 || got.Endpoints[0].Addresses[0] != "169.254.2.1" || *got.Ports[0].Port != 10269 || *got.Ports[0].Name != "https" {
		t.Errorf("slice not pointed at outpost: %s %+v %+v", ev.Type, got.Endpoints, got.Ports)
	}
	if !*got.Endpoints[0].Conditions.Ready {
		t.Error("endpoint not ready")
	}
}

func TestJSONWatchForKubelet(t *testing.T) {
	svc := kubernetesService()
	ev := jsonOf(t, map[string]any{"type": "ADDED", "object": &svc})
	bookmark := []byte(`{"type":"BOOKMARK","object":{"kind":"Service","apiVersion":"v1","metadata":{"resourceVersion":"9"}}}` + "\n")
	stream := append(append(ev, '\n'), bookmark...)
	rec := serve(t, info(node, "watch", "", "services", "", ""), http.Header{"Content-Type": {"application/json"}}, stream[:20], stream[20:])
	lines := bytes.SplitAfter(rec.Body.Bytes(), []byte("\n"))
	var got struct {
		Type   string
		Object corev1.Service
	}
	if err := json.Unmarshal(lines[0], &got); err != nil {
		t.Fatal(err)
	}
	if got.Type != "ADDED" || got.Object.Spec.ClusterIP != "169.254.2.1" || got.Object.Spec.Ports[0].Port != 10269 {
		t.Errorf("watch event not rewritten: %s", lines[0])
	}
	if !bytes.Equal(lines[1], bookmark) {
		t.Errorf("bookmark changed: %s", lines[1])
	}
}

func TestEndpoints(t *testing.T) {
	ep := corev1.Endpoints{TypeMeta: metav1.TypeMeta{Kind: "Endpoints", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{Name: "kubernetes", Namespace: "default"},
		Subsets:    []corev1.EndpointSubset{{Addresses: []corev1.EndpointAddress{{IP: "192.0.2.10"}}, Ports: []corev1.EndpointPort{{Name: "https", Port: 6443}}}}}
	rec := serve(t, info(kubeProxy, "get", "", "endpoints", "default", "kubernetes"), http.Header{"Content-Type": {"application/json"}}, jsonOf(t, &ep))
	var got corev1.Endpoints
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got.Subsets[0].Addresses[0].IP != "169.254.2.1" || got.Subsets[0].Ports[0].Port != 10269 {
		t.Errorf("Endpoints not rewritten: %+v", got.Subsets)
	}
}

func TestBrokenAnswerGoesOutAsItCame(t *testing.T) {
	body := []byte(`{"kind":"ServiceList","items":[{"metadata":{"name":"kubernetes"`) // cut short
	rec := serve(t, info(node, "list", "", "services", "", ""), http.Header{"Content-Type": {"application/json"}}, body)
	got, _ := io.ReadAll(rec.Body)
	if !bytes.Equal(got, body) {
		t.Errorf("broken answer altered: %s", got)
	}
}
