// Package e2e tests the peers' verdicts end to end on a real control plane:
// kube-apiserver (RBAC, the Node authorizer, NodeRestriction and the
// admission policy of deploy/peer-reports.yaml), kube-controller-manager
// (node lifecycle, taint eviction, ReplicaSets) and kube-scheduler, with
// outpost-controller running as its ServiceAccount and one outpost process
// per edge node, each with its own node identity, probing its peers over
// loopback addresses. The nodes' kubelets are the test: each heartbeats
// through its node's outpost with the node's credentials, as kubelet would,
// so cutting an outpost's uplink silences the node for the cloud while its
// outpost keeps answering its peers.
package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/internal/cloud/autonomy"
	"github.com/outposthq/outpost/internal/cloud/peerhealth"
	"github.com/outposthq/outpost/internal/peer"
	"github.com/outposthq/outpost/test/e2e/framework"
)

const (
	// toleration is the apiserver's default tolerationSeconds of the
	// unreachable taint here: an ordinary node's pods go 5 s after it.
	toleration = 5
	// monitorGrace is kube-controller-manager's --node-monitor-grace-period.
	monitorGrace = 8 * time.Second
	// peerGrace is outpost-controller's --peer-grace-period.
	peerGrace = 8 * time.Second
	// reportValidity is outpost-controller's --peer-report-validity: three
	// of the outposts' --peer-report-interval.
	reportValidity = 3 * time.Second
	site           = "shop-1"
	otherSite      = "shop-2"
	ns             = "shop"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	os.Exit(framework.Run(m, framework.EvictionOptions(toleration, monitorGrace), &cp))
}

// edge is one node of the site: its outpost, the link to the cloud it is
// behind, and its kubelet's heartbeat.
type edge struct {
	name string
	o    *framework.Outpost
	link *framework.FaultProxy
	stop context.CancelFunc // stops the heartbeat
	done chan struct{}
}

