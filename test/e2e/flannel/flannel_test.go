// Package flannel proves the framework's flannel: a real CNI agent that
// reads the Kubernetes API (flanneld in kube-subnet-mgr mode, a hostNetwork
// pod with its service account) provides a real node's pod network, and
// brings it back after a reboot. Here flanneld talks straight to the
// apiserver, so that a failure is the harness's; the edge suites put
// outpost in between and reboot the node offline.
package flannel

import (
	"context"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	// No kube-controller-manager and no scheduler: EnsureNamespace does
	// the controller-manager's part, the pods name their node and the test
	// sets the node's podCIDR.
	os.Exit(framework.Run(m, framework.Options{}, &cp))
}

const (
	nodeName  = "flannel-node"
	namespace = "flannel-web"
	greeting  = "hello over flannel"
	password  = "s3cret over flannel"
)

func TestFlannelPodNetwork(t *testing.T) {
	framework.RequireRealNode(t)
	ctx := t.Context()
	ms := func(d time.Duration) time.Duration { return d.Round(time.Millisecond) }

	if err := cp.CreateWebConfig(ctx, namespace, greeting, password); err != nil {
		t.Fatal(err)
	}
	kubeconfig, err := cp.NodeKubeconfig(nodeName, cp.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	f := cp.StartFlannelNodeForTest(t, nodeName, kubeconfig, framework.FlannelOptions{})
	node := f.Node
	nodeReady := time.Since(begin)
	// Created before flannel is ready: its sandbox waits for the subnet
	// file.
	pod := framework.WebPod(framework.WebPodName, nodeName, false, framework.WebPodPort, framework.WebConfigMap, framework.WebSecret)
	if _, err := cp.Client().CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	if _, err := f.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	flannelReady := time.Since(begin)
	checkFlannel(t, f)
	flanneld := waitReady(ctx, t, node, f.Namespace, f.Pod, nil)
	web := waitReady(ctx, t, node, namespace, framework.WebPodName, nil)
	podReady := time.Since(begin)
	checkPodNetwork(ctx, t, f, web.IP)

	// A reboot: kubelet and every container go, and with them what lives
	// in /run and the kernel: the subnet file and the VXLAN device. Only
	// flanneld, which kubelet learns from the apiserver, makes them again.
	rebootStart := time.Now()
	if err := node.StopKubelet(); err != nil {
		t.Fatal(err)
	}
	if err := node.RemoveAllContainers(ctx); err != nil {
		t.Fatal(err)
	}
	if err := f.RemoveVolatile(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(f.SubnetFile); err == nil {
		t.Fatalf("subnet file %s survives the reboot", f.SubnetFile)
	}
	if _, err := net.InterfaceByName(f.Device); err == nil {
		t.Fatalf("VXLAN device %s survives the reboot", f.Device)
	}
	if _, err := framework.WebFile(ctx, net.JoinHostPort(web.IP, strconv.Itoa(framework.WebPodPort)), "/etc/config/greeting"); err == nil {
		t.Fatal("after the reboot the pod still serves")
	}
	if err := node.StartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	flannelBack := time.Since(rebootStart)
	checkFlannel(t, f)
	waitReady(ctx, t, node, f.Namespace, f.Pod, &flanneld)
	again := waitReady(ctx, t, node, namespace, framework.WebPodName, &web)
	checkPodNetwork(ctx, t, f, again.IP)
	rebootToServing := time.Since(rebootStart)

	t.Logf("cold start: node Ready %v, flannel ready (annotations, device, subnet file) %v, pod on flannel's network serving %v after start",
		ms(nodeReady), ms(flannelReady), ms(podReady))
	t.Logf("reboot: flannel ready again %v, pod serving again %v after StopKubelet (pod IP %s, then %s)",
		ms(flannelBack), ms(rebootToServing), web.IP, again.IP)
}

// TestFlannelThroughOutpost runs kubelet and flanneld through outpost, as
// on an edge node: flanneld's in-cluster config reaches outpost, trusting
// its serving CA, with its service account's token, and does its part
// there.
func TestFlannelThroughOutpost(t *testing.T) {
	framework.RequireRealNode(t)
	ctx := t.Context()
	const node, ns = "flannel-edge", "flannel-edge-web"

	if err := cp.CreateWebConfig(ctx, ns, greeting, password); err != nil {
		t.Fatal(err)
	}
	o := cp.StartOutpostT(t, node)
	kubeconfig, err := o.NodeKubeconfig()
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(o.URL)
	if err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	f := cp.StartFlannelNodeForTest(t, node, kubeconfig, framework.FlannelOptions{APIServer: u.Host, CAFile: o.ServingCAFile})
	pod := framework.WebPod(framework.WebPodName, node, false, framework.WebPodPort, framework.WebConfigMap, framework.WebSecret)
	if _, err := cp.Client().CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	flannelReady := time.Since(begin)
	checkFlannel(t, f)
	web := waitReady(ctx, t, f.Node, ns, framework.WebPodName, nil)
	checkPodNetwork(ctx, t, f, web.IP)
	t.Logf("through outpost: flannel ready %v, pod on flannel's network serving %v after start",
		flannelReady.Round(time.Millisecond), time.Since(begin).Round(time.Millisecond))
}

// waitReady waits until pod ns/name is Ready with a container other than
// before's, if given, and returns it.
func waitReady(ctx context.Context, t *testing.T, node *framework.Node, ns, name string, before *framework.RunningPod) framework.RunningPod {
	t.Helper()
	var prev map[string]framework.RunningPod
	if before != nil {
		prev = map[string]framework.RunningPod{name: *before}
	}
	got, err := node.WaitPodsReady(ctx, ns, []string{name}, prev)
	if err != nil {
		t.Fatal(err)
	}
	return got[name]
}

// checkFlannel checks what flanneld wrote: the Node's annotations and the
// subnet file.
func checkFlannel(t *testing.T, f *framework.Flannel) {
	t.Helper()
	ann, err := f.Annotations(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if ann["backend-type"] != "vxlan" || ann["kube-subnet-manager"] != "true" || ann["public-ip"] != f.PublicIP ||
		!strings.Contains(ann["backend-data"], `"VNI":`+strconv.Itoa(f.VNI)) {
		t.Errorf("node annotations %v, want the vxlan backend with VNI %d at %s", ann, f.VNI, f.PublicIP)
	}
	env, err := f.SubnetEnv()
	if err != nil {
		t.Fatal(err)
	}
	// VXLAN's 50 bytes off the veth's 1500; no masquerading.
	if env["FLANNEL_MTU"] != "1450" || env["FLANNEL_IPMASQ"] != "false" {
		t.Errorf("subnet file %s: %v, want FLANNEL_MTU=1450 and FLANNEL_IPMASQ=false", f.SubnetFile, env)
	}
}

// checkPodNetwork checks that the pod at ip got its address from flannel's
// CNI plugin, in the node's podCIDR, and that the host reaches it through
// the node's bridge.
func checkPodNetwork(ctx context.Context, t *testing.T, f *framework.Flannel, ip string) {
	t.Helper()
	_, podCIDR, err := net.ParseCIDR(f.Node.PodSubnet)
	if err != nil {
		t.Fatal(err)
	}
	if !podCIDR.Contains(net.ParseIP(ip)) {
		t.Errorf("pod IP %s is not in the node's podCIDR %s", ip, podCIDR)
	}
	sandboxes, err := f.CNISandboxes()
	if err != nil || len(sandboxes) == 0 {
		t.Errorf("flannel's CNI plugin set up no sandbox (%v)", err)
	}
	iface, err := net.InterfaceByName(f.Node.Bridge)
	if err != nil {
		t.Fatalf("bridge %s: %v", f.Node.Bridge, err)
	}
	if iface.MTU != 1450 {
		t.Errorf("bridge %s has MTU %d, want flannel's 1450", f.Node.Bridge, iface.MTU)
	}
	host := net.JoinHostPort(ip, strconv.Itoa(framework.WebPodPort))
	if err := framework.CheckWebConfig(ctx, host, greeting, password); err != nil {
		t.Fatal(err)
	}
}
