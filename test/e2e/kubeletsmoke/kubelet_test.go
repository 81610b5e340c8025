// Package kubeletsmoke proves the real-node harness of the e2e framework: a
// real kubelet with containerd runs pods with ConfigMap, Secret and token
// volumes, on the pod network and on the host network, brings them back
// after a simulated reboot, and leaves nothing on the machine. Its kubelet
// talks straight to the apiserver, so that a failure here is the harness's;
// the outpost suites then put outpost in between.
package kubeletsmoke

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	// No kube-controller-manager and no scheduler: EnsureNamespace does
	// the controller-manager's part and the pods name their node.
	os.Exit(framework.Run(m, framework.Options{}, &cp))
}

const (
	nodeName  = "smoke-node"
	namespace = "smoke"
	// podPort is where the pod-network pod serves, on its pod IP.
	podPort = 8080
)

// The content the pods must serve from their volumes.
const (
	greeting = "hello from a configmap"
	password = "s3cret from a secret"
)

// requireRealNode skips the test, loudly, on a machine that cannot run a
// real node, and fails it where one must: as root in CI.
func requireRealNode(t *testing.T) {
	t.Helper()
	err := framework.NodeSupported()
	if err == nil {
		return
	}
	msg := fmt.Sprintf("REAL KUBELET NOT TESTED: %v", err)
	// Printed outside the test log, so that it shows without -v too.
	fmt.Fprintf(os.Stderr, "\n!!!!! %s !!!!!\n\n", msg)
	if os.Getenv("CI") == "true" && os.Geteuid() == 0 {
		t.Fatalf("%s; CI runs as root and must run this test", msg)
	}
	t.Skip(msg)
}

// noProxy reaches pod IPs directly whatever the environment says.
var noProxy = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil}}

