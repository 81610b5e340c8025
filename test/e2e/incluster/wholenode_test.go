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
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// Zones of the site test: the node's, and another site's.
const (
	zoneLabel = "topology.kubernetes.io/zone"
	siteZone  = "site-a"
	farZone   = "site-b"
	// farPodIP is the address of the web endpoint at the other site. It
	// must not be reachable, and traffic to it must not leave the machine
	// (TEST-NET-1 is this machine's own network): it is in the service
	// CIDR's static band, which Services get only on request and which the
	// framework routes to lo while kube-proxy runs, so a connection
	// kube-proxy sent there would fail here.
	farPodIP = "10.0.0.15"
)

// A wholeNode is the seed's whole node: kubelet, kube-proxy (nftables),
// flannel as the CNI agent, coredns and a web Deployment behind a ClusterIP
// Service, either all through outpost or all straight to the apiserver.
type wholeNode struct {
	ns    string
	n     *framework.Node
	f     *framework.Flannel
	kp    *framework.KubeProxy    // kube-proxy as a node process, or
	kpPod *framework.KubeProxyPod // kube-proxy as kubeadm runs it
	vip   string                  // the web Service's ClusterIP
	name  string                  // its DNS name
}

// A proxyRun says how kube-proxy runs: as a node process in mode with
// kubeconfig, or (asPod) as kubeadm runs it, a pod with the in-cluster
// config kubelet gives it, in nftables mode.
type proxyRun struct {
	mode       framework.KubeProxyMode
	kubeconfig string
	asPod      bool
}

func (p proxyRun) String() string {
	if p.asPod {
		return "nftables, as a pod with in-cluster config"
	}
	return string(p.mode) + ", as a node process"
}

// proxyLog is the end of kube-proxy's log.
func (w *wholeNode) proxyLog() string {
	if w.kpPod != nil {
		return w.kpPod.Log(20)
	}
	return w.kp.Log(20)
}

// startWholeNode starts the node called node with kubelet's kubeconfig and
// kube-proxy's, and flannel and coredns as given, then the web app. It
// returns once the web Service's name resolves and its VIP serves.
func startWholeNode(t *testing.T, node, kubeletConfig string, proxy proxyRun, flannel framework.FlannelOptions, dns framework.CoreDNSConfig) *wholeNode {
	t.Helper()
	ctx := t.Context()
	w := &wholeNode{ns: node}
	w.f = cp.StartFlannelNodeForTest(t, node, kubeletConfig, flannel)
	w.n = w.f.Node
	if _, err := w.f.WaitReady(ctx); err != nil {
		t.Fatalf("%v\nflanneld:\n%s", err, w.f.Log(20))
	}
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, zoneLabel, siteZone)
	if _, err := cp.Client().CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := w.n.SetClusterDNS(ctx, framework.KubeDNSIP); err != nil {
		t.Fatal(err)
	}
	if proxy.asPod {
		w.kpPod = w.n.StartKubeProxyPodForTest(t, framework.KubeProxyPodOptions{})
	} else {
		w.kp = w.n.StartKubeProxyForTest(t, proxy.kubeconfig, proxy.mode)
	}
	w.n.DeployCoreDNSForTest(t, dns)
	w.vip = createSiteWeb(t, w.ns, node)
	// The web pods' own service account may read (checkKubernetesVIP).
	cp.ServiceAccountToken(t, w.ns, "default", framework.ReaderRole)
	w.name = fmt.Sprintf("web.%s.svc.%s", w.ns, framework.ClusterDomain)
	if err := w.serving(ctx, 90*time.Second); err != nil {
		t.Fatalf("online: %v\nkube-proxy:\n%s", err, w.proxyLog())
	}
	return w
}

// serving waits until the web Service's name resolves through coredns to
// its VIP and the VIP serves, every time, from the node's own pod.
func (w *wholeNode) serving(ctx context.Context, timeout time.Duration) error {
	_, err := framework.Poll(ctx, 200*time.Millisecond, timeout, func(ctx context.Context) (bool, string) {
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		addrs, err := framework.LookupIPv4(qctx, framework.KubeDNSIP, w.name)
		cancel()
		if err != nil {
			return false, "DNS: " + err.Error()
		}
		if len(addrs) != 1 || addrs[0].String() != w.vip {
			return false, fmt.Sprintf("DNS: %s is %v, want %s", w.name, addrs, w.vip)
		}
		// The Service prefers its own zone: kube-proxy must never send a
		// connection to the other site's endpoint, which is dead.
		for range 10 {
			if _, err := framework.GetOK(ctx, vipClient, "http://"+net.JoinHostPort(w.vip, "80")+"/healthz"); err != nil {
				return false, "VIP: " + err.Error()
			}
		}
		return true, ""
	})
	return err
}

