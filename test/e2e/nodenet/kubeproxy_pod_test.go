package nodenet

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestKubeProxyPod runs kube-proxy as kubeadm does, as a privileged
// hostNetwork pod with its service account's in-cluster config (pointed at
// the apiserver's 127.0.0.1 address, since the kubernetes Service leads
// nowhere here) and its configuration from a ConfigMap, on a real node
// straight to the apiserver; a web Deployment's ClusterIP serves. Then the
// node "reboots" — kubelet stopped, every container removed, kube-proxy's
// tables deleted, kubelet started — and kubelet alone brings the kube-proxy
// pod back, which makes the VIP serve again.
func TestKubeProxyPod(t *testing.T) {
	framework.RequireRealNode(t)
	ctx := t.Context()
	begin := time.Now()
	const node = "nodenet-kp-pod"
	kubeconfig, err := cp.NodeKubeconfig(node, cp.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	n := cp.StartNodeForTest(t, node, kubeconfig)
	t.Logf("node ready: %v", since(begin))

	api, err := url.Parse(cp.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	kp := n.StartKubeProxyPodForTest(t, framework.KubeProxyPodOptions{APIServer: api.Host})
	t.Logf("kube-proxy pod %s synced: %v", kp.Pod, since(begin))
	before := kubeProxyContainer(t, kp)

	const ns = "web-kp-pod"
	svc := createWeb(t, ns, node)
	pod := waitWebReady(t, n, ns)
	base := "http://" + svc.Spec.ClusterIP + ":80"
	checkWebAt(t, base, pod)
	t.Logf("web pod %s answered at %s: %v", pod, base, since(begin))

	// The "reboot": nothing runs and kube-proxy's rules are gone.
	if err := n.StopKubelet(); err != nil {
		t.Fatal(err)
	}
	if err := n.RemoveAllContainers(ctx); err != nil {
		t.Fatal(err)
	}
	if err := kp.DeleteRules(); err != nil {
		t.Fatal(err)
	}
	if left := kp.Leftovers(); len(left) > 0 {
		t.Fatalf("after the reboot, the host still holds:\n  %s", strings.Join(left, "\n  "))
	}
	reboot := time.Now()
	if err := n.StartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	if err := kp.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("kube-proxy pod back and synced after the reboot: %v", since(reboot))
	// kubelet started a new container of the same pod, and says so.
	_, err = framework.Poll(ctx, 200*time.Millisecond, 30*time.Second, func(ctx context.Context) (bool, string) {
		after, err := kubeProxyStatus(ctx, kp)
		if err != nil {
			return false, err.Error()
		}
		if after.ContainerID == "" || after.ContainerID == before.ContainerID || !after.Ready {
			return false, fmt.Sprintf("container %q ready=%v, the one before the reboot was %q", after.ContainerID, after.Ready, before.ContainerID)
		}
		return true, ""
	})
	if err != nil {
		t.Fatalf("the kube-proxy pod's status: %v", err)
	}
	pod = waitWebReady(t, n, ns)
	checkWebAt(t, base, pod)
	t.Logf("web pod %s answered at %s again: %v after the reboot", pod, base, since(reboot))
}

// kubeProxyContainer returns the status of the kube-proxy pod's container
// once it is ready.
func kubeProxyContainer(t *testing.T, kp *framework.KubeProxyPod) corev1.ContainerStatus {
	t.Helper()
	var st corev1.ContainerStatus
	_, err := framework.Poll(t.Context(), 200*time.Millisecond, 30*time.Second, func(ctx context.Context) (bool, string) {
		var err error
		if st, err = kubeProxyStatus(ctx, kp); err != nil {
			return false, err.Error()
		}
		return st.Ready && st.ContainerID != "", fmt.Sprintf("container %q ready=%v", st.ContainerID, st.Ready)
	})
	if err != nil {
		t.Fatalf("the kube-proxy pod's status: %v", err)
	}
	return st
}

// kubeProxyStatus returns the status of the kube-proxy pod's one container,
// as the apiserver has it.
func kubeProxyStatus(ctx context.Context, kp *framework.KubeProxyPod) (corev1.ContainerStatus, error) {
	p, err := cp.Client().CoreV1().Pods(framework.KubeProxyNamespace).Get(ctx, kp.Pod, metav1.GetOptions{})
	if err != nil {
		return corev1.ContainerStatus{}, err
	}
	if len(p.Status.ContainerStatuses) != 1 {
		return corev1.ContainerStatus{}, fmt.Errorf("pod %s: %s", kp.Pod, framework.DescribePod(p))
	}
	return p.Status.ContainerStatuses[0], nil
}
