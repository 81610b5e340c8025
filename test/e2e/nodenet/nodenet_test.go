package nodenet

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/outposthq/outpost/test/e2e/framework"
)

func TestServiceAndDNSNFTables(t *testing.T) {
	testServiceAndDNS(t, framework.KubeProxyNFTables)
}

func TestServiceAndDNSIPTables(t *testing.T) {
	testServiceAndDNS(t, framework.KubeProxyIPTables)
}

// testServiceAndDNS runs a real node with kube-proxy in mode and CoreDNS,
// and a web Deployment behind a ClusterIP Service; from the host it resolves
// the Service's name at the kube-dns virtual IP and gets the web pod's answer
// at the address it resolved.
func testServiceAndDNS(t *testing.T, mode framework.KubeProxyMode) {
	framework.RequireRealNode(t)
	ctx := t.Context()
	begin := time.Now()
	node := "nodenet-" + string(mode)
	kubeconfig, err := cp.NodeKubeconfig(node, cp.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	n := cp.StartNodeForTest(t, node, kubeconfig)
	if err := n.SetClusterDNS(ctx, framework.KubeDNSIP); err != nil {
		t.Fatal(err)
	}
	t.Logf("node ready, cluster DNS set: %v", since(begin))

	proxyConfig, err := cp.KubeProxyKubeconfig(cp.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	kp := n.StartKubeProxyForTest(t, proxyConfig, mode)
	t.Logf("kube-proxy (%s) synced: %v", mode, since(begin))
	n.DeployCoreDNSForTest(t, framework.CoreDNSConfig{Server: cp.URL(0)})
	t.Logf("coredns ready: %v", since(begin))

	ns := "web-" + string(mode)
	svc := createWeb(t, ns, node)
	pod := waitWebReady(t, n, ns)
	t.Logf("web pod %s ready behind %s: %v", pod, svc.Spec.ClusterIP, since(begin))

	// The Service's name, as the host's own query to the kube-dns VIP
	// finds it: kube-proxy carries the query to the CoreDNS pod.
	name := fmt.Sprintf("web.%s.svc.%s", ns, framework.ClusterDomain)
	var addrs []netip.Addr
	_, err = framework.Poll(ctx, 200*time.Millisecond, 30*time.Second, func(ctx context.Context) (bool, string) {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		addrs, err = framework.LookupIPv4(ctx, framework.KubeDNSIP, name)
		if err != nil {
			return false, err.Error()
		}
		return true, ""
	})
	if err != nil {
		t.Fatalf("resolving %s at %s: %v", name, framework.KubeDNSIP, err)
	}
	if len(addrs) != 1 || addrs[0].String() != svc.Spec.ClusterIP {
		t.Fatalf("%s resolved to %v, want the ClusterIP %s", name, addrs, svc.Spec.ClusterIP)
	}
	t.Logf("%s -> %v: %v", name, addrs, since(begin))

	// The web pod answers at the virtual IP: its hostname is its name.
	base := "http://" + addrs[0].String() + ":80"
	checkWebAt(t, base, pod)
	// kubelet gave the pod (dnsPolicy ClusterFirst) the cluster DNS.
	body, err := framework.GetOK(ctx, webClient, base+"/file?path=/etc/resolv.conf")
	if err != nil {
		t.Fatalf("GET the web pod's resolv.conf: %v", err)
	}
	if !strings.Contains(string(body), "nameserver "+framework.KubeDNSIP) || !strings.Contains(string(body), "svc."+framework.ClusterDomain) {
		t.Errorf("the web pod's resolv.conf does not name the cluster DNS:\n%s", body)
	}
	t.Logf("web pod answered at %s: %v", base, since(begin))

	// A "reboot" of kube-proxy: stopped, its rules gone with it, then
	// started again from nothing; the VIP answers again.
	if err := kp.Stop(); err != nil {
		t.Fatal(err)
	}
	if left := kp.Leftovers(); len(left) > 0 {
		t.Fatalf("kube-proxy stopped, but the host still holds:\n  %s", strings.Join(left, "\n  "))
	}
	restart := time.Now()
	if err := kp.Start(ctx); err != nil {
		t.Fatal(err)
	}
	checkWebAt(t, base, pod)
	t.Logf("kube-proxy restarted from no rules, web pod answered at its VIP again: %v", since(restart))
}

// webClient reaches Service VIPs and pods: the environment's proxy settings
// cannot.
// Each request a connection of its own: one made before kube-proxy had a
// rule for the VIP would never be rewritten.
var webClient = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}

// checkWebAt waits until the web Service answers at base with the
// hostname of pod: kube-proxy may not have synced the Service's endpoint
// yet (its rules then reject the connection).
func checkWebAt(t *testing.T, base, pod string) {
	t.Helper()
	var body []byte
	_, err := framework.Poll(t.Context(), 200*time.Millisecond, 30*time.Second, func(ctx context.Context) (bool, string) {
		var err error
		body, err = framework.GetOK(ctx, webClient, base+"/file?path=/etc/hostname")
		if err != nil {
			return false, err.Error()
		}
		return true, ""
	})
	if err != nil {
		t.Fatalf("GET the web Service at %s: %v", base, err)
	}
	if got := strings.TrimSpace(string(body)); got != pod {
		t.Fatalf("the web Service at %s answered from %q, want the pod %q", base, got, pod)
	}
}

// createWeb creates namespace ns, a Deployment of one web pod bound to node
// and a ClusterIP Service web on port 80 in front of it, deleted when the
// test ends, and returns the Service.
func createWeb(t *testing.T, ns, node string) *corev1.Service {
	t.Helper()
	ctx := t.Context()
	if err := cp.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"app": "web"}
	deploy := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: appsv1.DeploymentSpec{
			Replicas: new(int32(1)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
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
							ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
								Port: intstr.FromInt(framework.WebPodPort), Path: "/healthz",
							}},
							PeriodSeconds: 1,
						},
					}},
				},
			},
		},
	}
	client := cp.Client()
	if _, err := client.AppsV1().Deployments(ns).Create(ctx, deploy, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc, err := client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Selector: labels,
			Ports:    []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt(framework.WebPodPort)}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		foreground := metav1.DeletePropagationForeground
		_ = client.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{})
		if err := client.AppsV1().Deployments(ns).Delete(ctx, "web", metav1.DeleteOptions{PropagationPolicy: &foreground}); err != nil {
			t.Errorf("deleting the web Deployment: %v", err)
		}
	})
	return svc
}