var vipClient = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}

// reboot reboots the node with its link cut: kubelet and kube-proxy stop,
// every container goes, kube-proxy's nftables tables and flannel's subnet
// file and device with them; then both start again.
func (w *wholeNode) reboot(t *testing.T) time.Time {
	t.Helper()
	ctx := t.Context()
	if w.kp != nil {
		if err := w.kp.Stop(); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.n.StopKubelet(); err != nil {
		t.Fatal(err)
	}
	if err := w.n.RemoveAllContainers(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.f.RemoveVolatile(); err != nil {
		t.Fatal(err)
	}
	var left []string
	if w.kpPod != nil {
		if err := w.kpPod.DeleteRules(); err != nil {
			t.Fatal(err)
		}
		left = w.kpPod.Leftovers()
	} else {
		left = w.kp.Leftovers()
	}
	if len(left) > 0 {
		t.Fatalf("kube-proxy's rules survived the reboot: %v", left)
	}
	at := time.Now()
	if err := w.n.StartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	if w.kp != nil {
		// kube-proxy's own start waits for its rules, which it cannot
		// make without the API: start it in the background, as systemd
		// would. (As a pod, kubelet starts it again.)
		go func() { _ = w.kp.Start(context.WithoutCancel(ctx)) }()
	}
	return at
}

// createSiteWeb creates in ns a web Deployment of one pod on node and a
// ClusterIP Service web preferring its own zone, whose other endpoint is a
// pod of a Node at another site (farZone) that no kubelet runs: its status
// says Ready at farPodIP. It returns the Service's ClusterIP.
func createSiteWeb(t *testing.T, ns, node string) string {
	t.Helper()
	ctx := t.Context()
	client := cp.Client()
	if err := cp.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	// The Deployment selects app=web, the Service svc=web: the other site's
	// pod is the Service's endpoint, not the ReplicaSet's to adopt.
	template := corev1.PodTemplateSpec{
		ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "web", "svc": "web"}},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			EnableServiceLinks:            new(false),
			TerminationGracePeriodSeconds: new(int64(1)),
			Containers: []corev1.Container{{
				Name:            "web",
				Image:           framework.WebImage,
				ImagePullPolicy: corev1.PullNever,
				Command:         []string{framework.WebBinary, fmt.Sprintf("-addr=:%d", framework.WebPodPort)},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromInt(framework.WebPodPort), Path: "/healthz"}},
					PeriodSeconds: 1,
				},
			}},
		},
	}
	deploy := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec:       appsv1.DeploymentSpec{Replicas: new(int32(1)), Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}, Template: template},
	}
	if _, err := client.AppsV1().Deployments(ns).Create(ctx, deploy, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	far := "far-" + node
	if _, err := client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: far, Labels: map[string]string{zoneLabel: farZone}}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	farPod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-far", Labels: map[string]string{"svc": "web"}},
		Spec:       *template.Spec.DeepCopy(),
	}
	farPod.Spec.NodeName = far
	created, err := client.CoreV1().Pods(ns).Create(ctx, farPod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	created.Status = corev1.PodStatus{
		Phase: corev1.PodRunning, PodIP: farPodIP, PodIPs: []corev1.PodIP{{IP: farPodIP}}, StartTime: &metav1.Time{Time: time.Now()},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}, {Type: corev1.ContainersReady, Status: corev1.ConditionTrue}},
	}
	if _, err := client.CoreV1().Pods(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		force := metav1.DeleteOptions{GracePeriodSeconds: new(int64)}
		_ = client.CoreV1().Pods(ns).Delete(ctx, "web-far", force)
		_ = client.CoreV1().Nodes().Delete(ctx, far, metav1.DeleteOptions{})
	})
	prefer := corev1.ServiceTrafficDistributionPreferSameZone
	svc, err := client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Selector:            map[string]string{"svc": "web"},
			Ports:               []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt(framework.WebPodPort)}},
			TrafficDistribution: &prefer,
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return svc.Spec.ClusterIP
}

// kubeProxyToken returns a token of kube-system/kube-proxy, the service
// account kubeadm's kube-proxy runs as, bound to system:node-proxier.
func kubeProxyToken(t *testing.T) string {
	t.Helper()
	token := cp.ServiceAccountToken(t, "kube-system", "kube-proxy", framework.ReaderRole)
	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "outpost-e2e:kube-proxy"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:node-proxier"},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: "kube-system", Name: "kube-proxy"}},
	}
	if _, err := cp.Client().RbacV1().ClusterRoleBindings().Create(t.Context(), crb, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	return token
}

