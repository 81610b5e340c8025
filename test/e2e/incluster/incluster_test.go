// Package incluster proves that pods reach outpost on their own node: a
// real kubelet behind outpost gives its pods KUBERNETES_SERVICE_HOST/PORT
// pointing at outpost's node-local address, their in-cluster clients (their
// own service-account token, the cluster CA from kube-root-ca.crt) are
// served by outpost online and, after an offline reboot, from its cache;
// nobody else sees the kubernetes Service changed.
package incluster

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	os.Exit(framework.Run(m, framework.Options{
		// kube-controller-manager signs the serving certificate, publishes
		// kube-root-ca.crt and keeps the kubernetes EndpointSlice; without
		// its node lifecycle controller nothing marks the node NotReady or
		// evicts its pods while the link is cut.
		ControllerManager:     true,
		ControllerManagerArgs: []string{"--controllers=*,bootstrapsigner,tokencleaner,-nodelifecycle"},
	}, &cp))
}

// kubernetesVIP is the kubernetes Service's ClusterIP: the first address of
// the framework's service CIDR, 10.0.0.0/24.
const kubernetesVIP = "10.0.0.1"

// apiserverEndpoint stands for the apiserver's address on the cluster's
// network: the framework's apiserver listens on loopback only, and the
// endpoints of a Service may not be loopback addresses, so it publishes
// none (--endpoint-reconciler-type=none). Like farPodIP, it lies in the
// service CIDR's static band, routed to lo while kube-proxy runs, so that
// nothing sent there leaves the machine.
const apiserverEndpoint = "10.0.0.14"

