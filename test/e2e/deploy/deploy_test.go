package deploy

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// Names deploy/ gives the controller.
const (
	controllerNS    = "outpost-system"
	controllerName  = "outpost-controller"
	controllerLabel = "app.kubernetes.io/name=" + controllerName
	// webhookHost is the Service's name, which the apiserver verifies the
	// webhooks' certificate against.
	webhookHost = controllerName + "." + controllerNS + ".svc"
	metricsPort = 8080 // the container's metrics port in deploy/deployment.yaml
	webhookPort = 9443 // and its webhook port
)

// kubernetesVIP is the kubernetes Service's ClusterIP, the first address
// of the framework's service CIDR.
const kubernetesVIP = "10.0.0.1"

// TestControllerFromDeploy: outpost-controller from its image and deploy/
// runs as a Deployment on a real node behind outpost, is Ready, holds the
// Lease, has its CA bundle in its webhook configuration and, through its
// webhooks, which the apiserver calls at the pod, and its toleration
// controller, keeps an unreachable autonomous node's pods and endpoints.
func TestControllerFromDeploy(t *testing.T) {
	framework.RequireRealNode(t)
	const node = "deploy"
	ctx := t.Context()
	begin := time.Now()
	step := func(format string, args ...any) {
		t.Helper()
		t.Logf("%6.1fs "+format, append([]any{time.Since(begin).Seconds()}, args...)...)
	}

	archive, ref := buildImages(t)
	step("images built: %s", ref)

	// The node behind outpost, which pods reach at a node-local address:
	// kubelet gives them that address as KUBERNETES_SERVICE_HOST/PORT.
	ip := framework.AddNodeLocalAddress(t, 200, 50)
	local := netip.AddrPortFrom(ip, uint16(framework.FreePort(t)))
	cp.CreateNode(t, node, nil)
	o := cp.StartOutpostT(t, node, append(slices.Clone(framework.LenientProbes),
		"--rotate-server-certificates", "--node-local-address="+local.String())...)
	if _, err := o.WaitState(ctx, "online", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	// The controller's in-cluster client verifies outpost against the
	// cluster CA, so outpost's serving CSR must be approved before the
	// controller can start; the controller under test is what approves
	// such CSRs. The test approves this one itself, as an administrator
	// would the first time, after checking it asks for what the controller
	// would approve. (Running the controller from the host for it instead
	// would leave its webhook CA Secret behind for the deployed one to
	// take over: what the test then saw would not all be the deployed
	// controller's own doing.)
	approveServingCSR(t, node, ip)
	cp.WaitServing(t, local.String(), ip.String(), kubernetesVIP, "kubernetes.default.svc", "127.0.0.1")
	step("outpost serves a certificate of the cluster CA at %s", local)

	kubeconfig := filepath.Join(t.TempDir(), "kubelet.kubeconfig")
	if err := framework.WriteKubeconfig(kubeconfig, o.URL, cp.CAFile, o.NodeCertFile, o.NodeKeyFile, ""); err != nil {
		t.Fatal(err)
	}
	n := cp.StartNodeForTest(t, node, kubeconfig)
	if err := n.ImportImageArchive(ctx, archive, "docker.io/"+ref); err != nil {
		t.Fatal(err)
	}
	step("node %s ready, %s imported", node, ref)

	applyDeploy(t, ref)
	pod := waitController(t, n, o)
	step("controller %s ready at %s: Lease held, CA bundle set, its API requests through outpost", pod.Name, pod.Status.PodIP)
	t.Cleanup(func() {
		log := controllerLog(n, pod)
		if t.Failed() {
			t.Logf("controller log:\n%s", log)
		}
		if !strings.Contains(log, "toleration controller started") {
			t.Errorf("the controller's log, read from %s, does not show its toleration controller started", filepath.Join(n.Dir, "pod-logs"))
		}
		if strings.Contains(log, "forbidden") {
			t.Error("the controller was forbidden something: deploy/rbac.yaml lacks a permission")
		}
	})

	autonomyScenario(t, pod.Status.PodIP, step)
}

// buildImages builds the images as `make images` does, into a directory of
// the test: static binaries of both programs with the version linked in,
// then hack/images. It returns the archive of outpost-controller and the
// reference its image is tagged with.
func buildImages(t *testing.T) (archive, ref string) {
	t.Helper()
	ctx := t.Context()
	root, err := framework.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	git := func(args ...string) string {
		out, err := exec.CommandContext(ctx, "git", append([]string{"-C", root}, args...)...).Output()
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(out))
	}
	version := cmp.Or(git("describe", "--tags", "--always", "--dirty"), "v0.0.0-dev")
	dir := t.TempDir()
	bin, out := filepath.Join(dir, "bin"), filepath.Join(dir, "images")
	run := func(args ...string) []byte {
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		stdout, err := cmd.Output()
		if err != nil {
			t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, stderr.Bytes())
		}
		return stdout
	}
	run("build", "-ldflags", "-s -w -X github.com/outposthq/outpost/internal/version.Version="+version,
		"-o", bin+string(filepath.Separator), "./cmd/outpost", "./cmd/outpost-controller")
	printed := run("run", "./hack/images", "-bin", bin, "-out", out, "-version", version,
		"-revision", git("rev-parse", "HEAD"), "-created", cmp.Or(git("log", "-1", "--format=%ct"), "0"))
	// One line per image: "ARCHIVE: REFERENCE".
	archive = filepath.Join(out, controllerName+".tar")
	for line := range strings.Lines(string(printed)) {
		if path, r, ok := strings.Cut(strings.TrimSpace(line), ": "); ok && path == archive {
			ref = r
		}
	}
	if ref == "" {
		t.Fatalf("hack/images printed no reference for %s:\n%s", archive, printed)
	}
	return archive, ref
}