// The whole story of issue 18 on one site of three autonomous nodes, a, b
// and c, and a node d at another site that keeps the cluster out of
// kube-controller-manager's "every zone is down" mode, so that it does
// evict:
//
//  1. b's uplink is cut: a and c still reach b, its pods stay.
//  2. b stops entirely and c's uplink is cut: only a can report, plus forged
//     reports (a node writing another's report, a non-node, a node of
//     another site lying about b): nothing is withdrawn, b's pods stay.
//  3. c's uplink returns: a and c are a quorum saying b is down; after the
//     grace period b's pods are evicted and replaced on the live nodes.
//  4. a's and c's uplinks are cut, the whole site is silent: nothing is
//     reported and nothing evicted, though every node is tainted.
func TestPeersTellDeadFromCut(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Second)
	defer cancel()
	admin := cp.Client()
	begin := time.Now()
	step := func(format string, args ...any) {
		t.Logf("%6.1fs "+format, append([]any{time.Since(begin).Seconds()}, args...)...)
	}

	root, err := framework.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	// StartControllerT applies deploy/namespace.yaml and deploy/rbac.yaml;
	// the admission policy is the rest of what the reports need.
	if out, err := cp.Kubectl(ctx, "", "apply", "-f", filepath.Join(root, "deploy", "peer-reports.yaml")); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	ctl := cp.StartControllerT(t, "--peer-grace-period="+peerGrace.String(), "--peer-report-validity="+reportValidity.String())
	step("outpost-controller ready")

	for _, n := range []struct{ name, zone string }{{"a", site}, {"b", site}, {"c", site}, {"d", otherSite}} {
		createNode(ctx, t, admin, n.name, n.zone, n.zone == site)
	}
	dCtx, dStop := context.WithCancel(ctx)
	defer dStop()
	go heartbeat(dCtx, admin, "d")

	edges := map[string]*edge{}
	for i, name := range []string{"a", "b", "c"} {
		addr := fmt.Sprintf("127.0.0.%d:%d", i+2, framework.FreePort(t))
		o, link := cp.StartOutpostWithLinkT(t, name, append([]string{
			"--peer-address=" + addr, "--peer-probe-interval=500ms", "--peer-probe-timeout=1s",
			"--peer-failure-threshold=2", "--peer-report-interval=1s",
		}, framework.LenientProbes...)...)
		e := &edge{name: name, o: o, link: link, done: make(chan struct{})}
		client := kubernetes.NewForConfigOrDie(withTimeout(o.ClientConfig(o.NodeCertFile, o.NodeKeyFile, "")))
		var hctx context.Context
		hctx, e.stop = context.WithCancel(ctx)
		go func() { defer close(e.done); heartbeat(hctx, client, name) }()
		t.Cleanup(func() { e.stop(); <-e.done })
		edges[name] = e
	}
	step("outposts of a, b, c online, heartbeating through them")

	// Each node reports the other two reachable.
	for _, name := range []string{"a", "b", "c"} {
		waitReport(ctx, t, admin, name, func(r peer.Report) bool {
			return len(r.Reachable) == 2 && len(r.Unreachable) == 0 && r.Site == site
		}, "reaching its two peers")
	}
	for _, name := range []string{"a", "b", "c"} {
		if v, err := edges[name].o.Metric("outpost_peer_probes_total", "result=reached"); err != nil || v < 2 {
			t.Errorf("outpost of %s: outpost_peer_probes_total{result=reached} = %v (%v), want its two peers probed", name, v, err)
		}
	}
	step("every node reports its two peers reachable")

	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	createWeb(ctx, t, admin)
	pods := map[string]string{} // node → its web pod
	framework.WaitFor(ctx, t, "3 web pods, one per node of the site, with autonomy's tolerations", func(ctx context.Context) (bool, error) {
		list, err := admin.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		clear(pods)
		for _, p := range list.Items {
			if p.Spec.NodeName != "" && framework.TolerationsOf(&p) == "forever,forever" {
				pods[p.Spec.NodeName] = p.Name
			}
		}
		return len(pods) == 3, nil
	})
	step("web pods %v", pods)

	// 1. b's uplink is cut; its outpost still answers its peers.
	edges["b"].link.Blackhole()
	waitUnreachable(ctx, t, admin, "b")
	step("b unreachable for the cloud")
	waitVerdict(ctx, t, ctl, peerhealth.Alive, 1)
	waitEvent(ctx, t, admin, "b", peerhealth.ReasonPeersReach)
	step("verdict on b: alive (event %s)", peerhealth.ReasonPeersReach)
	hold(ctx, t, admin, peerGrace+4*time.Second, pods, "a", "b", "c")
	step("b's pod kept for the grace period and more")

	// 2. b stops entirely; c is cut off, so a alone can report. And forged
	// reports, which the apiserver refuses or the controller ignores.
	edges["b"].stop()
	<-edges["b"].done
	edges["b"].o.Kill()
	edges["c"].link.Blackhole()
	step("b stopped (outpost killed, no heartbeat); c's uplink cut")
	forge(ctx, t)
	step("forged reports refused or written")
	// d's report, claiming an hour, counts (as ignored: another site) only
	// for --peer-report-validity after the controller saw it written.
	wctx, wcancel := context.WithTimeout(ctx, reportValidity+5*time.Second)
	framework.WaitFor(wctx, t, "d's report seen by the controller (as of another site)", func(ctx context.Context) (bool, error) {
		return metric(ctx, t, ctl, "outpost_controller_peer_reports_other_site") >= 1, nil
	})
	wcancel()
	waitReport(ctx, t, admin, "a", func(r peer.Report) bool { return slices.Contains(r.Unreachable, "b") }, "b unreachable")
	framework.WaitFor(ctx, t, "c's last report to go stale", func(ctx context.Context) (bool, error) {
		return !readReport(ctx, t, admin, "c").Fresh(time.Now()), nil
	})
	lone := time.Now()
	step("a reports b unreachable; c's last report is stale")
	hold(ctx, t, admin, peerGrace+4*time.Second, pods, "a", "b", "c")
	if hasEvent(ctx, t, admin, "b", peerhealth.ReasonPeersCannot) {
		t.Fatalf("one peer and a node of another site were enough for %s on b", peerhealth.ReasonPeersCannot)
	}
	if r := readReport(ctx, t, admin, "d"); !r.Fresh(time.Now()) {
		t.Errorf("d's forged report %+v should claim to hold for an hour", r)
	}
	if v := metric(ctx, t, ctl, "outpost_controller_peer_reports_other_site"); v != 0 {
		t.Errorf("outpost_controller_peer_reports_other_site = %v %v after d's one write: its hour-long leaseDurationSeconds outlasted --peer-report-validity (%v)",
			v, time.Since(lone), reportValidity)
	}
	step("b's pod kept %.1fs after a alone reported it down: no quorum", time.Since(lone).Seconds())

	// 3. c is back: two of b's two peers say it is down.
	edges["c"].link.Pass()
	waitReport(ctx, t, admin, "c", func(r peer.Report) bool { return slices.Contains(r.Unreachable, "b") }, "b unreachable")
	quorum := time.Now()
	step("c back online and reporting b unreachable: a quorum")
	waitEvent(ctx, t, admin, "b", peerhealth.ReasonPeersCannot)
	framework.WaitFor(ctx, t, "eviction of b's pod "+pods["b"], func(ctx context.Context) (bool, error) {
		p, err := admin.CoreV1().Pods(ns).Get(ctx, pods["b"], metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return err == nil && p.DeletionTimestamp != nil, err
	})
	evicted := time.Since(quorum)
	if evicted < peerGrace {
		t.Errorf("b's pod evicted %v after the quorum, before the grace period of %v", evicted, peerGrace)
	}
	step("b's pod evicted %.1fs after the quorum (grace %v)", evicted.Seconds(), peerGrace)
	waitEvent(ctx, t, admin, "b", peerhealth.ReasonWithdrawn)
	var replacement string
	framework.WaitFor(ctx, t, "a replacement web pod bound to a live node", func(ctx context.Context) (bool, error) {
		list, err := admin.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		for _, p := range list.Items {
			if p.DeletionTimestamp == nil && p.Name != pods["a"] && p.Name != pods["c"] && p.Spec.NodeName != "" && p.Spec.NodeName != "b" {
				replacement = p.Spec.NodeName + "/" + p.Name
				return true, nil
			}
		}
		return false, nil
	})
	if v := metric(ctx, t, ctl, "outpost_controller_autonomy_withdrawals_total"); v != 1 {
		t.Errorf("outpost_controller_autonomy_withdrawals_total = %v, want 1", v)
	}
	step("replacement scheduled: %s, %.1fs after the quorum", replacement, time.Since(quorum).Seconds())

	// 4. The whole site is cut off: nobody can report, nothing is evicted.
	edges["a"].link.Blackhole()
	edges["c"].link.Blackhole()
	cut := time.Now()
	step("a's and c's uplinks cut: the whole site is silent")
	waitUnreachable(ctx, t, admin, "a")
	waitUnreachable(ctx, t, admin, "c")
	step("a and c unreachable and tainted, %.1fs after the cut", time.Since(cut).Seconds())
	before := map[string]time.Time{}
	offline := map[string]float64{}
	for _, name := range []string{"a", "c"} {
		before[name] = readReport(ctx, t, admin, name).Renewed
		offline[name], _ = edges[name].o.Metric("outpost_peer_reports_total", "result=offline")
	}
	keep := map[string]string{"a": pods["a"], "c": pods["c"]}
	hold(ctx, t, admin, peerGrace+toleration*time.Second+2*time.Second, keep, "a", "c")
	for _, name := range []string{"a", "c"} {
		if r := readReport(ctx, t, admin, name); !r.Renewed.Equal(before[name]) || !r.Renewed.Before(cut.Add(time.Second)) {
			t.Errorf("%s wrote a report at %v while cut off (cut at %v)", name, r.Renewed, cut)
		}
		if v, _ := edges[name].o.Metric("outpost_peer_reports_total", "result=offline"); v <= offline[name] {
			t.Errorf("outpost of %s: outpost_peer_reports_total{result=offline} stayed at %v while cut off", name, v)
		}
	}
	step("the site's pods kept %.1fs after the cut, with no report written", time.Since(cut).Seconds())
}

