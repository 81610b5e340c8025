package deploy

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/outposthq/outpost/internal/cloud/autonomy"
	"github.com/outposthq/outpost/test/e2e/framework"
)

const (
	// autoNode is an autonomous edge node that no kubelet runs: the test
	// writes its status and renews its Lease, then stops, as a node does
	// whose link is cut.
	autoNode = "edge-auto"
	ns       = "shop"
	// fakeTaint keeps every pod that does not tolerate it, the
	// controller's among them, off autoNode.
	fakeTaint = "outpost.test/no-kubelet"
	// toleration is what the web pods tolerate of the unreachable and
	// not-ready taints, in their own spec: without the controller they
	// would be evicted this many seconds after the node is declared
	// unreachable.
	toleration = 5
	// hold is how long the pods must stay, ready, after that.
	hold = 6 * toleration * time.Second
)

// autonomyScenario is the core of test/e2e/autonomy against the controller
// at podIP: the pods of an autonomous node get the long tolerations (from
// the toleration controller when the scheduler binds them, from the pod
// webhook when they are created bound), and while the node is unreachable
// they are neither evicted nor dropped from their Service, since the
// EndpointSlice webhook keeps their endpoints ready; once autonomy is
// withdrawn their own tolerations come back and they are evicted.
func autonomyScenario(t *testing.T, podIP string, step func(string, ...any)) {
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	admin := cp.Client()

	cut := startFakeNode(ctx, t)
	if err := cp.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// No kubelet ends these pods: the namespace first, so that no
		// ReplicaSet makes new ones, then the pods at once.
		_ = admin.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{})
		_ = admin.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}, metav1.ListOptions{})
	})
	createWeb(ctx, t)
	waitFor(ctx, t, "2 web pods bound to "+autoNode, func(ctx context.Context) (bool, string) {
		pods, err := admin.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil {
			return false, err.Error()
		}
		bound := 0
		for _, p := range pods.Items {
			if p.Spec.NodeName == autoNode {
				bound++
			}
		}
		return bound == 2, fmt.Sprintf("%d of %d bound", bound, len(pods.Items))
	})
	pods, err := admin.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
	if err != nil {
		t.Fatal(err)
	}
	var scheduled []string
	for _, p := range pods.Items {
		scheduled = append(scheduled, p.Name)
	}
	slices.Sort(scheduled)
	for _, p := range scheduled {
		waitFor(ctx, t, "the controller to set the tolerations of "+p, func(ctx context.Context) (bool, string) {
			pod, err := admin.CoreV1().Pods(ns).Get(ctx, p, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			got := framework.TolerationsOf(pod)
			return got == "forever,forever" && pod.Annotations[autonomy.AnnotationOriginalTolerations] != "", "tolerations " + got
		})
	}
	step("the controller set the tolerations of the scheduled pods %v", scheduled)

	// A pod created bound gets them in its create, from the pod webhook,
	// which the apiserver calls at the controller's pod.
	direct := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "direct", Labels: map[string]string{"app": "web"}},
		Spec:       *webPodSpec(),
	}
	direct.Spec.NodeName = autoNode
	created, err := admin.CoreV1().Pods(ns).Create(ctx, direct, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := framework.TolerationsOf(created); got != "forever,forever" || created.Annotations[autonomy.AnnotationOriginalTolerations] == "" {
		t.Fatalf("pod created bound to %s: tolerations %s, annotations %v; want forever from the webhook", autoNode, got, created.Annotations)
	}
	step("the pod webhook set the tolerations of a pod created bound")

	// The kubelet that is not there reports every pod running and ready.
	all := append(slices.Clone(scheduled), direct.Name)
	for i, p := range all {
		// Addresses in the service CIDR's static band, which no Service is
		// given unasked: nothing ever connects to them.
		ip := "10.0.0." + strconv.Itoa(200+i)
		if _, err := admin.CoreV1().Pods(ns).Patch(ctx, p, types.MergePatchType, statusPatch(ip), metav1.PatchOptions{}, "status"); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(ctx, t, "3 web endpoints ready", func(ctx context.Context) (bool, string) {
		eps, err := endpoints(ctx)
		if err != nil {
			return false, err.Error()
		}
		ready := 0
		for _, e := range eps {
			if e.ready {
				ready++
			}
		}
		return ready == 3, fmt.Sprintf("%+v", eps)
	})
	step("3 endpoints ready")

	// The cut.
	cut()
	cutAt := time.Now()
	waitFor(ctx, t, autoNode+" unreachable, its pods marked not ready", func(ctx context.Context) (bool, string) {
		n, err := admin.CoreV1().Nodes().Get(ctx, autoNode, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		if !slices.ContainsFunc(n.Spec.Taints, func(t corev1.Taint) bool {
			return t.Key == corev1.TaintNodeUnreachable && t.Effect == corev1.TaintEffectNoExecute
		}) {
			return false, fmt.Sprintf("taints %v", n.Spec.Taints)
		}
		for _, p := range all {
			pod, err := admin.CoreV1().Pods(ns).Get(ctx, p, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			if framework.PodReady(pod) {
				return false, p + " still Ready"
			}
		}
		return true, ""
	})
	tainted := time.Now()
	step("%s unreachable (tainted %.1fs after the cut), its pods not Ready", autoNode, tainted.Sub(cutAt).Seconds())

	// Every sample must hold, not just the last.
	for time.Since(tainted) < hold {
		checkKept(ctx, t, all)
		if t.Failed() {
			t.FailNow()
		}
		time.Sleep(2 * time.Second)
	}
	step("after %.0fs unreachable (%.0fx the pods' own toleration), their pods still run behind the Service", time.Since(tainted).Seconds(), time.Since(tainted).Seconds()/toleration)

	metrics, err := getMetrics(ctx, podIP)
	if err != nil {
		t.Fatal(err)
	}
	// Each is exported: SumMetric alone would count a missing one as 0.
	for _, want := range []string{"outpost_controller_endpoints_kept_ready_total", `outpost_controller_pod_patches_total{action="autonomy",result="ok"}`, "outpost_controller_leader 1"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("the controller's /metrics lacks %s", want)
		}
	}
	if v, err := framework.SumMetric(metrics, "outpost_controller_endpoints_kept_ready_total"); err != nil || v < 1 {
		t.Errorf("outpost_controller_endpoints_kept_ready_total = %v, %v; want > 0", v, err)
	}

	// Autonomy withdrawn: the pods' own tolerations come back, and the
	// taint eviction controller evicts them once those run out.
	patch := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:null}}}`, autonomy.AnnotationAutonomyDuration)
	if _, err := admin.CoreV1().Nodes().Patch(ctx, autoNode, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	withdrawn := time.Now()
	for _, p := range all {
		waitFor(ctx, t, "restore and eviction of "+p, func(ctx context.Context) (bool, string) {
			pod, err := admin.CoreV1().Pods(ns).Get(ctx, p, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			_, recorded := pod.Annotations[autonomy.AnnotationOriginalTolerations]
			return !recorded && framework.TolerationsOf(pod) == "5,5" && pod.DeletionTimestamp != nil,
				fmt.Sprintf("tolerations %s, originals recorded %v, deleted %v", framework.TolerationsOf(pod), recorded, pod.DeletionTimestamp != nil)
		})
	}
	step("autonomy withdrawn: tolerations restored and pods evicted in %.1fs", time.Since(withdrawn).Seconds())
}

// startFakeNode creates autoNode, autonomous forever, with the status of
// a ready node, and renews its Lease every second until the returned cut
// is called. Node and Lease are deleted when t ends.
func startFakeNode(ctx context.Context, t *testing.T) (cut func()) {
	t.Helper()
	admin := cp.Client()
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name:        autoNode,
			Labels:      map[string]string{corev1.LabelHostname: autoNode},
			Annotations: map[string]string{autonomy.AnnotationAutonomyDuration: "0"},
		},
		Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: fakeTaint, Effect: corev1.TaintEffectNoSchedule}}},
	}
	if _, err := admin.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	leases := admin.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = leases.Delete(ctx, autoNode, metav1.DeleteOptions{})
		_ = admin.CoreV1().Nodes().Delete(ctx, autoNode, metav1.DeleteOptions{})
	})
	now := metav1.Now()
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("4"),
		corev1.ResourceMemory: resource.MustParse("8Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	// A merge patch: kube-controller-manager writes the new Node too.
	status, err := json.Marshal(map[string]any{"status": corev1.NodeStatus{
		Capacity:    capacity,
		Allocatable: capacity,
		Conditions: []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			LastHeartbeatTime: now, LastTransitionTime: now,
		}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Nodes().Patch(ctx, autoNode, types.MergePatchType, status, metav1.PatchOptions{}, "status"); err != nil {
		t.Fatal(err)
	}
	lease := &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: autoNode},
		Spec: coordinationv1.LeaseSpec{
			HolderIdentity:       new(autoNode),
			LeaseDurationSeconds: new(int32(8)),
			RenewTime:            &metav1.MicroTime{Time: time.Now()},
		},
	}
	if _, err := leases.Create(ctx, lease, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	renewCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-renewCtx.Done():
				return
			case <-time.After(time.Second):
			}
			if l, err := leases.Get(renewCtx, autoNode, metav1.GetOptions{}); err == nil {
				l.Spec.RenewTime = &metav1.MicroTime{Time: time.Now()}
				_, _ = leases.Update(renewCtx, l, metav1.UpdateOptions{}) // a conflict is retried next tick
			}
		}
	}()
	cut = func() {
		stop()
		<-done
	}
	t.Cleanup(cut)
	waitFor(ctx, t, autoNode+" schedulable", func(ctx context.Context) (bool, string) {
		n, err := admin.CoreV1().Nodes().Get(ctx, autoNode, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		for _, taint := range n.Spec.Taints {
			if taint.Key != fakeTaint {
				return false, fmt.Sprintf("taints %v", n.Spec.Taints)
			}
		}
		return true, ""
	})
	return cut
}

// webPodSpec is the spec of the web pods: on autoNode, with short
// tolerations of their own.
func webPodSpec() *corev1.PodSpec {
	return &corev1.PodSpec{
		NodeSelector: map[string]string{corev1.LabelHostname: autoNode},
		Tolerations: []corev1.Toleration{
			{Key: fakeTaint, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule},
			{Key: corev1.TaintNodeUnreachable, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute, TolerationSeconds: new(int64(toleration))},
			{Key: corev1.TaintNodeNotReady, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute, TolerationSeconds: new(int64(toleration))},
		},
		Containers: []corev1.Container{{Name: "web", Image: "example.com/web:1", Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}},
	}
}

// createWeb creates a Deployment of two web pods, which the scheduler binds
// to autoNode after their creation, and a Service in front of them.
func createWeb(ctx context.Context, t *testing.T) {
	t.Helper()
	labels := map[string]string{"app": "web"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: appsv1.DeploymentSpec{
			Replicas: new(int32(2)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: *webPodSpec()},
		},
	}
	if _, err := cp.Client().AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Selector: labels,
			Ports:    []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	if _, err := cp.Client().CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// checkKept asserts that the pods are not evicted and their endpoints are
// ready and serving.
func checkKept(ctx context.Context, t *testing.T, pods []string) {
	t.Helper()
	for _, p := range pods {
		pod, err := cp.Client().CoreV1().Pods(ns).Get(ctx, p, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("pod %s: %v", p, err)
		}
		if pod.DeletionTimestamp != nil {
			t.Errorf("pod %s on %s evicted", p, autoNode)
		}
	}
	eps, err := endpoints(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods {
		i := slices.IndexFunc(eps, func(e endpoint) bool { return e.pod == p })
		if i < 0 {
			t.Errorf("pod %s has no endpoint: %+v", p, eps)
		} else if !eps[i].ready || !eps[i].serving {
			t.Errorf("endpoint of %s: ready=%v serving=%v, want ready", p, eps[i].ready, eps[i].serving)
		}
	}
}

type endpoint struct {
	pod            string
	ready, serving bool
}

// endpoints lists the endpoints of the web Service's EndpointSlices.
func endpoints(ctx context.Context) ([]endpoint, error) {
	list, err := cp.Client().DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=web"})
	if err != nil {
		return nil, err
	}
	var out []endpoint
	for _, s := range list.Items {
		for _, e := range s.Endpoints {
			ep := endpoint{
				ready:   e.Conditions.Ready != nil && *e.Conditions.Ready,
				serving: e.Conditions.Serving != nil && *e.Conditions.Serving,
			}
			if e.TargetRef != nil {
				ep.pod = e.TargetRef.Name
			}
			out = append(out, ep)
		}
	}
	return out, nil
}

// waitFor polls cond every 200 ms until it holds, failing the test with
// what was awaited and cond's last word when ctx ends.
func waitFor(ctx context.Context, t *testing.T, what string, cond func(ctx context.Context) (bool, string)) {
	t.Helper()
	deadline, ok := ctx.Deadline()
	if !ok {
		t.Fatalf("waiting for %s: the context has no deadline", what)
	}
	if _, err := framework.Poll(ctx, 200*time.Millisecond, time.Until(deadline), cond); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}
