// Package kubeletsmoke proves the real-node harness of the e2e framework: a
// real kubelet with containerd runs pods with ConfigMap, Secret and token
// volumes, on the pod network and on the host network, brings them back
// after a simulated reboot, and leaves nothing on the machine. Its kubelet
// talks straight to the apiserver, so that a failure here is the harness's;
// the outpost suites then put outpost in between.
package kubeletsmoke

import (
	"context"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

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
)

// The content the pods must serve from their volumes.
const (
	greeting = "hello from a configmap"
	password = "s3cret from a secret"
)

func TestRealKubelet(t *testing.T) {
	framework.RequireRealNode(t)
	ctx := t.Context()

	if err := cp.CreateWebConfig(ctx, namespace, greeting, password); err != nil {
		t.Fatal(err)
	}
	kubeconfig, err := cp.NodeKubeconfig(nodeName, cp.URL(0))
	if err != nil {
		t.Fatal(err)
	}

	begin := time.Now()
	node := cp.StartNodeForTest(t, nodeName, kubeconfig)
	nodeReady := time.Since(begin)

	hostPort := framework.FreePort(t)
	if err := cp.CreateWebPods(ctx, namespace, nodeName, hostPort); err != nil {
		t.Fatal(err)
	}

	running := waitPodsReady(ctx, t, node, nil)
	podsReady := time.Since(begin)
	checkServing(ctx, t, hostPort, running[framework.WebPodName].IP)

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
	if body, err := framework.WebFile(ctx, "127.0.0.1:"+strconv.Itoa(hostPort), "/etc/config/greeting"); err == nil {
		t.Fatalf("after RemoveAllContainers the host-network pod still serves: %q", body)
	}
	if err := node.StartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	kubeletUp := time.Since(rebootStart)
	again := waitPodsReady(ctx, t, node, running)
	checkServing(ctx, t, hostPort, again[framework.WebPodName].IP)
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

// waitPodsReady waits until both web pods are Ready in the apiserver with a
// running container that is not the one in before (when before is set),
// and returns what it saw.
func waitPodsReady(ctx context.Context, t *testing.T, node *framework.Node, before map[string]framework.RunningPod) map[string]framework.RunningPod {
	t.Helper()
	got, err := node.WaitPodsReady(ctx, namespace, []string{framework.WebPodName, framework.WebHostName}, before)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// checkServing reads the mounted ConfigMap and Secret, and the service
// account token kubelet requested, from the host-network pod on 127.0.0.1
// and from the other pod at its pod IP through the node's bridge.
func checkServing(ctx context.Context, t *testing.T, hostPort int, podIP string) {
	t.Helper()
	for _, host := range []string{"127.0.0.1:" + strconv.Itoa(hostPort), net.JoinHostPort(podIP, strconv.Itoa(framework.WebPodPort))} {
		if err := framework.CheckWebConfig(ctx, host, greeting, password); err != nil {
			t.Fatal(err)
		}
		token, err := framework.WebFile(ctx, host, "/var/run/secrets/kubernetes.io/serviceaccount/token")
		if err != nil || strings.Count(token, ".") != 2 {
			t.Errorf("service account token at %s = %q, %v; want a JWT", host, token, err)
		}
	}
}