// TestWholeNodeRebootOffline is the seed's whole node behind outpost:
// kubelet and kube-proxy (nftables) with kubeconfigs pointing at outpost,
// flannel and coredns as pods with the in-cluster config kubelet gives
// them (which leads to outpost's node-local address), and a web Service
// that prefers its own zone. Online the web Service's name resolves and its
// VIP serves; the link is cut and the node rebooted; from outpost's cache
// alone coredns answers again, the VIP serves again from this site's
// endpoint only, and flannel runs; the in-cluster clients were answered
// from the cache; once the link returns, a Service created during the
// outage reaches kube-proxy's rules.
func TestWholeNodeRebootOffline(t *testing.T) {
	wholeNodeThroughOutpost(t, "whole", proxyRun{mode: framework.KubeProxyNFTables})
}

// TestWholeNodeRebootOfflineIPTables is the same with kube-proxy in
// iptables mode.
func TestWholeNodeRebootOfflineIPTables(t *testing.T) {
	wholeNodeThroughOutpost(t, "whole-ipt", proxyRun{mode: framework.KubeProxyIPTables})
}

// TestWholeNodeRebootOfflineKubeadm is the same with kube-proxy as kubeadm
// runs it: a pod with the in-cluster config kubelet gives it, which leads
// to outpost's node-local address.
func TestWholeNodeRebootOfflineKubeadm(t *testing.T) {
	wholeNodeThroughOutpost(t, "whole-pod", proxyRun{mode: framework.KubeProxyNFTables, asPod: true})
}

