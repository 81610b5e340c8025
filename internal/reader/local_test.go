package reader

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

var kubelet = request.Identity{Kind: request.NodeCert, User: "system:node:edge-1"}

func localWrite(t *testing.T, c *Cache, id request.Identity, method, target, contentType string, body []byte) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, target, bytes.NewReader(body))
	r.Header.Set("Content-Type", contentType)
	info, err := request.Parse(r, id)
	if err != nil {
		t.Fatal(err)
	}
	w := httptest.NewRecorder()
	if !c.AnswersWrite(r, info) {
		w.Code = 503
		return w
	}
	c.ServeWrite(w, r, info)
	return w
}

func seedObject(t *testing.T, c *Cache, resource, listKind, apiVersion string, objs ...any) {
	t.Helper()
	var items []store.Object
	for _, o := range objs {
		raw, _ := json.Marshal(o)
		so, err := codec.ObjectFromJSON(raw, resource)
		if err != nil {
			t.Fatal(err)
		}
		items = append(items, so)
	}
	v := store.View{Key: store.ViewKey{Identity: kubelet.Key(), Resource: resource}, ResourceVersion: "100", Kind: listKind, APIVersion: apiVersion}
	if err := c.Store.ReplaceView(v, items); err != nil {
		t.Fatal(err)
	}
}

// TestLocalWrites: offline, this node's kubelet renews its Lease and
// patches its pods' status locally and journals events; others get 503.
func TestLocalWrites(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	c.Local.Node = "edge-1"
	lease := coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: "edge-1", Namespace: "kube-node-lease", ResourceVersion: "50"}}
	seedObject(t, c, "coordination.k8s.io/v1/leases", "LeaseList", "coordination.k8s.io/v1", lease)
	pod := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default", ResourceVersion: "60"}, Spec: corev1.PodSpec{NodeName: "edge-1"},
		Status: corev1.PodStatus{Phase: corev1.PodPending}}
	other := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "elsewhere", Namespace: "default", ResourceVersion: "61"}, Spec: corev1.PodSpec{NodeName: "edge-2"}}
	seedObject(t, c, "/v1/pods", "PodList", "v1", pod, other)

	// Lease renewal (PUT), twice, each with the last answer's resourceVersion.
	rv := "50"
	for range 2 {
		l := lease.DeepCopy()
		l.ResourceVersion = rv
		now := metav1.NowMicro()
		l.Spec.RenewTime = &now
		body, _ := json.Marshal(l)
		w := localWrite(t, c, kubelet, http.MethodPut, "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/edge-1", "application/json", body)
		var got coordinationv1.Lease
		// The cloud's resourceVersion is kept, so the first renewal after
		// the reconnect still matches the apiserver's copy.
		if w.Code != 200 || json.Unmarshal(w.Body.Bytes(), &got) != nil || got.Kind != "Lease" || got.ResourceVersion != "50" || got.Spec.RenewTime == nil {
			t.Fatalf("lease renewal: %d %s", w.Code, w.Body)
		}
		rv = got.ResourceVersion
	}
	// Creating the cached Lease again is a conflict, as upstream.
	body, _ := json.Marshal(lease)
	if w := localWrite(t, c, kubelet, http.MethodPost, "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", "application/json", body); w.Code != 409 {
		t.Fatalf("lease create over a cached one: %d %s", w.Code, w.Body)
	}
	// Pod status by strategic merge patch; local readers see it.
	w := localWrite(t, c, kubelet, http.MethodPatch, "/api/v1/namespaces/default/pods/web/status", "application/strategic-merge-patch+json", []byte(`{"status":{"phase":"Running"}}`))
	if w.Code != 200 || !strings.Contains(w.Body.String(), `"phase":"Running"`) {
		t.Fatalf("pod status patch: %d %s", w.Code, w.Body)
	}
	r := httptest.NewRequest(http.MethodGet, "/api/v1/pods?fieldSelector=spec.nodeName%3Dedge-1", nil)
	info, _ := request.Parse(r, kubelet)
	lw := httptest.NewRecorder()
	c.Serve(lw, r, info)
	if !strings.Contains(lw.Body.String(), `"phase":"Running"`) {
		t.Fatalf("local readers do not see the overlay: %s", lw.Body)
	}
	// Not this node's pod; not this node's identity.
	if w := localWrite(t, c, kubelet, http.MethodPatch, "/api/v1/namespaces/default/pods/elsewhere/status", "application/merge-patch+json", []byte(`{"status":{"phase":"Running"}}`)); w.Code != 403 {
		t.Fatalf("another node's pod: %d %s", w.Code, w.Body)
	}
	if w := localWrite(t, c, reader, http.MethodPatch, "/api/v1/namespaces/default/pods/web/status", "application/merge-patch+json", []byte(`{}`)); w.Code != 503 {
		t.Fatalf("another identity: %d", w.Code)
	}
	// Events are journaled and replayed.
	ev := corev1.Event{ObjectMeta: metav1.ObjectMeta{Name: "web.1", Namespace: "default"}, Reason: "Started", InvolvedObject: corev1.ObjectReference{Kind: "Pod", Name: "web"}}
	body, _ = json.Marshal(ev)
	if w := localWrite(t, c, kubelet, http.MethodPost, "/api/v1/namespaces/default/events", "application/json", body); w.Code != 201 || !strings.Contains(w.Body.String(), `"uid"`) {
		t.Fatalf("event: %d %s", w.Code, w.Body)
	}
	var sent []string
	n, err := c.Local.ReplayJournal(context.Background(), 1000, answering(201, &sent))
	if err != nil || n != 1 || !strings.Contains(sent[0], "POST /api/v1/namespaces/default/events") || !strings.Contains(sent[0], "Started") {
		t.Fatalf("replay: %d %v %v", n, err, sent)
	}
	if n, _ := c.Local.ReplayJournal(context.Background(), 1000, answering(201, new([]string))); n != 0 {
		t.Fatalf("a replayed event was replayed again")
	}
	// The cloud returns: the local pod status is sent upstream (kubelet
	// thinks it was saved), then overlays are dropped.
	var patched []string
	n, err = c.Local.ReplayStatus(context.Background(), answering(200, &patched))
	if err != nil || n != 1 || !strings.Contains(patched[0], "PATCH /api/v1/namespaces/default/pods/web/status") || !strings.Contains(patched[0], `"phase":"Running"`) {
		t.Fatalf("status replay: %d %v %v", n, err, patched)
	}
	c.Local.DropOverlays()
	lw = httptest.NewRecorder()
	c.Serve(lw, r, info)
	if strings.Contains(lw.Body.String(), `"phase":"Running"`) {
		t.Fatalf("overlay survived the reconnect: %s", lw.Body)
	}
}

