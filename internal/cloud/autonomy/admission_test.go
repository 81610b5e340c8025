package autonomy

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/outposthq/outpost/internal/cloud/autonomy/webhook"
)

func node(name string, annotations map[string]string, down bool) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: annotations}}
	status := corev1.ConditionTrue
	if down {
		status = corev1.ConditionUnknown
	}
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: status}}
	return n
}

var autonomous = map[string]string{AnnotationAutonomyDuration: "0"}

// runningPod is a pod as the node lifecycle controller leaves it after the
// cut: Ready False, the kubelet's ContainersReady still True.
func runningPod(name, nodeName string, containersReady bool) *corev1.Pod {
	cr := corev1.ConditionTrue
	if !containersReady {
		cr = corev1.ConditionFalse
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, UID: types.UID("uid-" + name)},
		Spec:       corev1.PodSpec{NodeName: nodeName},
		Status: corev1.PodStatus{
			Phase: corev1.PodRunning,
			Conditions: []corev1.PodCondition{
				{Type: corev1.PodReady, Status: corev1.ConditionFalse},
				{Type: corev1.ContainersReady, Status: cr},
			},
		},
	}
}

// fakeAdmission builds an Admission over in-memory listers.
func fakeAdmission(t *testing.T, objs ...runtime.Object) *Admission {
	t.Helper()
	nodes := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	pods := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	for _, o := range objs {
		var err error
		switch o.(type) {
		case *corev1.Node:
			err = nodes.Add(o)
		case *corev1.Pod:
			err = pods.Add(o)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return &Admission{
		Nodes:  corelisters.NewNodeLister(nodes),
		Pods:   corelisters.NewPodLister(pods),
		Synced: func() bool { return true },
	}
}

func endpoint(pod *corev1.Pod, ready bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{"10.0.0.1"},
		Conditions: discoveryv1.EndpointConditions{Ready: new(ready), Serving: new(ready), Terminating: new(false)},
		NodeName:   new(pod.Spec.NodeName),
		TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID},
	}
}

func review(t *testing.T, obj any, op admissionv1.Operation) *admissionv1.AdmissionRequest {
	t.Helper()
	raw, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	return &admissionv1.AdmissionRequest{UID: "r1", Namespace: "ns", Operation: op, Object: runtime.RawExtension{Raw: raw}}
}

func TestMutateEndpointSlice(t *testing.T) {
	upAuto := node("up-auto", autonomous, false)
	downAuto := node("down-auto", autonomous, true)
	downPlain := node("down-plain", nil, true)
	tainted := node("tainted-auto", autonomous, false)
	tainted.Spec.Taints = []corev1.Taint{{Key: corev1.TaintNodeUnreachable, Effect: corev1.TaintEffectNoExecute}}

	good := runningPod("good", "down-auto", true)
	crashing := runningPod("crashing", "down-auto", false)
	onPlain := runningPod("on-plain", "down-plain", true)
	onUp := runningPod("on-up", "up-auto", true)
	onTainted := runningPod("on-tainted", "tainted-auto", true)
	gated := runningPod("gated", "down-auto", true)
	gated.Spec.ReadinessGates = []corev1.PodReadinessGate{{ConditionType: "example.com/lb"}}
	gated.Status.Conditions = append(gated.Status.Conditions, corev1.PodCondition{Type: "example.com/lb", Status: corev1.ConditionFalse})
	pending := runningPod("pending", "down-auto", true)
	pending.Status.Phase = corev1.PodPending
	downDead := node("down-dead", autonomous, true)
	onDead := runningPod("on-dead", "down-dead", true)

	a := fakeAdmission(t, upAuto, downAuto, downPlain, tainted, good, crashing, onPlain, onUp, onTainted, gated, pending, downDead, onDead)
	a.Peers = withdrawnSet{"down-dead": true}

	recreated := endpoint(good, false)
	recreated.TargetRef.UID = "other"
	terminating := endpoint(good, false)
	terminating.Conditions.Terminating = new(true)
	noConditions := endpoint(good, false)
	noConditions.Conditions = discoveryv1.EndpointConditions{}

	tests := []struct {
		name string
		ep   discoveryv1.Endpoint
		want bool // made ready
	}{
		{"ready at the cut, node unreachable", endpoint(good, false), true},
		{"no conditions at all", noConditions, true},
		{"tainted unreachable", endpoint(onTainted, false), true},
		{"crashing before the cut", endpoint(crashing, false), false},
		{"readiness gate false", endpoint(gated, false), false},
		{"not running", endpoint(pending, false), false},
		{"node not autonomous", endpoint(onPlain, false), false},
		{"autonomy withdrawn by the node's peers", endpoint(onDead, false), false},
		{"node reachable", endpoint(onUp, false), false},
		{"already ready", endpoint(good, true), false},
		{"terminating", terminating, false},
		{"another pod of that name", recreated, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			slice := &discoveryv1.EndpointSlice{
				ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: "web-abc"},
				AddressType: discoveryv1.AddressTypeIPv4,
				// A ready endpoint first, so indexes are exercised.
				Endpoints: []discoveryv1.Endpoint{endpoint(onUp, true), tt.ep},
			}
			kept := 0
			a.KeptReady = func() { kept++ }
			ops, err := a.MutateEndpointSlice(t.Context(), review(t, slice, admissionv1.Update))
			if err != nil {
				t.Fatal(err)
			}
			if !tt.want {
				if ops != nil {
					t.Fatalf("patch = %+v, want none", ops)
				}
				return
			}
			var got discoveryv1.EndpointSlice
			applyJSON(t, slice, ops, &got)
			c := got.Endpoints[1].Conditions
			if c.Ready == nil || !*c.Ready || c.Serving == nil || !*c.Serving {
				t.Errorf("conditions = %+v, want ready and serving", c)
			}
			if c.Terminating != nil && *c.Terminating {
				t.Error("terminating set")
			}
			if kept != 1 {
				t.Errorf("KeptReady called %d times, want 1", kept)
			}
		})
	}
}