func wholeNodeThroughOutpost(t *testing.T, node string, proxy proxyRun) {
	framework.RequireRealNode(t)
	ctx := t.Context()
	publishAPIServerEndpoints(t)
	ip := framework.AddNodeLocalAddress(t, 100, 100)
	local := netip.AddrPortFrom(ip, uint16(framework.FreePort(t)))
	// The Node is registered ahead, as an operator may: outpost-controller
	// approves the serving CSR at once, and the pods, whose in-cluster
	// clients verify it, start after.
	cp.StartControllerT(t, "--leader-elect=false")
	cp.CreateNode(t, node, nil)
	o, link := cp.StartOutpostWithLinkT(t, node, append(slices.Clone(framework.LenientProbes),
		"--rotate-server-certificates", "--node-local-address="+local.String())...)
	cp.WaitServing(t, local.String(), ip.String(), kubernetesVIP, "kubernetes.default.svc")

	dir := t.TempDir()
	kubeletConfig := filepath.Join(dir, "kubelet.kubeconfig")
	if err := framework.WriteKubeconfig(kubeletConfig, o.URL, cp.CAFile, o.NodeCertFile, o.NodeKeyFile, ""); err != nil {
		t.Fatal(err)
	}
	proxyConfig := filepath.Join(dir, "kube-proxy.kubeconfig")
	if err := framework.WriteKubeconfig(proxyConfig, o.URL, cp.CAFile, "", "", kubeProxyToken(t)); err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	proxy.kubeconfig = proxyConfig
	w := startWholeNode(t, node, kubeletConfig, proxy,
		framework.FlannelOptions{FromKubelet: true}, framework.CoreDNSConfig{InCluster: true})
	figure(t, "whole node through outpost (kube-proxy %s): web Service resolved and serving %v after the node started", proxy, time.Since(begin).Round(time.Millisecond))
	checkKubernetesVIP(t, w)

	inCluster := []string{"serviceaccount:kube-system/coredns", "serviceaccount:kube-flannel/flannel", "serviceaccount:kube-system/kube-proxy"}
	for _, c := range inCluster {
		// Answered online: by the apiservers, or with --watch-cache
		// (OUTPOST_E2E_ARGS) from a stream shared by the node's clients.
		if v := metric(t, o, "outpost_client_requests_total", "client="+c, "served_by!=cache", "served_by!=outpost"); v < 1 {
			t.Errorf("online, outpost saw no request of %s", c)
		}
	}

	link.Blackhole()
	if _, err := o.WaitState(ctx, "offline", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	cachedBefore := map[string]float64{}
	for _, c := range inCluster {
		cachedBefore[c] = metric(t, o, "outpost_client_requests_total", "client="+c, "served_by=cache")
	}
	rebootAt := w.reboot(t)
	if _, err := w.f.WaitReady(ctx); err != nil {
		t.Errorf("offline after the reboot, flannel: %v", err)
	} else {
		figure(t, "offline reboot → flannel ready (subnet file and VXLAN device), from outpost's cache: %v", time.Since(rebootAt).Round(time.Millisecond))
	}
	if err := w.serving(ctx, 90*time.Second); err != nil {
		t.Fatalf("offline after the reboot: %v\nkube-proxy:\n%s\ncoredns and flannel pods: %s", err, w.proxyLog(), describePods(t))
	}
	figure(t, "offline reboot (kube-proxy %s) → coredns answers and the VIP serves (this site's endpoint only), from outpost's cache: %v", proxy, time.Since(rebootAt).Round(time.Millisecond))
	if first, last, n := cniRefusals(t, w.n, rebootAt); n > 0 {
		figure(t, "  of which: kubelet's first %d pod syncs failed from +%v to +%v after the reboot, because flannel had not yet written its subnet file; kubelet retries a failed pod only after its 10–15 s back-off",
			n, first.Round(time.Millisecond), last.Round(time.Millisecond))
	}
	checkEndpointsFollow(t, o, w)
	checkKubernetesVIP(t, w)
	for _, c := range inCluster {
		if v := metric(t, o, "outpost_client_requests_total", "client="+c, "served_by=cache") - cachedBefore[c]; v < 1 {
			t.Errorf("offline after the reboot, no request of %s was answered from the cache", c)
		}
	}

	// A Service created during the outage reaches kube-proxy once the link
	// returns.
	client := cp.Client()
	svc, err := client.CoreV1().Services(w.ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web-new"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Port: 8081, TargetPort: intstr.FromInt(framework.WebPodPort)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	newVIP := "http://" + net.JoinHostPort(svc.Spec.ClusterIP, "8081") + "/healthz"
	if _, err := framework.GetOK(ctx, vipClient, newVIP); err == nil {
		t.Error("offline, a Service the cloud created meanwhile already serves")
	}
	link.Pass()
	if _, err := o.WaitState(ctx, "online", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	restoreAt := time.Now()
	if _, err := framework.Poll(ctx, 200*time.Millisecond, 60*time.Second, func(ctx context.Context) (bool, string) {
		_, err := framework.GetOK(ctx, vipClient, newVIP)
		return err == nil, fmt.Sprint(err)
	}); err != nil {
		t.Fatalf("after the reconnect, the Service created during the outage does not serve: %v", err)
	}
	figure(t, "link back → a Service created during the outage serves at its VIP: %v", time.Since(restoreAt).Round(time.Millisecond))
	if err := w.serving(ctx, 30*time.Second); err != nil {
		t.Errorf("after the reconnect: %v", err)
	}
}

// TestWholeNodeStraightToAPIServer is the negative control: the same node
// with every component pointed straight at the apiserver (through a link
// the test cuts) loses DNS and the VIP in the same offline reboot.
func TestWholeNodeStraightToAPIServer(t *testing.T) {
	framework.RequireRealNode(t)
	const node = "straight"
	ctx := t.Context()
	link, err := framework.StartFaultProxy(cp.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { link.Close() })
	dir := t.TempDir()
	kubeletConfig := filepath.Join(dir, "kubelet.kubeconfig")
	certFile, keyFile, err := cp.NodeCredentials(node)
	if err != nil {
		t.Fatal(err)
	}
	if err := framework.WriteKubeconfig(kubeletConfig, link.URL(), cp.CAFile, certFile, keyFile, ""); err != nil {
		t.Fatal(err)
	}
	proxyConfig := filepath.Join(dir, "kube-proxy.kubeconfig")
	if err := framework.WriteKubeconfig(proxyConfig, link.URL(), cp.CAFile, "", "", kubeProxyToken(t)); err != nil {
		t.Fatal(err)
	}
	host := strings.TrimPrefix(link.URL(), "https://")
	w := startWholeNode(t, node, kubeletConfig, proxyRun{mode: framework.KubeProxyNFTables, kubeconfig: proxyConfig},
		framework.FlannelOptions{APIServer: host}, framework.CoreDNSConfig{Server: link.URL()})

	link.Blackhole()
	rebootAt := w.reboot(t)
	const wait = 30 * time.Second
	err = w.serving(ctx, wait)
	if err == nil {
		t.Fatalf("straight to the unreachable apiserver, the rebooted node resolved and served its Service after %v: the control proves nothing", time.Since(rebootAt).Round(time.Millisecond))
	}
	t.Logf("straight to the apiserver, %v after the offline reboot the Service is still dead, as expected: %v", wait, err)
	link.Pass()
}

// cniRefusals reads the node's kubelet log from since on and returns when
// (after since) the first and last pod syncs failed because flannel's CNI
// plugin found no subnet file, and how many did.
func cniRefusals(t *testing.T, n *framework.Node, since time.Time) (first, last time.Duration, count int) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(n.Dir, "kubelet.log"))
	if err != nil {
		t.Log(err)
		return 0, 0, 0
	}
	for line := range strings.Lines(string(data)) {
		if !strings.Contains(line, "Error syncing pod") || !strings.Contains(line, "subnet.env") || len(line) < 21 {
			continue
		}
		// klog: Lmmdd hh:mm:ss.uuuuuu
		at, err := time.ParseInLocation("0102 15:04:05.000000", line[1:21], time.Local)
		if err != nil {
			continue
		}
		at = at.AddDate(since.Year(), 0, 0)
		if at.Before(since) {
			continue
		}
		if count == 0 {
			first = at.Sub(since)
		}
		last = at.Sub(since)
		count++
	}
	return first, last, count
}

// checkEndpointsFollow: offline, kube-proxy sees the web Service's endpoint
// on this node at the address its pod has now, which the cloud never heard
// of, while the cloud still has the one from before the reboot.
func checkEndpointsFollow(t *testing.T, o *framework.Outpost, w *wholeNode) {
	t.Helper()
	ctx := t.Context()
	asNode := kubernetes.NewForConfigOrDie(withClusterCA(o.ClientConfig(o.NodeCertFile, o.NodeKeyFile, "")))
	// What kubelet reads: its pods, by field selector.
	pods, err := asNode.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + w.n.Name})
	if err != nil {
		t.Errorf("the node's pods through outpost: %v", err)
		return
	}
	now := ""
	for _, p := range pods.Items {
		if p.Namespace == w.ns && p.Labels["app"] == "web" {
			now = p.Status.PodIP
		}
	}
	proxy := kubernetes.NewForConfigOrDie(withClusterCA(o.ClientConfig("", "", kubeProxyToken(t))))
	// What kube-proxy v1.37 reads: every namespace, this selector.
	seen, err := proxy.DiscoveryV1().EndpointSlices(metav1.NamespaceAll).List(ctx, metav1.ListOptions{LabelSelector: "!service.kubernetes.io/headless"})
	if err != nil {
		views, _ := framework.GetOK(ctx, nil, o.AdminURL+"/debug/cache/views")
		t.Errorf("kube-proxy's view of the web EndpointSlices: %v\noutpost's views:\n%s", err, views)
		return
	}
	cloud, err := cp.Client().DiscoveryV1().EndpointSlices(w.ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=web"})
	if err != nil {
		t.Fatal(err)
	}
	addresses := func(l *discoveryv1.EndpointSliceList) []string {
		var out []string
		for _, s := range l.Items {
			if s.Namespace != w.ns || s.Labels[discoveryv1.LabelServiceName] != "web" {
				continue
			}
			for _, e := range s.Endpoints {
				if e.NodeName != nil && *e.NodeName == w.n.Name {
					out = append(out, e.Addresses...)
				}
			}
		}
		return out
	}
	if got := addresses(seen); !slices.Equal(got, []string{now}) {
		t.Errorf("offline, kube-proxy sees the web pod's endpoint at %v; the pod is at %s", got, now)
	}
	t.Logf("offline: the web pod is at %s; kube-proxy sees its endpoint at %v through outpost; the cloud still says %v", now, addresses(seen), addresses(cloud))
}