// TestRecordedServiceAccountTokens: a token issued to this node's kubelet
// online is handed out again offline for the same request, until expiry.
func TestRecordedServiceAccountTokens(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	c.Local.Node = "edge-1"
	bound := &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: "web", UID: "uid-1"}
	issued := authenticationv1.TokenRequest{TypeMeta: metav1.TypeMeta{Kind: "TokenRequest", APIVersion: "authentication.k8s.io/v1"},
		Spec:   authenticationv1.TokenRequestSpec{Audiences: []string{"https://kubernetes.default.svc"}, BoundObjectRef: bound},
		Status: authenticationv1.TokenRequestStatus{Token: "jwt-1", ExpirationTimestamp: metav1.NewTime(time.Now().Add(time.Hour))}}
	body, _ := json.Marshal(issued)
	target := "/api/v1/namespaces/default/serviceaccounts/default/token"
	r := httptest.NewRequest(http.MethodPost, target, nil)
	info, _ := request.Parse(r, kubelet)
	resp := &http.Response{StatusCode: 201, Header: http.Header{"Content-Type": {"application/json"}}, Body: io.NopCloser(bytes.NewReader(body)), Request: r}
	c.Tee(resp, info)
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	time.Sleep(100 * time.Millisecond)

	ask, _ := json.Marshal(authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{BoundObjectRef: bound}})
	w := localWrite(t, c, kubelet, http.MethodPost, target, "application/json", ask)
	if w.Code != 201 || !strings.Contains(w.Body.String(), `"token":"jwt-1"`) {
		t.Fatalf("offline token request: %d %s", w.Code, w.Body)
	}
	other, _ := json.Marshal(authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{BoundObjectRef: &authenticationv1.BoundObjectReference{Kind: "Pod", Name: "x", UID: "uid-2"}}})
	if w := localWrite(t, c, kubelet, http.MethodPost, target, "application/json", other); w.Code != 503 {
		t.Fatalf("never-issued token: %d %s", w.Code, w.Body)
	}
	c.Local.Now = func() time.Time { return time.Now().Add(2 * time.Hour) }
	if w := localWrite(t, c, kubelet, http.MethodPost, target, "application/json", ask); w.Code != 503 {
		t.Fatalf("expired token handed out: %d %s", w.Code, w.Body)
	}
	if w := localWrite(t, c, reader, http.MethodPost, target, "application/json", ask); w.Code != 503 {
		t.Fatalf("another identity got the kubelet's token: %d", w.Code)
	}
}