// publishAPIServerEndpoints writes the kubernetes Service's Endpoints and
// EndpointSlice as an apiserver on a real network keeps them.
func publishAPIServerEndpoints(t *testing.T) {
	t.Helper()
	ctx := t.Context()
	port, name, proto := int32(6443), "https", corev1.ProtocolTCP
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "kubernetes", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{apiserverEndpoint}}},
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}},
	}
	if _, err := cp.Client().DiscoveryV1().EndpointSlices("default").Create(ctx, slice, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// caBundle writes the certificates of files into one CA bundle.
func caBundle(t *testing.T, files ...string) string {
	t.Helper()
	var all []byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		all = append(append(all, b...), '\n')
	}
	path := filepath.Join(t.TempDir(), "ca-bundle.crt")
	if err := os.WriteFile(path, all, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// podGet asks a web pod at host ("ip:port") for path.
func podGet(ctx context.Context, host, path string) (string, error) {
	body, err := framework.GetOK(ctx, podClient, "http://"+host+path)
	return string(body), err
}

var podClient = &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{Proxy: nil}}

// inClusterGet has the web pod at host GET path from the Kubernetes API as
// an in-cluster client; it returns the status code and body.
func inClusterGet(ctx context.Context, host, path string) (int, string, error) {
	out, err := podGet(ctx, host, "/kube?path="+path)
	if err != nil {
		return 0, "", err
	}
	line, body, _ := strings.Cut(out, "\n")
	code, err := strconv.Atoi(line)
	return code, body, err
}

func figure(t *testing.T, format string, args ...any) {
	t.Helper()
	t.Logf("FIGURE "+format, args...)
}

// TestInClusterClientsThroughOutpost: pods' in-cluster clients reach outpost
// at its node-local address, online and after an offline reboot; the
// kubernetes Service and its endpoints are changed only for the node and
// kube-proxy, and only on the way out.
func TestInClusterClientsThroughOutpost(t *testing.T) {
	framework.RequireRealNode(t)
	const (
		node     = "incluster"
		ns       = "incluster"
		greeting = "read in-cluster, through outpost"
	)
	ctx := t.Context()
	admin := cp.Client()
	publishAPIServerEndpoints(t)
	ip := framework.AddNodeLocalAddress(t, 100, 100)
	local := netip.AddrPortFrom(ip, uint16(framework.FreePort(t)))
	cp.StartControllerT(t, "--leader-elect=false")
	o, link := cp.StartOutpostWithLinkT(t, node, append(slices.Clone(framework.LenientProbes),
		"--rotate-server-certificates", "--node-local-address="+local.String())...)

	// kubelet trusts outpost's self-signed certificate, which it serves
	// until outpost-controller approves its CSR (once the Node exists), and
	// the cluster CA, which signs the certificate after that.
	kubeconfig := filepath.Join(t.TempDir(), "kubelet.kubeconfig")
	if err := framework.WriteKubeconfig(kubeconfig, o.URL, caBundle(t, o.ServingCAFile, cp.CAFile), o.NodeCertFile, o.NodeKeyFile, ""); err != nil {
		t.Fatal(err)
	}
	if err := cp.CreateWebConfig(ctx, ns, greeting, "unused"); err != nil {
		t.Fatal(err)
	}
	// The pods' own service account may read; nobody lends them more.
	cp.ServiceAccountToken(t, ns, "default", framework.ReaderRole)
	begin := time.Now()
	n := cp.StartNodeForTest(t, node, kubeconfig)
	cp.WaitServing(t, local.String(), ip.String(), kubernetesVIP, "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "127.0.0.1")
	figure(t, "node start → outpost serves the certificate with the in-cluster names, approved by outpost-controller: %v", time.Since(begin).Round(time.Millisecond))
	hostPort := framework.FreePort(t)
	if err := cp.CreateWebPods(ctx, ns, node, hostPort); err != nil {
		t.Fatal(err)
	}
	pods := waitPods(t, ns, "")
	hosts := map[string]string{
		framework.WebPodName:  net.JoinHostPort(pods[framework.WebPodName].IP, strconv.Itoa(framework.WebPodPort)),
		framework.WebHostName: net.JoinHostPort("127.0.0.1", strconv.Itoa(hostPort)),
	}

	configMapPath := "/api/v1/namespaces/" + ns + "/configmaps/" + framework.WebConfigMap
	checkPods := func(ctx context.Context) error {
		for name, host := range hosts {
			for env, want := range map[string]string{"KUBERNETES_SERVICE_HOST": ip.String(), "KUBERNETES_SERVICE_PORT": strconv.Itoa(int(local.Port()))} {
				got, err := podGet(ctx, host, "/env?name="+env)
				if err != nil {
					return fmt.Errorf("%s: %v", name, err)
				}
				if got != want {
					return fmt.Errorf("%s: %s=%q, want outpost's %q", name, env, got, want)
				}
			}
			code, body, err := inClusterGet(ctx, host, configMapPath)
			if err != nil {
				return fmt.Errorf("%s: in-cluster GET: %v", name, err)
			}
			if code != http.StatusOK || !strings.Contains(body, greeting) {
				return fmt.Errorf("%s: in-cluster GET answered %d: %.200s", name, code, body)
			}
		}
		return nil
	}
	t.Run("invisible to others", func(t *testing.T) {
		checkTruth(t, o, node)
	})
	if err := checkPods(ctx); err != nil {
		t.Fatalf("online: %v", err)
	}
	podSA := "serviceaccount:" + ns + "/default"
	if v := metric(t, o, "outpost_client_requests_total", "client="+podSA, "served_by!=cache", "served_by!=outpost"); v < 2 {
		t.Errorf("outpost saw %v requests of %s online; the pods' in-cluster reads did not come through it", v, podSA)
	}

	asNode := kubernetes.NewForConfigOrDie(withClusterCA(o.ClientConfig(o.NodeCertFile, o.NodeKeyFile, "")))

	// Cut the link and reboot the node offline.
	link.Blackhole()
	if _, err := o.WaitState(ctx, "offline", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	cachedBefore := metric(t, o, "outpost_client_requests_total", "client="+podSA, "served_by=cache")
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
	_, err := framework.Poll(ctx, 200*time.Millisecond, 90*time.Second, func(ctx context.Context) (bool, string) {
		// The cloud cannot see the new pod IP; the node, through
		// outpost, sees the status its kubelet reported locally.
		pod, err := asNode.CoreV1().Pods(ns).Get(ctx, framework.WebPodName, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		p, ok := framework.ReadyPod(pod)
		if !ok || p.ContainerID == pods[framework.WebPodName].ContainerID {
			return false, "new pod not ready yet: " + framework.DescribePod(pod)
		}
		hosts[framework.WebPodName] = net.JoinHostPort(p.IP, strconv.Itoa(framework.WebPodPort))
		if err := checkPods(ctx); err != nil {
			return false, err.Error()
		}
		return true, ""
	})
	if err != nil {
		t.Fatalf("offline after the reboot: %v", err)
	}
	figure(t, "offline reboot → both pods' in-cluster reads answered from outpost's cache: %v", time.Since(rebootAt).Round(time.Millisecond))
	if v := metric(t, o, "outpost_client_requests_total", "client="+podSA, "served_by=cache") - cachedBefore; v < 2 {
		t.Errorf("offline, %v requests of %s were served from the cache", v, podSA)
	}

	// The link returns; a change made in the cloud meanwhile reaches the
	// pods' in-cluster reads.
	changed := greeting + " (changed)"
	cm, err := admin.CoreV1().ConfigMaps(ns).Get(ctx, framework.WebConfigMap, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm.Data["greeting"] = changed
	if _, err := admin.CoreV1().ConfigMaps(ns).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	link.Pass()
	if _, err := o.WaitState(ctx, "online", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	_, err = framework.Poll(ctx, 200*time.Millisecond, 30*time.Second, func(ctx context.Context) (bool, string) {
		code, body, err := inClusterGet(ctx, hosts[framework.WebPodName], configMapPath)
		return err == nil && code == http.StatusOK && strings.Contains(body, changed), fmt.Sprintf("%d %v %.100s", code, err, body)
	})
	if err != nil {
		t.Fatalf("after the reconnect, the pod's in-cluster read does not see the cloud's change: %v", err)
	}
	checkTruth(t, o, node)
}

// waitPods waits until both web pods in ns are Ready, as the apiserver sees
// them, and returns them by name.
func waitPods(t *testing.T, ns, _ string) map[string]framework.RunningPod {
	t.Helper()
	pods := map[string]framework.RunningPod{}
	_, err := framework.Poll(t.Context(), 200*time.Millisecond, 90*time.Second, func(ctx context.Context) (bool, string) {
		var waiting []string
		for _, name := range []string{framework.WebPodName, framework.WebHostName} {
			pod, err := cp.Client().CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				waiting = append(waiting, err.Error())
				continue
			}
			p, ok := framework.ReadyPod(pod)
			if !ok {
				waiting = append(waiting, framework.DescribePod(pod))
				continue
			}
			pods[name] = p
		}
		return len(waiting) == 0, strings.Join(waiting, "; ")
	})
	if err != nil {
		t.Fatal(err)
	}
	return pods
}

// checkTruth: the apiserver, and through outpost anyone but the node and
// kube-proxy, see the kubernetes Service and its EndpointSlice as the
// apiserver has them; the node sees the Service, and kube-proxy the slice,
// pointing at outpost.
func checkTruth(t *testing.T, o *framework.Outpost, node string) {
	t.Helper()
	ctx := t.Context()
	direct, err := cp.Client().CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if direct.Spec.ClusterIP != kubernetesVIP {
		t.Fatalf("the apiserver's kubernetes Service has ClusterIP %s", direct.Spec.ClusterIP)
	}
	directSlice, err := cp.Client().DiscoveryV1().EndpointSlices("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	viaOutpost := func(cfg *rest.Config) kubernetes.Interface { return kubernetes.NewForConfigOrDie(withClusterCA(cfg)) }
	other := viaOutpost(o.ClientConfig("", "", cp.ServiceAccountToken(t, "default", "truth-reader", framework.ReaderRole)))
	proxy := viaOutpost(o.ClientConfig("", "", cp.ServiceAccountToken(t, "kube-system", "kube-proxy", framework.ReaderRole)))
	kubelet := viaOutpost(o.ClientConfig(o.NodeCertFile, o.NodeKeyFile, ""))

	svc, err := other.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if svc.Spec.ClusterIP != direct.Spec.ClusterIP || svc.Spec.Ports[0].Port != direct.Spec.Ports[0].Port || svc.ResourceVersion != direct.ResourceVersion {
		t.Errorf("another identity through outpost sees the kubernetes Service changed: %+v", svc.Spec)
	}
	slice, err := other.DiscoveryV1().EndpointSlices("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.EqualFunc(slice.Endpoints, directSlice.Endpoints, func(a, b discoveryv1.Endpoint) bool { return slices.Equal(a.Addresses, b.Addresses) }) {
		t.Errorf("another identity through outpost sees the kubernetes EndpointSlice changed: %+v", slice.Endpoints)
	}
	nodeSvc, err := kubelet.CoreV1().Services(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range nodeSvc.Items {
		if s.Namespace == "default" && s.Name == "kubernetes" && s.Spec.ClusterIP == kubernetesVIP {
			t.Errorf("the node through outpost sees the kubernetes Service unchanged: %+v", s.Spec)
		}
	}
	slices, err := proxy.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=kubernetes"})
	if err != nil {
		t.Fatal(err)
	}
	if len(slices.Items) != 1 || len(slices.Items[0].Endpoints) != 1 || len(slices.Items[0].Endpoints[0].Addresses) != 1 ||
		!strings.HasPrefix(slices.Items[0].Endpoints[0].Addresses[0], "169.254.") {
		t.Errorf("kube-proxy through outpost does not see the kubernetes EndpointSlice pointing at outpost: %+v", slices.Items)
	}
}

// withClusterCA makes cfg trust the cluster CA, which signed outpost's
// serving certificate.
func withClusterCA(cfg *rest.Config) *rest.Config {
	cfg = rest.CopyConfig(cfg)
	cfg.TLSClientConfig.CAFile = cp.CAFile
	return cfg
}

// metric reads a counter from outpost's /metrics.
func metric(t *testing.T, o *framework.Outpost, name string, match ...string) float64 {
	t.Helper()
	v, err := o.Metric(name, match...)
	if err != nil {
		t.Error(err)
	}
	return v
}