// checkKubernetesVIP: a pod reaches outpost through the kubernetes
// Service's VIP, as kube-proxy's rules (from the rewritten EndpointSlice)
// send it there: the web pod GETs its own Service as an in-cluster client
// at 10.0.0.1:443 and at kubernetes.default.svc:443 (which coredns
// resolves to the VIP), verified against the cluster CA.
func checkKubernetesVIP(t *testing.T, w *wholeNode) {
	t.Helper()
	for _, host := range []string{kubernetesVIP, "kubernetes.default.svc"} {
		url := "http://" + net.JoinHostPort(w.vip, "80") + "/kube?host=" + host + ":443&path=/api/v1/namespaces/" + w.ns + "/services/web"
		body, err := framework.GetOK(t.Context(), vipClient, url)
		if err != nil || !strings.HasPrefix(string(body), "200\n") {
			t.Errorf("a pod's in-cluster GET through the kubernetes Service at %s: %v %.200s", host, err, body)
		}
	}
}

// describePods lists the pods of the node as outpost's cache holds them,
// for failure messages.
func describePods(t *testing.T) string {
	pods, err := cp.Client().CoreV1().Pods(metav1.NamespaceAll).List(t.Context(), metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var out []string
	for i := range pods.Items {
		out = append(out, framework.DescribePod(&pods.Items[i]))
	}
	return strings.Join(out, "; ")
}
