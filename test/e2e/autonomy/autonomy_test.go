// Package e2e tests outpost-controller against a real control plane:
// kube-apiserver, kube-controller-manager (node lifecycle, taint eviction,
// endpointslices, deployments), kube-scheduler and kwok nodes. It checks the
// product promise end to end: pods on an autonomous node that stops
// heartbeating are neither evicted nor dropped from their Service, while
// the same pods on an ordinary node are.
package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/outposthq/outpost/internal/cloud/autonomy"
	"github.com/outposthq/outpost/test/e2e/framework"
)

// toleration is the apiserver's default tolerationSeconds for the
// unreachable and not-ready taints here: short, so an ordinary node's pods
// are evicted within seconds of it being declared unreachable.
const toleration = 5

// gracePeriod is kube-controller-manager's --node-monitor-grace-period:
// how long a node may stay silent before it is declared unreachable. kwok
// renews leases every 2 s here (--node-lease-duration-seconds=8).
const gracePeriod = 10 * time.Second

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	os.Exit(framework.Run(m, framework.EvictionOptions(toleration, gracePeriod), &cp))
}

const (
	autoNode    = "edge-auto"  // annotated autonomous
	plainNode   = "edge-plain" // an ordinary node
	healthyNode = "cloud-ok"   // keeps heartbeating, so kube-controller-manager stays out of disruption mode
	ns          = "shop"
)