// TestMutateEndpointSliceLaggingCache covers the race in which the pod's
// Ready flip reaches us before the node's Ready Unknown does: the pod's
// mark sends us to the apiserver.
func TestMutateEndpointSliceLaggingCache(t *testing.T) {
	cached := node("edge", autonomous, false) // the cache has not seen the cut
	pod := runningPod("web", "edge", true)
	a := fakeAdmission(t, cached, pod)
	calls := 0
	a.GetNode = func(ctx context.Context, name string) (*corev1.Node, error) {
		calls++
		return node(name, autonomous, true), nil
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web-abc"},
		Endpoints:  []discoveryv1.Endpoint{endpoint(pod, false), endpoint(pod, false)},
	}
	ops, err := a.MutateEndpointSlice(t.Context(), review(t, slice, admissionv1.Update))
	if err != nil {
		t.Fatal(err)
	}
	if len(ops) != 2 {
		t.Fatalf("patch = %+v, want both endpoints made ready", ops)
	}
	if calls != 1 {
		t.Errorf("apiserver read %d times, want once per node and review", calls)
	}

	// A pod without the mark (the kubelet itself reported it not ready)
	// never costs an apiserver read.
	calls = 0
	notMarked := runningPod("web", "edge", false)
	a = fakeAdmission(t, cached, notMarked)
	a.GetNode = func(context.Context, string) (*corev1.Node, error) { calls++; return nil, errors.New("unexpected") }
	if ops, _ := a.MutateEndpointSlice(t.Context(), review(t, slice, admissionv1.Update)); ops != nil || calls != 0 {
		t.Errorf("ops %+v, %d reads; want none", ops, calls)
	}
}

func TestMutateEndpointSliceNotSynced(t *testing.T) {
	pod := runningPod("web", "edge", true)
	a := fakeAdmission(t, node("edge", autonomous, true), pod)
	a.Synced = func() bool { return false }
	slice := &discoveryv1.EndpointSlice{Endpoints: []discoveryv1.Endpoint{endpoint(pod, false)}}
	if _, err := a.MutateEndpointSlice(t.Context(), review(t, slice, admissionv1.Create)); !errors.Is(err, errCacheNotSynced) {
		t.Errorf("err = %v, want errCacheNotSynced", err)
	}
	// Nothing to judge: no need to be synced.
	slice.Endpoints[0].Conditions.Ready = new(true)
	if ops, err := a.MutateEndpointSlice(t.Context(), review(t, slice, admissionv1.Create)); ops != nil || err != nil {
		t.Errorf("ops %+v, err %v; want none", ops, err)
	}
}

func TestMutatePod(t *testing.T) {
	a := fakeAdmission(t, node("auto", map[string]string{AnnotationAutonomyDuration: "2h"}, false), node("plain", nil, false),
		node("typo", map[string]string{AnnotationAutonomyDuration: "2 hours"}, false),
		node("dead", map[string]string{AnnotationAutonomyDuration: "2h"}, true))
	a.Peers = withdrawnSet{"dead": true}
	newPod := func(nodeName string) *corev1.Pod {
		p := boundPod(defaults()...)
		p.Spec.NodeName = nodeName
		return p
	}
	tests := []struct {
		name  string
		pod   *corev1.Pod
		op    admissionv1.Operation
		wantS string // unreachable tolerationSeconds after; "" means no patch
	}{
		{"bound to autonomous node", newPod("auto"), admissionv1.Create, "7200"},
		{"bound to plain node", newPod("plain"), admissionv1.Create, ""},
		{"invalid annotation", newPod("typo"), admissionv1.Create, ""},
		{"unknown node", newPod("nowhere"), admissionv1.Create, ""},
		{"autonomy withdrawn by the node's peers", newPod("dead"), admissionv1.Create, ""},
		{"unbound", newPod(""), admissionv1.Create, ""},
		{"update is not ours", newPod("auto"), admissionv1.Update, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ops, err := a.MutatePod(t.Context(), review(t, tt.pod, tt.op))
			if err != nil {
				t.Fatal(err)
			}
			if tt.wantS == "" {
				if ops != nil {
					t.Fatalf("patch = %+v, want none", ops)
				}
				return
			}
			got := applyPatch(t, tt.pod, ops)
			if s := seconds(got, unreachableKey); !equal(s, []string{tt.wantS}) {
				t.Errorf("unreachable = %v, want %s", s, tt.wantS)
			}
			if _, ok := got.Annotations[AnnotationOriginalTolerations]; !ok {
				t.Error("no record of the originals")
			}
		})
	}
}

// applyJSON applies a JSON patch to obj and decodes the result into out.
func applyJSON(t *testing.T, obj any, ops []webhook.Op, out any) {
	t.Helper()
	doc, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	res := applyRaw(t, doc, ops)
	if err := json.Unmarshal(res, out); err != nil {
		t.Fatal(err)
	}
}