// waitWebReady waits until the web Deployment's pod is Ready and the web
// Service's EndpointSlice lists it, and returns the pod's name.
func waitWebReady(t *testing.T, n *framework.Node, ns string) string {
	t.Helper()
	client := cp.Client()
	var pod string
	_, err := framework.Poll(t.Context(), 200*time.Millisecond, 2*time.Minute, func(ctx context.Context) (bool, string) {
		pods, err := client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil {
			return false, err.Error()
		}
		if len(pods.Items) != 1 {
			return false, fmt.Sprintf("%d web pods", len(pods.Items))
		}
		p, ok := framework.ReadyPod(&pods.Items[0])
		if !ok {
			return false, framework.DescribePod(&pods.Items[0])
		}
		eps, err := client.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=web"})
		if err != nil {
			return false, err.Error()
		}
		for _, s := range eps.Items {
			for _, e := range s.Endpoints {
				if e.Conditions.Ready != nil && *e.Conditions.Ready && len(e.Addresses) > 0 && e.Addresses[0] == p.IP {
					pod = pods.Items[0].Name
					return true, ""
				}
			}
		}
		return false, "pod " + p.IP + " ready, not yet a ready endpoint of Service web"
	})
	if err != nil {
		t.Fatalf("web pod not ready: %v\nlast lines of kubelet.log:\n%s", err, n.KubeletLog(30))
	}
	return pod
}

func since(t time.Time) time.Duration { return time.Since(t).Round(time.Millisecond) }