// approveServingCSR approves the kubelet-serving CSR outpost filed for node,
// once it asks for the node-local address and the in-cluster names of the
// apiserver, and deletes it when t ends.
func approveServingCSR(t *testing.T, node string, ip netip.Addr) {
	t.Helper()
	csrs := cp.Client().CertificatesV1().CertificateSigningRequests()
	var approved string
	_, err := framework.Poll(t.Context(), 200*time.Millisecond, 60*time.Second, func(ctx context.Context) (bool, string) {
		list, err := csrs.List(ctx, metav1.ListOptions{FieldSelector: "spec.signerName=" + certificatesv1.KubeletServingSignerName})
		if err != nil {
			return false, err.Error()
		}
		for i := range list.Items {
			csr := &list.Items[i]
			if csr.Spec.Username != "system:node:"+node || len(csr.Status.Conditions) > 0 {
				continue
			}
			block, _ := pem.Decode(csr.Spec.Request)
			if block == nil {
				return false, "CSR " + csr.Name + " holds no PEM"
			}
			req, err := x509.ParseCertificateRequest(block.Bytes)
			if err != nil {
				return false, fmt.Sprintf("CSR %s: %v", csr.Name, err)
			}
			if !slices.ContainsFunc(req.IPAddresses, func(a net.IP) bool { return a.Equal(ip.AsSlice()) }) || !slices.Contains(req.DNSNames, "kubernetes.default.svc") {
				return false, fmt.Sprintf("CSR %s asks for %v and %v: not the node-local address and the in-cluster names", csr.Name, req.IPAddresses, req.DNSNames)
			}
			csr.Status.Conditions = append(csr.Status.Conditions, certificatesv1.CertificateSigningRequestCondition{
				Type: certificatesv1.CertificateApproved, Status: corev1.ConditionTrue,
				Reason: "E2EApproved", Message: "approved by the test, before outpost-controller runs",
			})
			if _, err := csrs.UpdateApproval(ctx, csr.Name, csr, metav1.UpdateOptions{}); err != nil {
				return false, err.Error()
			}
			approved = csr.Name
			return true, ""
		}
		return false, "no pending serving CSR of " + node
	})
	if err != nil {
		t.Fatalf("approving outpost's serving CSR: %v", err)
	}
	t.Cleanup(func() { _ = csrs.Delete(context.Background(), approved, metav1.DeleteOptions{}) })
}

