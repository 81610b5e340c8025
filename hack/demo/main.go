// Command demo shows edge autonomy with Outpost on a real local control
// plane, step by step; `make demo` runs it. etcd and kube-apiserver start on
// loopback, outpost sits in front of them for one edge node (through a fault
// proxy that plays the unreliable link), and a real kubelet with containerd
// runs a small web workload behind outpost (or, where a real kubelet cannot
// run, the demo says so and shows the reads alone). Then the link is cut,
// the node "reboots", the workload comes back from outpost's cache, the
// cloud changes meanwhile, the link returns and the edge converges.
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"

	"github.com/outposthq/outpost/test/e2e/framework"
)

const (
	node = "edge-demo"
	ns   = "shop"
)

func main() {
	klog.SetOutput(io.Discard)
	klog.LogToStderr(false)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	if err := run(ctx); err != nil {
		os.Exit(1) // run said why
	}
}

var stepNo int

func step(format string, args ...any) {
	stepNo++
	fmt.Printf("\n== Step %d: %s\n", stepNo, fmt.Sprintf(format, args...))
}

func say(format string, args ...any) { fmt.Printf("   "+format+"\n", args...) }

func show(what string, out []byte) {
	fmt.Printf("   $ %s\n", what)
	for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		fmt.Printf("     %s\n", l)
	}
}

type demo struct {
	cp       *framework.ControlPlane
	o        *framework.Outpost
	link     *framework.FaultProxy
	operator string // kubeconfig through outpost with an operator's token
	direct   string // kubeconfig straight to the apiserver (the cloud's view)
}

func (d *demo) kubectl(ctx context.Context, kubeconfig string, args ...string) ([]byte, error) {
	out, err := d.cp.Kubectl(ctx, kubeconfig, append([]string{"--request-timeout=10s"}, args...)...)
	show("kubectl "+strings.Join(args, " "), out)
	return out, err
}

func run(ctx context.Context) (err error) {
	defer framework.RemoveBuiltBinaries()
	defer func() {
		if err != nil {
			fmt.Fprintf(os.Stderr, "\ndemo FAILED: %v\n", err)
		}
	}()
	return runSteps(ctx)
}

