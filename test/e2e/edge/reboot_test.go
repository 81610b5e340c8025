package edge

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// The content the pods serve from their volumes.
const (
	greeting = "hello from a configmap, even offline"
	password = "s3cret from a secret, even offline"
)

// The names of the two pods each node runs.
var webPods = []string{framework.WebPodName, framework.WebHostName}

// TestRebootOffline is the seed's scenario with a real kubelet and real
// containers: a node rebooted while its link to the cloud is cut gets its
// pods back from outpost's cache, and keeps renewing its Lease and
// reporting status locally; the same reboot with kubelet talking straight
// to the unreachable apiserver leaves the pods dead, which proves it is
// outpost that brings them back.
func TestRebootOffline(t *testing.T) {
	framework.RequireRealNode(t)
	var recovered time.Duration
	t.Run("through outpost", func(t *testing.T) { recovered = rebootThroughOutpost(t) })
	t.Run("straight to the apiserver", func(t *testing.T) { rebootStraight(t, recovered) })
}

// rebootThroughOutpost runs the scenario through outpost and returns how
// long the pods took to serve again after the reboot (0 if they did not).
func rebootThroughOutpost(t *testing.T) time.Duration {
	const (
		node = "edge-reboot"
		ns   = "edge-reboot"
	)
	ctx := t.Context()
	admin := cp.Client()
	if err := cp.CreateWebConfig(ctx, ns, greeting, password); err != nil {
		t.Fatal(err)
	}
	e := startEdge(t, node)
	kubeconfig, err := e.o.NodeKubeconfig()
	if err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	n := cp.StartNodeForTest(t, node, kubeconfig)
	nodeReady := time.Since(begin)
	hostPort := framework.FreePort(t)
	if err := cp.CreateWebPods(ctx, ns, node, hostPort); err != nil {
		t.Fatal(err)
	}
	before := waitPodsReady(t, n, ns)
	figure(t, "cold start through outpost: node Ready %v, both pods Ready %v after StartNode", ms(nodeReady), ms(time.Since(begin)))
	if err := checkServing(ctx, hostPort, before[framework.WebPodName].IP); err != nil {
		t.Fatal(err)
	}
	// The test reads as the node too, through outpost, to see what the
	// node sees offline: its pods (with the local status overlay) and its
	// Lease.
	kubelet := e.nodeClient(t)
	readPod := func(ctx context.Context, name string) (*corev1.Pod, error) {
		return kubelet.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	}
	for _, name := range webPods {
		if _, err := readPod(ctx, name); err != nil {
			t.Fatalf("online get of %s through outpost as the node: %v", name, err)
		}
	}
	// kubelet creates its Lease shortly after registering.
	if _, ok := waitFor(t, 30*time.Second, "online get of the node lease through outpost", func(ctx context.Context) (bool, string) {
		_, err := kubelet.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, node, metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	}); !ok {
		t.FailNow()
	}
	time.Sleep(time.Second) // the recorder writes in batches
	kubeletLog := filepath.Join(n.Dir, "kubelet.log")

	// The cut.
	logAtCut := fileSize(kubeletLog)
	cutAt := e.cut(t, kubelet, func(ctx context.Context) error {
		_, err := readPod(ctx, "web-host")
		return err
	})

	// The reboot, still offline.
	rebootAt := time.Now()
	if err := n.StopKubelet(); err != nil {
		t.Fatal(err)
	}
	if err := n.RemoveAllContainers(ctx); err != nil {
		t.Fatal(err)
	}
	if body, err := framework.WebFile(ctx, "127.0.0.1:"+strconv.Itoa(hostPort), "/etc/config/greeting"); err == nil {
		t.Fatalf("after RemoveAllContainers the host-network pod still serves: %q", body)
	}
	logAtReboot := fileSize(kubeletLog)
	cutLog := readFrom(kubeletLog, logAtCut)
	if problems := kubeletProblems(cutLog[:min(len(cutLog), int(logAtReboot-logAtCut))]); len(problems) > 0 {
		t.Logf("NOTE: between the cut and the reboot (while outpost noticed the cut) kubelet logged %d failed writes, e.g.:\n  %s",
			len(problems), strings.Join(problems[:min(3, len(problems))], "\n  "))
	}
	leasesBefore := e.localWrites(t, "leases")
	statusesBefore := e.localWrites(t, "pods/status")
	nodesBefore := e.localWrites(t, "nodes/status") + e.localWrites(t, "nodes")
	if err := n.StartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	recovered, ok := waitFor(t, 90*time.Second, "offline, the rebooted node's host-network pod serves its ConfigMap and Secret again", func(ctx context.Context) (bool, string) {
		err := checkHostServing(ctx, hostPort)
		return err == nil, fmt.Sprint(err)
	})
	if ok {
		recovered = time.Since(rebootAt)
		figure(t, "offline reboot → pods re-created from outpost's cache and serving: %v", ms(recovered))
	}
	// kubelet reports the new containers; outpost answers the status
	// patches locally, and the node's own reads see them.
	offline := map[string]framework.RunningPod{}
	if _, ok := waitFor(t, 60*time.Second, "offline, the node's pod status patches seen through outpost", func(ctx context.Context) (bool, string) {
		var waiting []string
		for _, name := range webPods {
			pod, err := readPod(ctx, name)
			if err != nil {
				waiting = append(waiting, fmt.Sprintf("%s: %v", name, err))
				continue
			}
			if p, ok := framework.ReadyPod(pod); ok && p.ContainerID != before[name].ContainerID {
				offline[name] = p
				continue
			}
			waiting = append(waiting, framework.DescribePod(pod))
		}
		return len(waiting) == 0, strings.Join(waiting, "; ")
	}); ok {
		figure(t, "offline reboot → new pod statuses seen through outpost: %v (%v status writes answered locally)",
			ms(time.Since(rebootAt)), e.localWrites(t, "pods/status")-statusesBefore)
		if err := checkServing(ctx, hostPort, offline[framework.WebPodName].IP); err != nil {
			t.Error(err)
		}
	}
	for _, name := range webPods {
		if pod, err := admin.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
			t.Error(err)
		} else if p, _ := framework.ReadyPod(pod); p.ContainerID != before[name].ContainerID {
			t.Errorf("the cloud saw %s's new container %s while the link was cut", name, p.ContainerID)
		}
	}
	if _, ok := waitFor(t, 30*time.Second, "offline, the rebooted kubelet's Lease renewals answered by outpost", func(ctx context.Context) (bool, string) {
		local := e.localWrites(t, "leases") - leasesBefore
		l, err := kubelet.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false, fmt.Sprintf("%v lease writes answered locally; get lease through outpost: %v", local, err)
		}
		renewed := l.Spec.RenewTime != nil && l.Spec.RenewTime.After(rebootAt)
		return local >= 1 && renewed, fmt.Sprintf("%v lease writes answered locally; lease through outpost renewed %s", local, renewTime(l))
	}); ok {
		figure(t, "offline reboot → Lease renewed locally: %v", ms(time.Since(rebootAt)))
	}
	// And its Node status: kubelet registers (the Node exists: the apiserver
	// answers 409, and kubelet goes on), then reports the Node's status.
	if _, ok := waitFor(t, 20*time.Second, "offline, the rebooted kubelet's Node status reported locally", func(ctx context.Context) (bool, string) {
		local := e.localWrites(t, "nodes/status") + e.localWrites(t, "nodes") - nodesBefore
		log := readFrom(kubeletLog, logAtReboot)
		registering := strings.Contains(log, "Attempting to register node") && !strings.Contains(log, "Successfully registered node")
		return local >= 1, fmt.Sprintf("%v Node writes answered locally; kubelet still registering (POST /api/v1/nodes unanswered): %v", local, registering)
	}); ok {
		figure(t, "offline reboot → Node status reported locally: %v", ms(time.Since(rebootAt)))
	}
	if problems := kubeletProblems(readFrom(kubeletLog, logAtReboot)); len(problems) > 0 {
		t.Errorf("offline after the reboot, kubelet logged %d failed Lease, Node or pod status writes (the contract: they succeed locally), e.g.:\n  %s",
			len(problems), strings.Join(problems[:min(6, len(problems))], "\n  "))
	}

	// The link returns, after an outage longer than outpost's default flap
	// window (10 s), so that the whole reconnect path runs.
	time.Sleep(time.Until(cutAt.Add(12 * time.Second)))
	statusUpstream := e.metric(t, "outpost_requests_total", "resource=pods/status", "served_by=upstream")
	logAtRestore := fileSize(kubeletLog)
	restoreAt := e.restore(t)
	agree := milestone{"after the reconnect, kubelet's pod statuses and the apiserver agree", func(ctx context.Context) (bool, string) {
		var waiting []string
		for _, name := range webPods {
			pod, err := admin.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				waiting = append(waiting, err.Error())
				continue
			}
			if p, ok := framework.ReadyPod(pod); !ok || offline[name].ContainerID == "" || p.ContainerID != offline[name].ContainerID {
				waiting = append(waiting, fmt.Sprintf("%s (offline: %s)", framework.DescribePod(pod), offline[name].ContainerID))
			}
		}
		sent := e.metric(t, "outpost_requests_total", "resource=pods/status", "served_by=upstream") - statusUpstream
		return len(waiting) == 0, fmt.Sprintf("%s; %v pod status writes sent upstream since the link returned", strings.Join(waiting, "; "), sent)
	}}
	lease := milestone{"after the reconnect, the node's Lease renewed in the apiserver", func(ctx context.Context) (bool, string) {
		l, err := admin.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return l.Spec.RenewTime != nil && l.Spec.RenewTime.After(restoreAt), "cloud lease renewed " + renewTime(l)
	}}
	// The events kubelet posted offline (the containers it re-created)
	// were journaled, and reach the cloud now.
	events := milestone{"after the reconnect, kubelet's offline events in the apiserver", func(ctx context.Context) (bool, string) {
		l, err := admin.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		var seen []string
		for _, ev := range l.Items {
			if ev.InvolvedObject.Name == "web-host" && ev.LastTimestamp.After(rebootAt) {
				return true, ""
			}
			seen = append(seen, fmt.Sprintf("%s %s %s", ev.InvolvedObject.Name, ev.Reason, ev.LastTimestamp.Format(time.TimeOnly)))
		}
		return false, fmt.Sprintf("no event of web-host after the reboot (%s); events: %s", rebootAt.Format(time.TimeOnly), strings.Join(seen, ", "))
	}}
	took := reach(t, restoreAt, 60*time.Second, agree, lease, events)
	for _, m := range []milestone{agree, lease, events} {
		if d, ok := took[m.name]; ok {
			figure(t, "link back → %s: %v", strings.TrimPrefix(m.name, "after the reconnect, "), ms(d))
		}
	}
	if problems := kubeletProblems(readFrom(kubeletLog, logAtRestore)); len(problems) > 0 {
		t.Errorf("after the reconnect, kubelet logged %d failed writes (the contract: the kubelet never notices the cut), e.g.:\n  %s",
			len(problems), strings.Join(problems[:min(4, len(problems))], "\n  "))
	}
	// Nothing restarted because the cloud came back: the same pods, and
	// the containers started offline still running in containerd (the
	// ground truth, whatever the statuses say), a while later.
	time.Sleep(5 * time.Second)
	tasks, err := runningTasks(ctx, n)
	if err != nil {
		t.Error(err)
	}
	for _, name := range webPods {
		pod, err := admin.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Error(err)
			continue
		}
		if string(pod.UID) != before[name].UID {
			t.Errorf("%s was re-created across the reconnect: uid %s, was %s", name, pod.UID, before[name].UID)
		}
		if id := strings.TrimPrefix(offline[name].ContainerID, "containerd://"); id != "" && tasks != nil && tasks[id] != "RUNNING" {
			t.Errorf("%s's container %s, started offline, is %q after the reconnect; running tasks: %v", name, id, tasks[id], tasks)
		}
	}
	if err := checkHostServing(ctx, hostPort); err != nil {
		t.Errorf("after the reconnect: %v", err)
	}
	return recovered
}

