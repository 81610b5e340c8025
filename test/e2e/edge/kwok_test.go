package edge

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	authorizationv1 "k8s.io/api/authorization/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// kwokPods is how many pods the kwok node runs.
const kwokPods = 100

// kwokLease is kwok's node lease duration: kwok renews every quarter of it,
// and a restarted kwok (with a new holder identity) takes the lease over
// only once the old holder's has expired.
const kwokLease = 8 * time.Second

// TestKwokScale puts kwok, standing in for the kubelet of one node with many
// pods, behind outpost: Lease renewals, Node status and pod status at scale.
// kwok runs with the node's own client certificate, as a kubelet would, so
// that outpost's local writes for "this node" apply to it. Cut the link,
// restart kwok: every pod is still listed through outpost, and kwok's
// heartbeats (its Lease renewals) are answered locally.
func TestKwokScale(t *testing.T) {
	const (
		node = "kwok-node"
		ns   = "kwok"
	)
	ctx := t.Context()
	admin := cp.Client()
	nodeNamespace(t, node, ns)
	grantKwokReads(t, node)
	var g errgroup.Group
	g.SetLimit(16)
	for i := range kwokPods {
		g.Go(func() error {
			pod := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("k-%03d", i), Labels: map[string]string{"app": "kwok"}},
				Spec: corev1.PodSpec{
					NodeName:                     node,
					AutomountServiceAccountToken: new(false),
					Containers:                   []corev1.Container{{Name: "c", Image: "example.invalid/fake:1"}},
				},
			}
			_, err := admin.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = admin.CoreV1().Pods(ns).DeleteCollection(context.Background(), metav1.DeleteOptions{GracePeriodSeconds: new(int64)}, metav1.ListOptions{})
	})

	e := startEdge(t, node)
	kubeconfig, err := e.o.NodeKubeconfig()
	if err != nil {
		t.Fatal(err)
	}
	kwokArgs := []string{
		"--kubeconfig=" + kubeconfig, // replaces the framework's admin kubeconfig
		"--manage-single-node=" + node,
		fmt.Sprintf("--node-lease-duration-seconds=%d", int(kwokLease.Seconds())),
	}
	start := time.Now()
	if err := cp.StartKwok(ctx, kwokArgs...); err != nil {
		t.Fatal(err)
	}
	defer cp.StopKwok()
	kwokLog := filepath.Join(cp.Dir, "kwok.log")
	defer func() {
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", kwokLog, cp.KwokLog(40))
		}
	}()
	nodePods := metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String()}
	runningIn := func(ctx context.Context, list func(context.Context) (*corev1.PodList, error)) (bool, string) {
		l, err := list(ctx)
		if err != nil {
			return false, err.Error()
		}
		running := 0
		for _, p := range l.Items {
			if p.Status.Phase == corev1.PodRunning && framework.PodReady(&p) {
				running++
			}
		}
		return running == kwokPods, fmt.Sprintf("%d of %d pods listed, %d running and ready", len(l.Items), kwokPods, running)
	}
	cloudPods := func(ctx context.Context) (*corev1.PodList, error) { return admin.CoreV1().Pods(ns).List(ctx, nodePods) }
	if _, ok := waitFor(t, 90*time.Second, "kwok runs every pod, through outpost", func(ctx context.Context) (bool, string) {
		return runningIn(ctx, cloudPods)
	}); !ok {
		t.FailNow()
	}
	figure(t, "kwok through outpost: %d pods running %v after kwok started", kwokPods, ms(time.Since(start)))
	kubelet := e.nodeClient(t)
	edgePods := func(ctx context.Context) (*corev1.PodList, error) {
		return kubelet.CoreV1().Pods("").List(ctx, nodePods)
	}
	if ok, why := runningIn(ctx, edgePods); !ok {
		t.Fatalf("online list through outpost: %s", why)
	}
	if _, err := kubelet.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, node, metav1.GetOptions{}); err != nil {
		t.Fatalf("online get of the lease through outpost: %v", err)
	}
	time.Sleep(time.Second) // the recorder writes in batches

	// The cut, and kwok restarts behind it.
	e.cut(t, kubelet, func(ctx context.Context) error {
		_, err := edgePods(ctx)
		return err
	})
	// What the cloud holds once outpost has let go of its connections: a
	// renewal in flight at the cut may still have landed before.
	time.Sleep(time.Second)
	leaseAtCut, err := admin.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := cp.StopKwok(); err != nil {
		t.Fatal(err)
	}
	// A renewal in flight when the link broke is answered by no one: the
	// contract says the node never notices the cut, so report them.
	if n := e.metric(t, "outpost_requests_total", "resource=leases", "served_by=outpost", "code=503"); n > 0 {
		t.Logf("NOTE: %v lease writes in flight at the cut were answered 503 (outpost falls back to the cache for reads only)", n)
	}
	localBefore := e.localWrites(t, "leases")
	refusedBefore := e.metric(t, "outpost_requests_total", "resource=leases", "served_by=outpost", "code=503")
	kwokLogAt := fileSize(kwokLog)
	restartAt := time.Now()
	if err := cp.StartKwok(ctx, kwokArgs...); err != nil {
		t.Fatal(err)
	}

	// Every pod is still listed, running, through outpost.
	if _, ok := waitFor(t, 20*time.Second, "offline, after kwok restarted, every pod listed through outpost", func(ctx context.Context) (bool, string) {
		return runningIn(ctx, edgePods)
	}); ok {
		figure(t, "offline kwok restart: %d pods listed through outpost", kwokPods)
	}
	// kwok's heartbeats are answered: the restarted kwok takes the lease
	// over once the old holder's expires, then renews it, all locally.
	var leaseOffline *coordinationv1.Lease
	if _, ok := waitFor(t, 3*kwokLease+10*time.Second, "offline, the restarted kwok's lease renewals answered by outpost", func(ctx context.Context) (bool, string) {
		local := e.localWrites(t, "leases") - localBefore
		refused := e.metric(t, "outpost_requests_total", "resource=leases", "served_by=outpost", "code=503") - refusedBefore
		l, err := kubelet.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false, fmt.Sprintf("%v local lease writes, %v refused with 503; get lease through outpost: %v", local, refused, err)
		}
		leaseOffline = l
		renewed := l.Spec.RenewTime != nil && l.Spec.RenewTime.After(restartAt)
		newHolder := deref(l.Spec.HolderIdentity) != deref(leaseAtCut.Spec.HolderIdentity)
		return local >= 2 && renewed && newHolder, fmt.Sprintf("%v lease writes answered locally, %v refused with 503; lease through outpost: holder %q (at the cut %q), renewed %v",
			local, refused, deref(l.Spec.HolderIdentity), deref(leaseAtCut.Spec.HolderIdentity), renewTime(l))
	}); ok {
		figure(t, "offline kwok restart → lease taken over and renewed locally: %v (lease %v, so up to %v is the old holder's expiry)", ms(time.Since(restartAt)), kwokLease, kwokLease)
	}
	// Offline, the lease reads as the apiserver would have it: listed (as
	// kwok's informer lists it), and a create of it is a conflict.
	if l, err := kubelet.CoordinationV1().Leases(corev1.NamespaceNodeLease).List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("metadata.name", node).String()}); err != nil {
		t.Errorf("offline list of the node lease through outpost (kwok's informer): %v", err)
	} else if len(l.Items) != 1 {
		t.Errorf("offline list of the node lease through outpost (kwok's informer) holds %d leases, want 1", len(l.Items))
	}
	if leaseOffline != nil {
		dup := leaseOffline.DeepCopy()
		dup.ResourceVersion, dup.UID = "", ""
		if _, err := kubelet.CoordinationV1().Leases(corev1.NamespaceNodeLease).Create(ctx, dup, metav1.CreateOptions{}); !apierrors.IsAlreadyExists(err) {
			t.Errorf("offline create of the existing node lease through outpost: %v; want 409 AlreadyExists, as from the apiserver "+
				"(a restarted kwok creates its lease before its informer syncs, and outpost's 201 hands it a lease another holder still holds)", err)
		}
	}
	if problems := leaseProblems(readFrom(kwokLog, kwokLogAt)); len(problems) > 0 {
		t.Errorf("the restarted kwok logged %d lease or status errors while offline, e.g.:\n  %s", len(problems), strings.Join(problems[:min(5, len(problems))], "\n  "))
	}
	if l, err := admin.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, node, metav1.GetOptions{}); err == nil && l.ResourceVersion != leaseAtCut.ResourceVersion {
		t.Errorf("the cloud's lease changed while the link was cut (rv %s → %s)", leaseAtCut.ResourceVersion, l.ResourceVersion)
	}

	// The link returns: kwok's renewals reach the cloud, pods still run.
	restoreAt := e.restore(t)
	if _, ok := waitFor(t, 3*kwokLease, "after the reconnect, the cloud's lease renewed by the restarted kwok", func(ctx context.Context) (bool, string) {
		l, err := admin.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		want := ""
		if leaseOffline != nil {
			want = deref(leaseOffline.Spec.HolderIdentity)
		}
		ok := l.Spec.RenewTime != nil && l.Spec.RenewTime.After(restoreAt) && (want == "" || deref(l.Spec.HolderIdentity) == want)
		return ok, fmt.Sprintf("cloud lease: holder %q (want %q), renewed %v", deref(l.Spec.HolderIdentity), want, renewTime(l))
	}); ok {
		figure(t, "link back → the cloud's lease renewed: %v", ms(time.Since(restoreAt)))
	}
	if ok, why := runningIn(ctx, cloudPods); !ok {
		t.Errorf("after the reconnect, in the cloud: %s", why)
	}
}