func runSteps(ctx context.Context) error {
	d := &demo{}
	step("start a real control plane on loopback (etcd v3.7.0, kube-apiserver v1.37.2)")
	begin := time.Now()
	cp, err := framework.Start(ctx, framework.Options{})
	if err != nil {
		return err
	}
	defer cp.Stop()
	d.cp = cp
	if err := cp.EnsureNamespace(ctx, ns); err != nil {
		return err
	}
	say("apiserver %s ready in %v", cp.URL(0), time.Since(begin).Round(time.Millisecond))

	step("put outpost in front of it for node %q, through a link we can cut", node)
	d.link, err = framework.StartFaultProxy(strings.TrimPrefix(cp.URL(0), "https://"))
	if err != nil {
		return err
	}
	defer func() {
		d.link.Pass() // release held connections before closing
		_ = d.link.Close()
	}()
	d.o, err = cp.StartOutpost(ctx, node, "--server="+d.link.URL(), "--flap-window=2s")
	if err != nil {
		return err
	}
	defer d.o.Stop()
	say("outpost serves TLS on %s (admin %s); its upstream link is %s", d.o.URL, d.o.AdminURL, d.link.URL())
	if err := d.operatorKubeconfigs(ctx); err != nil {
		return err
	}

	step("workload: a ConfigMap, a Secret and a web pod on %s", node)
	if err := d.seed(ctx); err != nil {
		return err
	}
	port := freePort()
	nodeErr := framework.NodeSupported()
	var n *framework.Node
	if nodeErr == nil {
		kubeconfig, err := d.o.NodeKubeconfig()
		if err != nil {
			return err
		}
		say("starting a real kubelet v1.37.2 + containerd whose kubeconfig points at outpost (%s)", d.o.URL)
		n, err = cp.StartNode(ctx, node, kubeconfig)
		if err != nil {
			return err
		}
		defer n.Stop()
		if _, err := cp.Client().CoreV1().Pods(ns).Create(ctx, framework.WebPod("till", node, true, port, "menu", "till-key"), metav1.CreateOptions{}); err != nil {
			return err
		}
		if err := waitServing(ctx, port, 2*time.Minute); err != nil {
			return fmt.Errorf("pod never served: %w\n%s", err, n.KubeletLog(30))
		}
		body, _ := httpGet(ctx, port, "/file?path=/etc/config/today")
		say("the pod serves on 127.0.0.1:%d; its ConfigMap says today=%q", port, body)
	} else {
		say("NO REAL KUBELET HERE: %v", nodeErr)
		say("(run as root with Debian's containerd, runc and CNI plugins: hack/install-node-deps.sh). Continuing with reads only.")
	}
	_, _ = d.kubectl(ctx, d.operator, "-n", ns, "get", "pods,configmaps", "-o", "wide")

	step("cut the cloud link (black-hole: packets vanish, as on a dead uplink)")
	cut := time.Now()
	d.link.Blackhole()
	firstCached, err := d.firstCachedAnswer(ctx, cut)
	if err != nil {
		return err
	}
	say("first answer from outpost's cache %v after the cut", firstCached.Round(time.Millisecond))
	_, _ = d.kubectl(ctx, d.operator, "-n", ns, "get", "configmaps")

	step("meanwhile the cloud changes: today's menu becomes stew, a new ConfigMap appears")
	_, _ = d.kubectl(ctx, d.direct, "-n", ns, "patch", "configmap", "menu", "--type=merge", "-p", `{"data":{"today":"stew"}}`)
	_, _ = d.kubectl(ctx, d.direct, "-n", ns, "create", "configmap", "specials", "--from-literal=dish=pie")
	say("the edge keeps the state at the cut:")
	_, _ = d.kubectl(ctx, d.operator, "-n", ns, "get", "configmap", "menu", "-o", "jsonpath={.data.today}")
	fmt.Println()

	rebootServing := time.Duration(0)
	if n != nil {
		step("reboot the node while offline: kubelet stopped, every container removed, kubelet started")
		start := time.Now()
		if err := n.StopKubelet(); err != nil {
			return err
		}
		if err := n.RemoveAllContainers(ctx); err != nil {
			return err
		}
		if _, err := httpGet(ctx, port, "/healthz"); err == nil {
			return fmt.Errorf("the pod still serves after its containers were removed")
		}
		say("containers gone; the pod does not answer. Starting kubelet (still offline)...")
		if err := n.StartKubelet(ctx); err != nil {
			return err
		}
		if err := waitServing(ctx, port, 2*time.Minute); err != nil {
			return fmt.Errorf("pod did not come back offline: %w\n%s\n%s", err, n.KubeletLog(40), d.o.Log(20))
		}
		rebootServing = time.Since(start)
		body, _ := httpGet(ctx, port, "/file?path=/etc/config/today")
		say("the pod was re-created from outpost's cache and serves again %v after the reboot began; today=%q", rebootServing.Round(time.Millisecond), body)
		time.Sleep(3 * time.Second)
		say("what outpost answered itself while offline:")
		_ = showMetrics(d.o, "outpost_requests_total", "outpost_journal_events_total", "outpost_online ")
	}

	step("restore the link")
	back := time.Now()
	d.link.Pass()
	online, err := waitReady(ctx, d.o, back)
	if err != nil {
		return err
	}
	say("outpost back online %v after the link returned", online.Round(time.Millisecond))
	converged, err := d.waitConverged(ctx, back)
	if err != nil {
		return err
	}
	say("the edge converged to the cloud's truth %v after the link returned:", converged.Round(time.Millisecond))
	_, _ = d.kubectl(ctx, d.operator, "-n", ns, "get", "configmaps")
	_, _ = d.kubectl(ctx, d.operator, "-n", ns, "get", "configmap", "menu", "-o", "jsonpath={.data.today}")
	fmt.Println()
	if n != nil {
		time.Sleep(3 * time.Second)
		say("events the kubelet recorded during the outage, replayed into the cloud:")
		_ = showMetrics(d.o, "outpost_journal_replayed_total")
		_, _ = d.kubectl(ctx, d.direct, "-n", ns, "get", "events", "--field-selector", "involvedObject.name=till", "-o", "custom-columns=REASON:.reason,MESSAGE:.message,AT:.lastTimestamp")
	}

	step("summary")
	say("cut -> first cached answer:         %v", firstCached.Round(time.Millisecond))
	if n != nil {
		say("offline reboot -> workload serving: %v", rebootServing.Round(time.Millisecond))
	}
	say("link back -> outpost online:        %v", online.Round(time.Millisecond))
	say("link back -> edge converged:        %v", converged.Round(time.Millisecond))
	if n != nil {
		n.Stop()
		if left := n.Leftovers(); len(left) > 0 {
			return fmt.Errorf("node teardown left behind: %v", left)
		}
	}
	return nil
}