// rebootStraight is the negative control: the same node and reboot with
// kubelet's kubeconfig pointing straight at the apiserver, through a
// black-holed link. The pods must stay dead.
func rebootStraight(t *testing.T, recovered time.Duration) {
	const (
		node = "edge-straight"
		ns   = "edge-straight"
	)
	ctx := t.Context()
	if err := cp.CreateWebConfig(ctx, ns, greeting, password); err != nil {
		t.Fatal(err)
	}
	proxy, err := framework.StartFaultProxy(cp.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	kubeconfig, err := cp.NodeKubeconfig(node, proxy.URL())
	if err != nil {
		t.Fatal(err)
	}
	n := cp.StartNodeForTest(t, node, kubeconfig)
	hostPort := framework.FreePort(t)
	if err := cp.CreateWebPods(ctx, ns, node, hostPort); err != nil {
		t.Fatal(err)
	}
	before := waitPodsReady(t, n, ns)
	if err := checkServing(ctx, hostPort, before[framework.WebPodName].IP); err != nil {
		t.Fatal(err)
	}

	proxy.Blackhole()
	rebootAt := time.Now()
	if err := n.StopKubelet(); err != nil {
		t.Fatal(err)
	}
	if err := n.RemoveAllContainers(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.StartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	// Give it twice what outpost needed, and at least 30 s.
	bound := max(30*time.Second, 2*recovered)
	for time.Since(rebootAt) < bound {
		if err := checkHostServing(ctx, hostPort); err == nil {
			t.Fatalf("kubelet pointed straight at the unreachable apiserver brought the pods back %v after the reboot: the positive test proves nothing", ms(time.Since(rebootAt)))
		}
		time.Sleep(500 * time.Millisecond)
	}
	figure(t, "negative control (kubelet straight at the black-holed apiserver): pods still dead %v after the reboot", ms(bound))
}

// runningTasks lists the node's containerd tasks: container ID → status.
func runningTasks(ctx context.Context, n *framework.Node) (map[string]string, error) {
	out, err := exec.CommandContext(ctx, "ctr", "--address", n.ContainerdSocket, "--namespace", "k8s.io", "tasks", "ls").Output()
	if err != nil {
		return nil, fmt.Errorf("listing containerd tasks of %s: %w", n.Name, err)
	}
	tasks := map[string]string{}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] != "TASK" {
			tasks[f[0]] = f[2]
		}
	}
	return tasks, nil
}