// applyDeploy applies deploy/ with kubectl through a kustomize overlay that
// changes only what this machine needs: the image (imported, never
// pulled) and one replica, since there is one node. It deletes everything
// again when t ends, waiting for the pod to go.
func applyDeploy(t *testing.T, ref string) {
	t.Helper()
	root, err := framework.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	// kustomize takes a base only by a path relative to the overlay.
	base, err := filepath.Rel(dir, filepath.Join(root, "deploy"))
	if err != nil {
		t.Fatal(err)
	}
	i := strings.LastIndex(ref, ":")
	kustomization := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - %s
images:
  - name: ghcr.io/outposthq/outpost-controller
    newName: %s
    newTag: %s
replicas:
  - name: %s
    count: 1
patches:
  - target: {kind: Deployment, name: %s}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/imagePullPolicy
        value: Never
`, filepath.ToSlash(base), ref[:i], ref[i+1:], controllerName, controllerName)
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(kustomization), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := cp.Kubectl(t.Context(), "", "apply", "-k", dir); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if out, err := cp.Kubectl(ctx, "", "delete", "-k", dir, "--ignore-not-found", "--wait=true", "--timeout=90s"); err != nil {
			t.Errorf("deleting deploy/: %v: %s", err, out)
		}
	})
}

// waitController waits until the Deployment's one pod runs on n and is
// Ready (its readinessProbe is /readyz), holds the leader Lease, has put
// its CA bundle into both webhooks of its configuration (which verifies
// the certificate its webhook port serves for the Service's name), and has
// reached the apiserver through outpost with its own service account.
func waitController(t *testing.T, n *framework.Node, o *framework.Outpost) *corev1.Pod {
	t.Helper()
	client := cp.Client()
	var pod *corev1.Pod
	_, err := framework.Poll(t.Context(), 500*time.Millisecond, 3*time.Minute, func(ctx context.Context) (bool, string) {
		pods, err := client.CoreV1().Pods(controllerNS).List(ctx, metav1.ListOptions{LabelSelector: controllerLabel})
		if err != nil {
			return false, err.Error()
		}
		if len(pods.Items) != 1 {
			return false, fmt.Sprintf("%d pods", len(pods.Items))
		}
		pod = &pods.Items[0]
		if pod.Spec.NodeName != n.Name {
			return false, "pod on node " + pod.Spec.NodeName
		}
		if _, ok := framework.ReadyPod(pod); !ok {
			return false, framework.DescribePod(pod)
		}
		dep, err := client.AppsV1().Deployments(controllerNS).Get(ctx, controllerName, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		if dep.Status.AvailableReplicas != 1 {
			return false, fmt.Sprintf("Deployment: %d available", dep.Status.AvailableReplicas)
		}
		lease, err := client.CoordinationV1().Leases(controllerNS).Get(ctx, controllerName, metav1.GetOptions{})
		if err != nil {
			return false, "Lease: " + err.Error()
		}
		if h := lease.Spec.HolderIdentity; h == nil || !strings.HasPrefix(*h, pod.Name+"_") {
			return false, fmt.Sprintf("Lease held by %v", lease.Spec.HolderIdentity)
		}
		hooks, err := client.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, controllerName, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		if len(hooks.Webhooks) != 2 {
			return false, fmt.Sprintf("%d webhooks", len(hooks.Webhooks))
		}
		for _, wh := range hooks.Webhooks {
			if len(wh.ClientConfig.CABundle) == 0 {
				return false, "no CA bundle in " + wh.Name
			}
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(hooks.Webhooks[0].ClientConfig.CABundle) {
			return false, "the CA bundle holds no certificate"
		}
		conn, err := tls.Dial("tcp", net.JoinHostPort(pod.Status.PodIP, strconv.Itoa(webhookPort)), &tls.Config{RootCAs: roots, ServerName: webhookHost})
		if err != nil {
			return false, "webhook port: " + err.Error()
		}
		conn.Close()
		return true, ""
	})
	if err != nil {
		if pod != nil {
			t.Logf("controller log:\n%s", controllerLog(n, pod))
		}
		t.Fatalf("waiting for outpost-controller from deploy/: %v", err)
	}
	// What the probes saw, seen from the host too.
	for _, path := range []string{"/readyz", "/healthz"} {
		if _, err := framework.GetOK(t.Context(), podClient, "http://"+net.JoinHostPort(pod.Status.PodIP, strconv.Itoa(metricsPort))+path); err != nil {
			t.Errorf("the controller's %s: %v", path, err)
		}
	}
	sa := "serviceaccount:" + controllerNS + "/" + controllerName
	if v, err := o.Metric("outpost_client_requests_total", "client="+sa, "served_by=upstream"); err != nil || v < 1 {
		t.Errorf("outpost answered %v requests of %s (%v): the controller did not reach the apiserver through it", v, sa, err)
	}
	return pod
}

// controllerLog is the log of the controller's container, as kubelet keeps
// it on the node (the apiserver cannot reach this kubelet for kubectl
// logs), without the CRI line prefixes.
func controllerLog(n *framework.Node, pod *corev1.Pod) string {
	files, _ := filepath.Glob(filepath.Join(n.Dir, "pod-logs", controllerNS+"_"+pod.Name+"_*", "controller", "*.log"))
	var b strings.Builder
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(data))
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			// "TIME STREAM P|F MESSAGE"
			if fields := strings.SplitN(sc.Text(), " ", 4); len(fields) == 4 {
				b.WriteString(fields[3] + "\n")
			}
		}
	}
	return b.String()
}

// getMetrics reads the controller's /metrics at its pod IP.
func getMetrics(ctx context.Context, podIP string) (string, error) {
	body, err := framework.GetOK(ctx, podClient, "http://"+net.JoinHostPort(podIP, strconv.Itoa(metricsPort))+"/metrics")
	return string(body), err
}

// podClient reaches pod IPs directly, whatever proxy the environment names.
var podClient = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil}}

// statusPatch is a merge patch of a pod's status as its kubelet reports a
// running, ready pod at ip.
func statusPatch(ip string) []byte {
	now := metav1.Now()
	status := corev1.PodStatus{
		Phase:     corev1.PodRunning,
		PodIP:     ip,
		PodIPs:    []corev1.PodIP{{IP: ip}},
		StartTime: &now,
	}
	for _, c := range []corev1.PodConditionType{corev1.PodScheduled, corev1.PodInitialized, corev1.ContainersReady, corev1.PodReady} {
		status.Conditions = append(status.Conditions, corev1.PodCondition{Type: c, Status: corev1.ConditionTrue, LastTransitionTime: now})
	}
	data, _ := json.Marshal(map[string]any{"status": status})
	return data
}