func withTimeout(c *rest.Config) *rest.Config {
	c.Timeout = 5 * time.Second
	return c
}

func createNode(ctx context.Context, t *testing.T, c kubernetes.Interface, name, zone string, autonomous bool) {
	t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name:   name,
		Labels: map[string]string{corev1.LabelHostname: name, corev1.LabelTopologyZone: zone},
	}}
	if autonomous {
		n.Annotations = map[string]string{autonomy.AnnotationAutonomyDuration: "0"}
	}
	if _, err := c.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{}) })
	capacity := corev1.ResourceList{
		corev1.ResourceCPU: resource.MustParse("4"), corev1.ResourceMemory: resource.MustParse("8Gi"), corev1.ResourcePods: resource.MustParse("110"),
	}
	// Patched: the node lifecycle controller may have written it already.
	patch, _ := json.Marshal(map[string]any{"status": corev1.NodeStatus{Capacity: capacity, Allocatable: capacity, Conditions: []corev1.NodeCondition{readyCondition()}}})
	if _, err := c.CoreV1().Nodes().PatchStatus(ctx, name, patch); err != nil {
		t.Fatal(err)
	}
}

func readyCondition() corev1.NodeCondition {
	now := metav1.Now()
	return corev1.NodeCondition{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
		Message: "kubelet is posting ready status", LastHeartbeatTime: now, LastTransitionTime: now}
}