// operatorKubeconfigs makes a service account with edit rights and
// kubeconfigs with its token: through outpost, and straight to the cloud.
func (d *demo) operatorKubeconfigs(ctx context.Context) error {
	c := d.cp.Client()
	if _, err := c.CoreV1().ServiceAccounts("default").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "operator"}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	if _, err := c.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "demo-operator"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "cluster-admin"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "default", Name: "operator"}},
	}, metav1.CreateOptions{}); err != nil {
		return err
	}
	tr, err := c.CoreV1().ServiceAccounts("default").CreateToken(ctx, "operator", &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	d.operator = filepath.Join(d.cp.Dir, "demo-operator.kubeconfig")
	d.direct = filepath.Join(d.cp.Dir, "demo-cloud.kubeconfig")
	if err := d.o.WriteClientKubeconfig(d.operator, "", "", tr.Status.Token); err != nil {
		return err
	}
	return framework.WriteKubeconfig(d.direct, d.cp.URL(0), d.cp.CAFile, "", "", tr.Status.Token)
}

func (d *demo) seed(ctx context.Context) error {
	c := d.cp.Client()
	if _, err := c.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "menu"}, Data: map[string]string{"today": "soup"}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	if _, err := c.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "till-key"}, StringData: map[string]string{"key": "s3cret"}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	// The operator reads through outpost while online: that is what the
	// edge can show offline.
	_, err := d.kubectl(ctx, d.operator, "-n", ns, "get", "configmaps")
	if err != nil {
		return err
	}
	_, err = d.kubectl(ctx, d.operator, "-n", ns, "get", "configmap", "menu", "-o", "jsonpath={.data.today}")
	fmt.Println()
	return err
}

// firstCachedAnswer polls a read through outpost until the cache answers.
func (d *demo) firstCachedAnswer(ctx context.Context, since time.Time) (time.Duration, error) {
	tokenOf := func() string {
		b, _ := os.ReadFile(d.operator)
		for _, l := range strings.Split(string(b), "\n") {
			if t, ok := strings.CutPrefix(strings.TrimSpace(l), "token: "); ok {
				return strings.Trim(t, `"`)
			}
		}
		return ""
	}
	token := tokenOf()
	hc, err := outpostClient(d.o)
	if err != nil {
		return 0, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, d.o.URL+"/api/v1/namespaces/"+ns+"/configmaps/menu", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Accept", "application/json")
		resp, err := hc.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 && resp.Header.Get("X-Outpost-Served-By") == "cache" {
				return time.Since(since), nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return 0, fmt.Errorf("no cached answer within 30s of the cut")
}

// waitConverged polls through outpost until the edge shows the cloud's
// changes.
func (d *demo) waitConverged(ctx context.Context, since time.Time) (time.Duration, error) {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		out, err := d.cp.Kubectl(ctx, d.operator, "--request-timeout=5s", "-n", ns, "get", "configmap", "menu", "specials", "-o", "jsonpath={.items[*].metadata.name}={.items[0].data.today}")
		if err == nil && strings.Contains(string(out), "stew") && strings.Contains(string(out), "specials") {
			return time.Since(since), nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return 0, fmt.Errorf("the edge did not converge within 60s")
}

func outpostClient(o *framework.Outpost) (*http.Client, error) {
	cfg, err := tlsConfigFor(o)
	if err != nil {
		return nil, err
	}
	return &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg, Proxy: nil}}, nil
}

func waitReady(ctx context.Context, o *framework.Outpost, since time.Time) (time.Duration, error) {
	hc := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := hc.Get(o.AdminURL + "/readyz")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 && strings.Contains(string(b), "online") {
				return time.Since(since), nil
			}
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return 0, fmt.Errorf("outpost did not turn online within 30s")
}

func waitServing(ctx context.Context, port int, within time.Duration) error {
	deadline := time.Now().Add(within)
	var last error
	for time.Now().Before(deadline) {
		if _, err := httpGet(ctx, port, "/healthz"); err == nil {
			return nil
		} else {
			last = err
		}
		time.Sleep(200 * time.Millisecond)
	}
	return last
}

func httpGet(ctx context.Context, port int, path string) (string, error) {
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil}}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:"+strconv.Itoa(port)+path, nil)
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("%s", resp.Status)
	}
	return strings.TrimSpace(string(b)), err
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 18080
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func showMetrics(o *framework.Outpost, contains ...string) error {
	resp, err := http.Get(o.AdminURL + "/metrics")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, "#") || (strings.HasPrefix(l, "outpost_requests_total") && strings.Contains(l, `served_by="upstream"`)) {
			continue
		}
		for _, p := range contains {
			if strings.HasPrefix(l, p) {
				fmt.Printf("     %s\n", l)
				break
			}
		}
	}
	return nil
}