// grantKwokReads lets node list and watch node leases and list all nodes,
// which kwok does (its lease informer; its start-up check lists nodes) and
// a kubelet does not: the Node authorizer allows a node only its own Lease
// and Node, by name.
func grantKwokReads(t *testing.T, node string) {
	t.Helper()
	ctx := t.Context()
	c := cp.Client()
	name := "edge-e2e:kwok-leases:" + node
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{coordinationv1.GroupName}, Resources: []string{"leases"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"list", "watch"}},
	}}
	if _, err := c.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: "system:node:" + node}},
	}
	if _, err := c.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	err := cp.WaitAllowed(ctx, authorizationv1.SubjectAccessReviewSpec{
		User: "system:node:" + node, Groups: []string{"system:nodes", "system:authenticated"},
		ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: "watch", Group: coordinationv1.GroupName, Resource: "leases", Namespace: corev1.NamespaceNodeLease},
	})
	if err != nil {
		t.Errorf("RBAC binding %s: %v", name, err)
	}
}

// kwokProblem matches kwok log lines about failed lease or status writes.
var kwokProblem = regexp.MustCompile(`(?i)(level=error|failed).*(lease|status|patch|update)`)

func leaseProblems(log string) []string {
	var out []string
	for line := range strings.Lines(log) {
		// "lease already exists" is the 409 the apiserver itself gives a
		// restarted kwok that creates its lease before its informer syncs;
		// kwok then reads and renews the lease. Outpost answering it the
		// same way offline is the contract, not a problem.
		if kwokProblem.MatchString(line) && !strings.Contains(line, "lease already exists") {
			out = append(out, strings.TrimSpace(line))
		}
	}
	return out
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func renewTime(l *coordinationv1.Lease) string {
	if l.Spec.RenewTime == nil {
		return "never"
	}
	return l.Spec.RenewTime.Format("15:04:05.000")
}