// waitPodsReady waits until both web pods are Ready in the apiserver and
// returns what it saw.
func waitPodsReady(t *testing.T, n *framework.Node, ns string) map[string]framework.RunningPod {
	t.Helper()
	got, err := n.WaitPodsReady(t.Context(), ns, webPods, nil)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// kubeletWriteFailures are what kubelet logs when a Lease renewal, Node
// registration or status update, or pod status update fails.
var kubeletWriteFailures = []string{
	"Failed to update lease",
	"Failed to ensure lease exists",
	"Unable to register node with API server",
	"Error updating node status",
	"Unable to update node status",
	"Failed to update status for pod",
}

func kubeletProblems(log string) []string {
	var out []string
	for line := range strings.Lines(log) {
		for _, f := range kubeletWriteFailures {
			if strings.Contains(line, f) {
				out = append(out, strings.TrimSpace(line[:min(len(line), 400)]))
				break
			}
		}
	}
	return out
}

// checkServing reads the mounted ConfigMap and Secret from the host-network
// pod on 127.0.0.1 and from the other pod at its pod IP.
func checkServing(ctx context.Context, hostPort int, podIP string) error {
	if err := checkHostServing(ctx, hostPort); err != nil {
		return err
	}
	return framework.CheckWebConfig(ctx, net.JoinHostPort(podIP, strconv.Itoa(framework.WebPodPort)), greeting, password)
}

func checkHostServing(ctx context.Context, hostPort int) error {
	return framework.CheckWebConfig(ctx, "127.0.0.1:"+strconv.Itoa(hostPort), greeting, password)
}