func TestAutonomousNodeKeepsPodsAndEndpoints(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 170*time.Second)
	defer cancel()
	admin := cp.Client()
	begin := time.Now()
	step := func(format string, args ...any) {
		t.Logf("%6.1fs "+format, append([]any{time.Since(begin).Seconds()}, args...)...)
	}

	metricsURL := startController(ctx, t)
	step("controller ready")

	// Three kwok nodes. kube-controller-manager judges a zone disrupted,
	// and evicts nothing, once more than 2 nodes and 55% are unhealthy:
	// with one healthy node out of three it keeps evicting.
	for _, name := range []string{autoNode, plainNode, healthyNode} {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
			Name:        name,
			Labels:      map[string]string{corev1.LabelHostname: name},
			Annotations: map[string]string{framework.KwokNodeAnnotation: "fake"},
		}}
		if name == autoNode {
			n.Annotations[autonomy.AnnotationAutonomyDuration] = "0"
		}
		if _, err := admin.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := cp.StartKwok(ctx, "--node-lease-duration-seconds=8"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cp.StopKwok() })
	for _, name := range []string{autoNode, plainNode, healthyNode} {
		framework.WaitFor(ctx, t, "node "+name+" Ready", func(ctx context.Context) (bool, error) {
			n, err := admin.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			return err == nil && nodeReady(n) == corev1.ConditionTrue, nil
		})
	}
	step("nodes ready")

	// A Deployment spread over the two edge nodes, behind a Service. The
	// scheduler binds its pods after creation, so on the autonomous node
	// the controller sets their tolerations.
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	createWeb(ctx, t, admin)
	deployPods := waitDeployment(ctx, t, admin)
	step("deployment running: %v", deployPods)
	for _, p := range deployPods[autoNode] {
		framework.WaitFor(ctx, t, "controller to set tolerations of "+p, func(ctx context.Context) (bool, error) {
			pod, err := admin.CoreV1().Pods(ns).Get(ctx, p, metav1.GetOptions{})
			return err == nil && framework.TolerationsOf(pod) == "forever,forever" && pod.Annotations[autonomy.AnnotationOriginalTolerations] != "", nil
		})
	}
	for _, p := range deployPods[plainNode] {
		pod, err := admin.CoreV1().Pods(ns).Get(ctx, p, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := framework.TolerationsOf(pod); got != "5,5" {
			t.Errorf("pod %s on the ordinary node: tolerations %s, want the defaults 5,5", p, got)
		}
	}
	step("controller set tolerations of scheduled pods")

	// Pods created already bound get their tolerations from the webhook,
	// in the create itself: no window at all.
	direct := barePod("direct")
	created, err := admin.CoreV1().Pods(ns).Create(ctx, direct, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := framework.TolerationsOf(created); got != "forever,forever" || created.Annotations[autonomy.AnnotationOriginalTolerations] == "" {
		t.Errorf("pod created bound to %s: tolerations %s, annotations %v; want forever from the webhook", autoNode, got, created.Annotations)
	}
	// A pod that will be failing before the cut.
	if _, err := admin.CoreV1().Pods(ns).Create(ctx, barePod("crashy"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	autoGood := append(slices.Clone(deployPods[autoNode]), "direct")
	framework.WaitFor(ctx, t, "all 6 endpoints ready", func(ctx context.Context) (bool, error) {
		eps, err := endpoints(ctx, admin)
		if err != nil || len(eps) != 6 {
			return false, err
		}
		for _, e := range eps {
			if !e.ready {
				return false, nil
			}
		}
		return true, nil
	})
	step("6 endpoints ready")

	// The cut. The healthy node's lease is renewed by hand from here on.
	go renewLease(ctx, admin, healthyNode)
	if err := cp.StopKwok(); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	crashLoop(ctx, t, admin, "crashy") // the kubelet's last word on it, just before the cut
	step("kwok stopped: %s and %s are silent", autoNode, plainNode)

	// The ordinary node's pods are evicted after the toleration.
	for _, p := range deployPods[plainNode] {
		framework.WaitFor(ctx, t, "eviction of "+p, func(ctx context.Context) (bool, error) {
			pod, err := admin.CoreV1().Pods(ns).Get(ctx, p, metav1.GetOptions{})
			return err == nil && pod.DeletionTimestamp != nil, nil
		})
	}
	evicted := time.Now()
	step("pods of %s evicted, %.1fs after the cut", plainNode, evicted.Sub(cut).Seconds())
	n, err := admin.CoreV1().Nodes().Get(ctx, autoNode, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if nodeReady(n) != corev1.ConditionUnknown || !hasTaint(n, corev1.TaintNodeUnreachable) {
		t.Fatalf("%s: Ready %s, taints %v; want it unreachable by now", autoNode, nodeReady(n), n.Spec.Taints)
	}

	// The autonomous node's pods stay, and stay behind the Service, for
	// many times the toleration. Every sample must hold, not just the last.
	hold := 6 * toleration * time.Second
	step("holding for %v", hold)
	for deadline := time.Now().Add(hold); time.Now().Before(deadline); {
		checkAutonomousPods(ctx, t, admin, autoGood)
		if t.Failed() {
			t.FailNow()
		}
		time.Sleep(2 * time.Second)
	}
	step("after %.0fs of silence (%.0fx the toleration), %s still runs its pods behind the Service",
		time.Since(cut).Seconds(), time.Since(cut).Seconds()/toleration, autoNode)
	// The node lifecycle controller did mark them not ready: the webhook
	// did real work.
	pod, err := admin.CoreV1().Pods(ns).Get(ctx, autoGood[0], metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if podCondition(pod, corev1.PodReady) != corev1.ConditionFalse {
		t.Errorf("pod %s: Ready %s; want False from the node lifecycle controller", pod.Name, podCondition(pod, corev1.PodReady))
	}
	body, err := framework.GetOK(ctx, nil, metricsURL+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics := string(body)
	// Each is exported: SumMetric alone would count a missing one as 0.
	for _, want := range []string{"outpost_controller_endpoints_kept_ready_total", `outpost_controller_pod_patches_total{action="autonomy",result="ok"}`, "outpost_controller_leader 1"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if v, err := framework.SumMetric(metrics, "outpost_controller_endpoints_kept_ready_total"); err != nil || v < 1 {
		t.Errorf("outpost_controller_endpoints_kept_ready_total = %v, %v; want > 0", v, err)
	}

	// Autonomy withdrawn: the original tolerations come back, and the taint
	// eviction controller evicts once they run out (its clock restarts at
	// the pod update).
	patch := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:null}}}`, autonomy.AnnotationAutonomyDuration)
	if _, err := admin.CoreV1().Nodes().Patch(ctx, autoNode, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	withdrawn := time.Now()
	for _, p := range append(slices.Clone(autoGood), "crashy") {
		framework.WaitFor(ctx, t, "restore and eviction of "+p, func(ctx context.Context) (bool, error) {
			pod, err := admin.CoreV1().Pods(ns).Get(ctx, p, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			_, recorded := pod.Annotations[autonomy.AnnotationOriginalTolerations]
			return !recorded && framework.TolerationsOf(pod) == "5,5" && pod.DeletionTimestamp != nil, nil
		})
	}
	step("autonomy withdrawn: originals restored and pods evicted in %.1fs", time.Since(withdrawn).Seconds())
}

// checkAutonomousPods asserts that the given pods on the autonomous node
// are not evicted and are ready in the Service, that the pod which was
// failing before the cut is not, and that the ordinary node's are not.
func checkAutonomousPods(ctx context.Context, t *testing.T, c kubernetes.Interface, good []string) {
	t.Helper()
	for _, p := range append(slices.Clone(good), "crashy") {
		pod, err := c.CoreV1().Pods(ns).Get(ctx, p, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("pod %s: %v", p, err)
		}
		if pod.DeletionTimestamp != nil {
			t.Errorf("pod %s on %s evicted", p, autoNode)
		}
	}
	eps, err := endpoints(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range eps {
		switch {
		case slices.Contains(good, e.pod) && (!e.ready || !e.serving):
			t.Errorf("endpoint of %s: ready=%v serving=%v, want ready", e.pod, e.ready, e.serving)
		case e.pod == "crashy" && e.ready:
			t.Errorf("endpoint of crashy (failing before the cut) is ready")
		case e.node == plainNode && e.ready:
			t.Errorf("endpoint of %s on the ordinary node is ready", e.pod)
		}
	}
}

// startController runs outpost-controller in-process as its ServiceAccount
// would: with the RBAC of deploy/rbac.yaml bound to that identity, and the
// webhook configuration of deploy/webhook.yaml pointed at 127.0.0.1, since
// the apiserver runs on the host. It returns the metrics base URL.
func startController(ctx context.Context, t *testing.T) string {
	t.Helper()
	root, err := framework.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	deploy := filepath.Join(root, "deploy")
	if out, err := cp.Kubectl(ctx, "", "apply", "-f", filepath.Join(deploy, "namespace.yaml"), "-f", filepath.Join(deploy, "rbac.yaml")); err != nil {
		t.Fatalf("%v: %s", err, out)
	}

	hookPort, metricsPort := framework.FreePort(t), framework.FreePort(t)
	raw, err := os.ReadFile(filepath.Join(deploy, "webhook.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg admissionregistrationv1.MutatingWebhookConfiguration
	if err := yaml.UnmarshalStrict(raw, &cfg); err != nil {
		t.Fatalf("deploy/webhook.yaml: %v", err)
	}
	for i := range cfg.Webhooks {
		cc := &cfg.Webhooks[i].ClientConfig
		cc.URL = new(fmt.Sprintf("https://127.0.0.1:%d%s", hookPort, *cc.Service.Path))
		cc.Service = nil
	}
	if _, err := cp.Client().AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, &cfg, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating the webhook configuration of deploy/webhook.yaml: %v", err)
	}

	sa := "system:serviceaccount:" + autonomy.DefaultNamespace + ":" + autonomy.DefaultName
	crt, key, err := cp.IssueClientCert("outpost-controller", sa, "system:serviceaccounts", "system:serviceaccounts:"+autonomy.DefaultNamespace)
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(cp.Dir, "outpost-controller.kubeconfig")
	if err := framework.WriteKubeconfig(kubeconfig, cp.URL(0), cp.CAFile, crt, key, ""); err != nil {
		t.Fatal(err)
	}

	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
	done := runController(t, autonomy.Config{
		Kubeconfig:     kubeconfig,
		MetricsAddress: fmt.Sprintf("127.0.0.1:%d", metricsPort),
		Webhook: autonomy.Webhook{
			Address: fmt.Sprintf("127.0.0.1:%d", hookPort),
			Hosts:   []string{"127.0.0.1"},
		},
	}, logger)

	metricsURL := fmt.Sprintf("http://127.0.0.1:%d", metricsPort)
	framework.WaitFor(ctx, t, "controller /readyz and the CA bundle in the webhook configuration", func(ctx context.Context) (bool, error) {
		select {
		case err := <-done:
			return false, fmt.Errorf("controller exited: %v", err)
		default:
		}
		if _, err := framework.GetOK(ctx, nil, metricsURL+"/readyz"); err != nil {
			return false, nil
		}
		got, err := cp.Client().AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, cfg.Name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, wh := range got.Webhooks {
			if len(wh.ClientConfig.CABundle) == 0 {
				return false, nil
			}
		}
		return true, nil
	})
	return metricsURL
}

func createWeb(ctx context.Context, t *testing.T, c kubernetes.Interface) {
	t.Helper()
	labels := map[string]string{"app": "web"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: new(int32(4)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					Containers: []corev1.Container{{Name: "web", Image: "example.com/web:1", Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}},
					// Two pods on each edge node, none on the healthy one.
					Affinity: &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
						RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
							MatchExpressions: []corev1.NodeSelectorRequirement{{Key: corev1.LabelHostname, Operator: corev1.NodeSelectorOpIn, Values: []string{autoNode, plainNode}}},
						}}},
					}},
					TopologySpreadConstraints: []corev1.TopologySpreadConstraint{{
						MaxSkew: 1, TopologyKey: corev1.LabelHostname, WhenUnsatisfiable: corev1.DoNotSchedule,
						LabelSelector: &metav1.LabelSelector{MatchLabels: labels},
					}},
				},
			},
		},
	}
	if _, err := c.AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns},
		Spec: corev1.ServiceSpec{
			Selector: labels,
			Ports:    []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	if _, err := c.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// waitDeployment waits for the Deployment's pods to run, two on each edge
// node, and returns their names by node.
func waitDeployment(ctx context.Context, t *testing.T, c kubernetes.Interface) map[string][]string {
	t.Helper()
	var byNode map[string][]string
	framework.WaitFor(ctx, t, "4 web pods running, 2 per edge node", func(ctx context.Context) (bool, error) {
		pods, err := c.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil {
			return false, err
		}
		byNode = map[string][]string{}
		for _, p := range pods.Items {
			if p.Status.Phase == corev1.PodRunning && podCondition(&p, corev1.PodReady) == corev1.ConditionTrue {
				byNode[p.Spec.NodeName] = append(byNode[p.Spec.NodeName], p.Name)
			}
		}
		return len(byNode[autoNode]) == 2 && len(byNode[plainNode]) == 2, nil
	})
	return byNode
}

// barePod is a pod of the Service created bound to the autonomous node.
func barePod(name string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{
			NodeName:   autoNode,
			Containers: []corev1.Container{{Name: "web", Image: "example.com/web:1", Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}},
		},
	}
}

// crashLoop reports a pod as its kubelet would in CrashLoopBackOff.
func crashLoop(ctx context.Context, t *testing.T, c kubernetes.Interface, name string) {
	t.Helper()
	pod, err := c.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	now := metav1.Now()
	for i := range pod.Status.Conditions {
		if ct := pod.Status.Conditions[i].Type; ct == corev1.PodReady || ct == corev1.ContainersReady {
			pod.Status.Conditions[i].Status = corev1.ConditionFalse
			pod.Status.Conditions[i].Reason = "ContainersNotReady"
			pod.Status.Conditions[i].LastTransitionTime = now
		}
	}
	for i := range pod.Status.ContainerStatuses {
		cs := &pod.Status.ContainerStatuses[i]
		cs.Ready, cs.RestartCount, cs.Started = false, 3, new(false)
		cs.State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff", Message: "back-off 40s restarting failed container"}}
	}
	if _, err := c.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// renewLease keeps a node alive for the node lifecycle controller, as its
// kubelet would, until ctx is done.
func renewLease(ctx context.Context, c kubernetes.Interface, node string) {
	leases := c.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	for {
		if l, err := leases.Get(ctx, node, metav1.GetOptions{}); err == nil {
			l.Spec.RenewTime = &metav1.MicroTime{Time: time.Now()}
			_, _ = leases.Update(ctx, l, metav1.UpdateOptions{}) // a conflict is retried next tick
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}

type endpointInfo struct {
	pod, node            string
	ready, serving, term bool
}

func endpoints(ctx context.Context, c kubernetes.Interface) ([]endpointInfo, error) {
	list, err := c.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=web"})
	if err != nil {
		return nil, err
	}
	var out []endpointInfo
	for _, s := range list.Items {
		for _, e := range s.Endpoints {
			info := endpointInfo{
				ready:   e.Conditions.Ready != nil && *e.Conditions.Ready,
				serving: e.Conditions.Serving != nil && *e.Conditions.Serving,
				term:    e.Conditions.Terminating != nil && *e.Conditions.Terminating,
			}
			if e.TargetRef != nil {
				info.pod = e.TargetRef.Name
			}
			if e.NodeName != nil {
				info.node = *e.NodeName
			}
			out = append(out, info)
		}
	}
	return out, nil
}

func nodeReady(n *corev1.Node) corev1.ConditionStatus {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status
		}
	}
	return ""
}

func hasTaint(n *corev1.Node, key string) bool {
	for _, t := range n.Spec.Taints {
		if t.Key == key {
			return true
		}
	}
	return false
}

func podCondition(p *corev1.Pod, t corev1.PodConditionType) corev1.ConditionStatus {
	for _, c := range p.Status.Conditions {
		if c.Type == t {
			return c.Status
		}
	}
	return ""
}

// runController runs outpost-controller in-process with cfg until the test
// ends, then stops it and checks it stopped cleanly within 20 s. The
// channel receives Run's result if it returns first.
func runController(t *testing.T, cfg autonomy.Config, logger *slog.Logger) <-chan error {
	t.Helper()
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- autonomy.Run(ctx, cfg, logger) }()
	t.Cleanup(func() {
		stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("controller: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("controller did not stop within 20s")
		}
	})
	return done
}