// heartbeat does what kubelet does to stay alive for the node lifecycle
// controller, every second until ctx is done: renew its Lease, and post its
// Ready condition.
func heartbeat(ctx context.Context, c kubernetes.Interface, node string) {
	leases := c.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	for {
		now := metav1.NewMicroTime(time.Now())
		l, err := leases.Get(ctx, node, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			_, _ = leases.Create(ctx, &coordinationv1.Lease{
				ObjectMeta: metav1.ObjectMeta{Name: node, Namespace: corev1.NamespaceNodeLease},
				Spec:       coordinationv1.LeaseSpec{HolderIdentity: new(node), LeaseDurationSeconds: new(int32(40)), RenewTime: &now},
			}, metav1.CreateOptions{})
		case err == nil:
			l.Spec.RenewTime = &now
			_, _ = leases.Update(ctx, l, metav1.UpdateOptions{})
		}
		patch, _ := json.Marshal(map[string]any{"status": map[string]any{"conditions": []corev1.NodeCondition{readyCondition()}}})
		_, _ = c.CoreV1().Nodes().PatchStatus(ctx, node, patch)
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}

// createWeb creates a Deployment of three pods spread over the site's
// nodes, one per node while all are schedulable; a tainted node counts for
// no spreading (nodeTaintsPolicy Honor), so a replacement lands on a live
// node. No kubelet runs them: they stay Pending, which matters neither to
// autonomy nor to eviction.
func createWeb(ctx context.Context, t *testing.T, c kubernetes.Interface) {
	t.Helper()
	labels := map[string]string{"app": "web"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: new(int32(3)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					Containers:   []corev1.Container{{Name: "web", Image: "example.com/web:1"}},
					NodeSelector: map[string]string{corev1.LabelTopologyZone: site},
					TopologySpreadConstraints: []corev1.TopologySpreadConstraint{{
						MaxSkew: 1, TopologyKey: corev1.LabelHostname, WhenUnsatisfiable: corev1.DoNotSchedule,
						LabelSelector:    &metav1.LabelSelector{MatchLabels: labels},
						NodeTaintsPolicy: new(corev1.NodeInclusionPolicyHonor),
					}},
				},
			},
		},
	}
	if _, err := c.AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// waitUnreachable waits until kube-controller-manager has declared node
// unreachable and tainted it NoExecute.
func waitUnreachable(ctx context.Context, t *testing.T, c kubernetes.Interface, node string) {
	t.Helper()
	framework.WaitFor(ctx, t, node+" tainted unreachable", func(ctx context.Context) (bool, error) {
		n, err := c.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, taint := range n.Spec.Taints {
			if taint.Key == corev1.TaintNodeUnreachable && taint.Effect == corev1.TaintEffectNoExecute {
				return true, nil
			}
		}
		return false, nil
	})
}