func TestRealKubelet(t *testing.T) {
	requireRealNode(t)
	ctx := t.Context()
	client := cp.Client()

	if err := cp.EnsureNamespace(ctx, namespace); err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, err := cp.NodeCredentials(nodeName)
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(t.TempDir(), "kubelet.kubeconfig")
	if err := framework.WriteKubeconfig(kubeconfig, cp.URL(0), cp.CAFile, certFile, keyFile, ""); err != nil {
		t.Fatal(err)
	}

	begin := time.Now()
	node := cp.StartNodeForTest(t, nodeName, kubeconfig)
	nodeReady := time.Since(begin)

	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "web-config"}, Data: map[string]string{"greeting": greeting}}
	if _, err := client.CoreV1().ConfigMaps(namespace).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "web-secret"}, StringData: map[string]string{"password": password}}
	if _, err := client.CoreV1().Secrets(namespace).Create(ctx, secret, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	hostPort := freePort(t)
	for _, pod := range []*corev1.Pod{framework.WebPod("web-pod", nodeName, false, podPort, "web-config", "web-secret"), framework.WebPod("web-host", nodeName, true, hostPort, "web-config", "web-secret")} {
		if _, err := client.CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	running := waitPodsReady(ctx, t, node, nil)
	podsReady := time.Since(begin)
	checkServing(ctx, t, hostPort, running["web-pod"].IP)

	// A reboot: kubelet goes, and so does every container and sandbox. The
	// pods come back only because kubelet learns them from the apiserver.
	rebootStart := time.Now()
	if err := node.StopKubelet(); err != nil {
		t.Fatal(err)
	}
	if err := node.RemoveAllContainers(ctx); err != nil {
		t.Fatal(err)
	}
	removed := time.Since(rebootStart)
	if body, err := httpGet(ctx, fileURL("127.0.0.1:"+strconv.Itoa(hostPort), "/etc/config/greeting")); err == nil {
		t.Fatalf("after RemoveAllContainers the host-network pod still serves: %q", body)
	}
	if err := node.StartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	kubeletUp := time.Since(rebootStart)
	again := waitPodsReady(ctx, t, node, running)
	checkServing(ctx, t, hostPort, again["web-pod"].IP)
	rebootToServing := time.Since(rebootStart)

	stopStart := time.Now()
	node.Stop()
	teardown := time.Since(stopStart)
	if left := node.Leftovers(); len(left) > 0 {
		t.Errorf("node teardown left behind:\n  %s", strings.Join(left, "\n  "))
	}
	ms := func(d time.Duration) time.Duration { return d.Round(time.Millisecond) }
	t.Logf("cold start: node Ready %v after StartNode, both pods Ready %v after StartNode", ms(nodeReady), ms(podsReady))
	t.Logf("reboot: both pods serving again %v after StopKubelet (containers removed at %v, kubelet healthy at %v)",
		ms(rebootToServing), ms(removed), ms(kubeletUp))
	t.Logf("teardown: %v", ms(teardown))
}

// runningPod is what waitPodsReady saw of a Ready pod.
type runningPod struct {
	ContainerID string
	IP          string
}

// waitPodsReady waits until both pods are Ready in the apiserver with a
// running container that is not the one in before (when before is set),
// and returns what it saw.
func waitPodsReady(ctx context.Context, t *testing.T, node *framework.Node, before map[string]runningPod) map[string]runningPod {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var last string
	for {
		got := map[string]runningPod{}
		var waiting []string
		for _, name := range []string{"web-pod", "web-host"} {
			pod, err := cp.Client().CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				waiting = append(waiting, fmt.Sprintf("%s: %v", name, err))
				continue
			}
			if p, ok := readyPod(pod); ok && p.ContainerID != before[name].ContainerID {
				got[name] = p
				continue
			}
			waiting = append(waiting, describePod(pod))
		}
		if len(waiting) == 0 {
			return got
		}
		last = strings.Join(waiting, "\n  ")
		select {
		case <-ctx.Done():
			t.Fatalf("pods not Ready with new containers: %v\n  %s\nlast lines of kubelet.log:\n%s", ctx.Err(), last, node.KubeletLog(60))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func readyPod(pod *corev1.Pod) (runningPod, bool) {
	ready := false
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			ready = true
		}
	}
	if !ready || len(pod.Status.ContainerStatuses) != 1 {
		return runningPod{}, false
	}
	cs := pod.Status.ContainerStatuses[0]
	if !cs.Ready || cs.State.Running == nil {
		return runningPod{}, false
	}
	return runningPod{ContainerID: cs.ContainerID, IP: pod.Status.PodIP}, true
}

// describePod summarises a pod that is not ready yet, for the failure.
func describePod(pod *corev1.Pod) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: phase %s", pod.Name, pod.Status.Phase)
	for _, c := range pod.Status.Conditions {
		if c.Status != corev1.ConditionTrue {
			fmt.Fprintf(&b, ", %s=%s %s", c.Type, c.Status, c.Message)
		}
	}
	for _, cs := range pod.Status.ContainerStatuses {
		switch {
		case cs.State.Waiting != nil:
			fmt.Fprintf(&b, ", waiting %s: %s", cs.State.Waiting.Reason, cs.State.Waiting.Message)
		case cs.State.Terminated != nil:
			fmt.Fprintf(&b, ", terminated %s (%d)", cs.State.Terminated.Reason, cs.State.Terminated.ExitCode)
		default:
			fmt.Fprintf(&b, ", running %s ready=%v", cs.ContainerID, cs.Ready)
		}
	}
	return b.String()
}

// checkServing reads the mounted ConfigMap and Secret, and the service
// account token kubelet requested, from the host-network pod on 127.0.0.1
// and from the other pod at its pod IP through the node's bridge.
func checkServing(ctx context.Context, t *testing.T, hostPort int, podIP string) {
	t.Helper()
	for _, host := range []string{"127.0.0.1:" + strconv.Itoa(hostPort), net.JoinHostPort(podIP, strconv.Itoa(podPort))} {
		for path, want := range map[string]string{"/etc/config/greeting": greeting, "/etc/secret/password": password} {
			got, err := httpGet(ctx, fileURL(host, path))
			if err != nil {
				t.Fatalf("reading %s from the pod at %s: %v", path, host, err)
			}
			if got != want {
				t.Errorf("%s at %s = %q, want %q", path, host, got, want)
			}
		}
		token, err := httpGet(ctx, fileURL(host, "/var/run/secrets/kubernetes.io/serviceaccount/token"))
		if err != nil || strings.Count(token, ".") != 2 {
			t.Errorf("service account token at %s = %q, %v; want a JWT", host, token, err)
		}
	}
}

func fileURL(host, path string) string {
	return "http://" + host + "/file?path=" + path
}

func httpGet(ctx context.Context, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := noProxy.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s: %s", url, resp.Status, body)
	}
	return string(body), nil
}

// freePort returns a TCP port of 127.0.0.1 that was free a moment ago, for
// the host-network pod.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