// answering is an upstream that answers every request with code, noting
// "METHOD path body" of each in sent.
func answering(code int, sent *[]string) roundTripper {
	return func(r *http.Request) (*http.Response, error) {
		body, _ := io.ReadAll(r.Body)
		*sent = append(*sent, r.Method+" "+r.URL.Path+" "+string(body))
		return &http.Response{StatusCode: code, Body: io.NopCloser(strings.NewReader("{}")), Request: r}, nil
	}
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestEndpointsFollowLocalPods: offline, a pod of this node that came back
// from a reboot with a new address is found at it through the cached
// EndpointSlices that name it, by every reader (kube-proxy, coredns), in
// lists and on watches; other nodes' endpoints and other Services' are left
// as the cloud wrote them.
func TestEndpointsFollowLocalPods(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	c.Local.Node = "edge-1"
	pod := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web-1", Namespace: "default", UID: "uid-1", ResourceVersion: "60"}, Spec: corev1.PodSpec{NodeName: "edge-1"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.1.0.5", PodIPs: []corev1.PodIP{{IP: "10.1.0.5"}}}}
	seedObject(t, c, "/v1/pods", "PodList", "v1", pod)
	here, there := "edge-1", "edge-2"
	yes := true
	slice := discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-abc", Namespace: "default", ResourceVersion: "70", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.1.0.5"}, Conditions: discoveryv1.EndpointConditions{Ready: &yes}, NodeName: &here,
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "default", Name: "web-1", UID: "uid-1"}},
			{Addresses: []string{"10.2.0.9"}, Conditions: discoveryv1.EndpointConditions{Ready: &yes}, NodeName: &there,
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "default", Name: "web-2", UID: "uid-2"}},
		},
	}
	v := store.View{Key: store.ViewKey{Identity: reader.Key(), Resource: "discovery.k8s.io/v1/endpointslices"}, ResourceVersion: "100", Kind: "EndpointSliceList", APIVersion: "discovery.k8s.io/v1"}
	raw, _ := json.Marshal(slice)
	so, err := codec.ObjectFromJSON(raw, v.Key.Resource)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Store.ReplaceView(v, []store.Object{so}); err != nil {
		t.Fatal(err)
	}
	list := func() discoveryv1.EndpointSlice {
		t.Helper()
		r := httptest.NewRequest(http.MethodGet, "/apis/discovery.k8s.io/v1/endpointslices", nil)
		info, _ := request.Parse(r, reader)
		w := httptest.NewRecorder()
		c.Serve(w, r, info)
		var l discoveryv1.EndpointSliceList
		if err := json.Unmarshal(w.Body.Bytes(), &l); err != nil || len(l.Items) != 1 {
			t.Fatalf("list: %v %s", err, w.Body)
		}
		return l.Items[0]
	}

	// A watch from before the reboot sees the change as it happens.
	r := httptest.NewRequest(http.MethodGet, "/apis/discovery.k8s.io/v1/endpointslices?watch=1&resourceVersion=100&timeoutSeconds=2", nil)
	info, _ := request.Parse(r, reader)
	events := httptest.NewRecorder()
	done := make(chan struct{})
	go func() { defer close(done); c.Serve(events, r, info) }()
	time.Sleep(200 * time.Millisecond) // the watch has begun

	// Rebooted: a new sandbox, no address yet; then its new address, ready.
	status := func(body string) {
		t.Helper()
		if w := localWrite(t, c, kubelet, http.MethodPatch, "/api/v1/namespaces/default/pods/web-1/status", "application/merge-patch+json", []byte(body)); w.Code != 200 {
			t.Fatalf("pod status: %d %s", w.Code, w.Body)
		}
	}
	status(`{"status":{"podIP":null,"podIPs":null,"conditions":[{"type":"Ready","status":"False"}]}}`)
	if e := list().Endpoints[0]; e.Addresses[0] != "10.1.0.5" || *e.Conditions.Ready {
		t.Errorf("a pod without an address yet: endpoint %+v, want the old address not ready", e)
	}
	status(`{"status":{"podIP":"10.1.0.77","podIPs":[{"ip":"10.1.0.77"}],"conditions":[{"type":"Ready","status":"True"}]}}`)
	got := list()
	if e := got.Endpoints[0]; e.Addresses[0] != "10.1.0.77" || !*e.Conditions.Ready || *e.Conditions.Terminating {
		t.Errorf("this node's endpoint does not follow its pod: %+v", e)
	}
	if e := got.Endpoints[1]; e.Addresses[0] != "10.2.0.9" {
		t.Errorf("another node's endpoint changed: %+v", e)
	}
	if got.ResourceVersion != "70" {
		t.Errorf("resourceVersion %s, want the cloud's 70", got.ResourceVersion)
	}
	<-done
	if body := events.Body.String(); !strings.Contains(body, `"MODIFIED"`) || !strings.Contains(body, `"10.1.0.77"`) {
		t.Errorf("the watch got no MODIFIED event with the new address:\n%s", body)
	}

	// The cloud returns: the derived overlay goes, and is never sent up.
	c.Local.DropOverlays()
	if e := list().Endpoints[0]; e.Addresses[0] != "10.1.0.5" {
		t.Errorf("after the cloud returned, the cached endpoint is not the cloud's: %+v", e)
	}
}