// hold checks every 500 ms for d that the pods of the given nodes are not
// being evicted, and that those nodes stay tainted unreachable (so that the
// pods' original 5 s tolerations would have had them evicted).
func hold(ctx context.Context, t *testing.T, c kubernetes.Interface, d time.Duration, pods map[string]string, nodes ...string) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); {
		for _, node := range nodes {
			p, err := c.CoreV1().Pods(ns).Get(ctx, pods[node], metav1.GetOptions{})
			if err != nil {
				t.Fatalf("pod %s of %s: %v", pods[node], node, err)
			}
			if p.DeletionTimestamp != nil {
				t.Fatalf("pod %s of %s is being evicted", p.Name, node)
			}
			if got := framework.TolerationsOf(p); got != "forever,forever" {
				t.Fatalf("pod %s of %s: tolerations %s, want autonomy's forever", p.Name, node, got)
			}
		}
		select {
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func readReport(ctx context.Context, t *testing.T, c kubernetes.Interface, node string) peer.Report {
	t.Helper()
	l, err := c.CoordinationV1().Leases(peer.DefaultNamespace).Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("report of %s: %v", node, err)
	}
	r, err := peer.ParseReport(l)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// waitReport waits for a fresh report of node that satisfies ok.
func waitReport(ctx context.Context, t *testing.T, c kubernetes.Interface, node string, ok func(peer.Report) bool, what string) {
	t.Helper()
	framework.WaitFor(ctx, t, "report of "+node+": "+what, func(ctx context.Context) (bool, error) {
		l, err := c.CoordinationV1().Leases(peer.DefaultNamespace).Get(ctx, node, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		r, err := peer.ParseReport(l)
		return err == nil && r.Fresh(time.Now()) && ok(r), err
	})
}

func metric(ctx context.Context, t *testing.T, ctl *framework.Controller, name string, match ...string) float64 {
	t.Helper()
	body, err := framework.GetOK(ctx, nil, ctl.MetricsURL+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	v, err := framework.SumMetric(string(body), name, match...)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func waitVerdict(ctx context.Context, t *testing.T, ctl *framework.Controller, s peerhealth.State, want float64) {
	t.Helper()
	framework.WaitFor(ctx, t, fmt.Sprintf("%v node(s) with verdict %s", want, s), func(ctx context.Context) (bool, error) {
		return metric(ctx, t, ctl, "outpost_controller_peer_verdicts", "verdict="+string(s)) == want, nil
	})
}

func nodeEvents(ctx context.Context, c kubernetes.Interface, node string) ([]corev1.Event, error) {
	list, err := c.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{FieldSelector: fields.Set{
		"involvedObject.kind": "Node", "involvedObject.name": node,
	}.String()})
	if err != nil {
		return nil, err
	}
	return list.Items, nil
}

func hasEvent(ctx context.Context, t *testing.T, c kubernetes.Interface, node, reason string) bool {
	t.Helper()
	events, err := nodeEvents(ctx, c, node)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range events {
		if e.Reason == reason {
			return true
		}
	}
	return false
}

func waitEvent(ctx context.Context, t *testing.T, c kubernetes.Interface, node, reason string) {
	t.Helper()
	framework.WaitFor(ctx, t, "event "+reason+" on node "+node, func(ctx context.Context) (bool, error) {
		events, err := nodeEvents(ctx, c, node)
		for _, e := range events {
			if e.Reason == reason {
				t.Logf("event on %s: %s %s: %s", node, e.Type, e.Reason, e.Message)
				return true, nil
			}
		}
		return false, err
	})
}

// forge tries what a node or a stranger might to have b evicted. The
// apiserver refuses a node writing another's report, a report held in
// another's name, and anyone not a node; a node of another site may write
// its own report, lying about b and about its site, which the controller
// does not count.
func forge(ctx context.Context, t *testing.T) {
	t.Helper()
	lie := func(observer, holder string) *coordinationv1.Lease {
		l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: observer, Namespace: peer.DefaultNamespace}}
		peer.Report{Observer: observer, Site: site, Unreachable: []string{"b"}, Renewed: time.Now(), Valid: time.Hour}.Apply(l)
		l.Spec.HolderIdentity = new(holder)
		return l
	}
	asNode := func(node string) kubernetes.Interface {
		crt, key, err := cp.NodeCredentials(node)
		if err != nil {
			t.Fatal(err)
		}
		return client(crt, key)
	}
	a := asNode("a").CoordinationV1().Leases(peer.DefaultNamespace)
	// a writes c's report: refused by the admission policy.
	current, err := a.Get(ctx, "c", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	forged := lie("c", "c")
	forged.ResourceVersion = current.ResourceVersion
	if _, err := a.Update(ctx, forged, metav1.UpdateOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("node a updating c's report: %v, want Forbidden", err)
	} else {
		t.Logf("a writing c's report: %v", err)
	}
	if _, err := a.Create(ctx, lie("e", "e"), metav1.CreateOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("node a creating a report for a node e: %v, want Forbidden", err)
	}
	// a's own report, held in c's name: refused.
	own, err := a.Get(ctx, "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	held := lie("a", "c")
	held.ResourceVersion = own.ResourceVersion
	if _, err := a.Update(ctx, held, metav1.UpdateOptions{}); !apierrors.IsInvalid(err) {
		t.Errorf("node a writing its report held by c: %v, want Invalid", err)
	}
	// Someone who is not a node: RBAC.
	crt, key, err := cp.IssueClientCert("mallory", "mallory")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client(crt, key).CoordinationV1().Leases(peer.DefaultNamespace).Create(ctx, lie("mallory", "mallory"), metav1.CreateOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("a user who is no node writing a report: %v, want Forbidden", err)
	}
	// d, a real node of another site, writes its own report claiming the
	// site of b and that b is down: accepted, and not counted.
	if _, err := asNode("d").CoordinationV1().Leases(peer.DefaultNamespace).Create(ctx, lie("d", "d"), metav1.CreateOptions{}); err != nil {
		t.Fatalf("node d writing its own report: %v", err)
	}
	// The forgeries were valid for an hour; c writes its own for 3 s.
	if r := readReport(ctx, t, cp.Client(), "c"); r.Valid == time.Hour {
		t.Errorf("c's report was changed by a forgery: %+v", r)
	}
}

func client(crt, key string) kubernetes.Interface {
	return kubernetes.NewForConfigOrDie(&rest.Config{Host: cp.URL(0), Timeout: 5 * time.Second,
		TLSClientConfig: rest.TLSClientConfig{CAFile: cp.CAFile, CertFile: crt, KeyFile: key}})
}
