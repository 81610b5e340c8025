// Command demo shows Outpost on a real local control plane, step by step:
// `make demo` runs it. It starts etcd and kube-apiserver on loopback, puts
// outpost in front of them for one edge node, drives kubectl through
// outpost, then cuts and restores the cloud link and says what it saw.
package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

const node = "edge-demo"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "\ndemo FAILED: %v\n", err)
		os.Exit(1)
	}
}

var stepNo int

func step(format string, args ...any) {
	stepNo++
	fmt.Printf("\n== Step %d: %s\n", stepNo, fmt.Sprintf(format, args...))
}

func show(what string, out []byte) {
	fmt.Printf("   $ %s\n", what)
	for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		fmt.Printf("     %s\n", l)
	}
}

func run(ctx context.Context) error {
	step("start a real control plane on loopback (etcd v3.7.0, kube-apiserver v1.37.2)")
	begin := time.Now()
	cp, err := framework.Start(ctx, framework.Options{})
	if err != nil {
		return err
	}
	defer cp.Stop()
	fmt.Printf("   apiserver %s ready in %v (state in %s)\n", cp.URL(0), time.Since(begin).Round(time.Millisecond), cp.Dir)

	step("start outpost for node %q in front of it", node)
	o, err := cp.StartOutpost(ctx, node)
	if err != nil {
		return err
	}
	defer o.Stop()
	fmt.Printf("   outpost serves TLS on %s, admin on %s, data dir %s\n", o.URL, o.AdminURL, o.DataDir)
	nodeKubeconfig, err := o.NodeKubeconfig()
	if err != nil {
		return err
	}

	kubectl := func(kubeconfig string, args ...string) ([]byte, error) {
		out, err := cp.Kubectl(ctx, kubeconfig, args...)
		show("kubectl "+strings.Join(args, " "), out)
		return out, err
	}

	step("kubelet-style client: the node's certificate, through outpost")
	if _, err := cp.Client().CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	if _, err := kubectl(nodeKubeconfig, "auth", "whoami"); err != nil {
		return err
	}
	if _, err := kubectl(nodeKubeconfig, "get", "node", node); err != nil {
		return err
	}

	step("an operator's service-account token, forwarded as it is")
	token, err := operatorToken(ctx, cp)
	if err != nil {
		return err
	}
	tokenKubeconfig := filepath.Join(cp.Dir, "demo-operator.kubeconfig")
	if err := o.WriteClientKubeconfig(tokenKubeconfig, "", "", token); err != nil {
		return err
	}
	for _, args := range [][]string{
		{"auth", "whoami"},
		{"version"},
		{"create", "namespace", "shop"},
		{"-n", "shop", "create", "configmap", "menu", "--from-literal=today=soup"},
		{"-n", "shop", "create", "configmap", "prices", "--from-literal=soup=4"},
		{"-n", "shop", "label", "configmap", "menu", "app=till"},
		{"-n", "shop", "get", "configmaps", "-l", "app=till"},
		{"-n", "shop", "get", "configmap", "menu", "-o", "jsonpath={.data.today}"},
	} {
		if _, err := kubectl(tokenKubeconfig, args...); err != nil {
			return err
		}
	}
	fmt.Println()

	step("what outpost measured (its /metrics)")
	if err := showMetrics(o, "outpost_requests_total", "outpost_upstream_healthy", "outpost_online"); err != nil {
		return err
	}

	step("cut the cloud link (stop kube-apiserver)")
	cut := time.Now()
	if err := cp.StopAPIServer(0); err != nil {
		return err
	}
	offlineAfter, err := waitReady(ctx, o, false, cut)
	if err != nil {
		return err
	}
	fmt.Printf("   outpost judged the cloud unreachable %v after the cut\n", offlineAfter.Round(time.Millisecond))
	out, _ := kubectl(tokenKubeconfig, "-n", "shop", "get", "configmaps")
	if !strings.Contains(string(out), "no apiserver reachable") {
		return fmt.Errorf("offline read: want outpost's 503 Status, got %q", out)
	}
	fmt.Println("   (a clear 503 Status from outpost; answering reads from a local cache is the next milestone)")

	step("restore the link (start kube-apiserver again)")
	if err := cp.StartAPIServer(0); err != nil {
		return err
	}
	back := time.Now()
	onlineAfter, err := waitReady(ctx, o, true, back)
	if err != nil {
		return err
	}
	fmt.Printf("   outpost back online %v after the apiserver was ready\n", onlineAfter.Round(time.Millisecond))
	if _, err := kubectl(tokenKubeconfig, "-n", "shop", "get", "configmaps"); err != nil {
		return err
	}

	step("summary")
	fmt.Printf("   cut -> outpost offline: %v\n   link back -> outpost online: %v\n", offlineAfter.Round(time.Millisecond), onlineAfter.Round(time.Millisecond))
	fmt.Println("   everything above went through outpost with real kubectl against a real kube-apiserver.")
	return nil
}

// operatorToken creates a service account bound to the edit role and
// returns a token for it.
func operatorToken(ctx context.Context, cp *framework.ControlPlane) (string, error) {
	c := cp.Client()
	if _, err := c.CoreV1().ServiceAccounts("default").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "operator"}}, metav1.CreateOptions{}); err != nil {
		return "", err
	}
	if _, err := c.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "demo-operator"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "cluster-admin"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "default", Name: "operator"}},
	}, metav1.CreateOptions{}); err != nil {
		return "", err
	}
	tr, err := c.CoreV1().ServiceAccounts("default").CreateToken(ctx, "operator", &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	return tr.Status.Token, nil
}

// waitReady polls outpost's /readyz until it says online (or offline) and
// returns how long after since that was.
func waitReady(ctx context.Context, o *framework.Outpost, online bool, since time.Time) (time.Duration, error) {
	hc := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := hc.Get(o.AdminURL + "/readyz")
		if err == nil {
			resp.Body.Close()
			if (resp.StatusCode == http.StatusOK) == online {
				return time.Since(since), nil
			}
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return 0, fmt.Errorf("outpost /readyz did not turn online=%v within 30s", online)
}

func showMetrics(o *framework.Outpost, prefixes ...string) error {
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
		for _, p := range prefixes {
			if strings.HasPrefix(l, p) {
				fmt.Printf("     %s\n", l)
			}
		}
	}
	return nil
}
