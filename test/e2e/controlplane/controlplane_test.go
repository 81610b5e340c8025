// Package e2e is the self-test of the e2e framework: it proves that the
// control plane other suites rely on really behaves like a cluster — storage,
// kubectl, the Node authorizer, bootstrap tokens with CSR approval, service
// accounts, and an apiserver that goes away and comes back.
package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	os.Exit(framework.Run(m, framework.Options{ControllerManager: true}, &cp))
}

// namespace creates a namespace for one test and deletes it afterwards.
func namespace(t *testing.T, name string) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if _, err := cp.Client().CoreV1().Namespaces().Create(t.Context(), ns, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating namespace %s: %v", name, err)
	}
	t.Cleanup(func() {
		// t.Context is already cancelled during cleanup.
		_ = cp.Client().CoreV1().Namespaces().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	return name
}

func TestConfigMapsWithClientGo(t *testing.T) {
	ctx := t.Context()
	ns := namespace(t, "clientgo")
	cms := cp.Client().CoreV1().ConfigMaps(ns)

	for _, c := range []struct{ name, app string }{{"a", "web"}, {"b", "web"}, {"c", "db"}} {
		cm := &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: c.name, Labels: map[string]string{"app": c.app}},
			Data:       map[string]string{"name": c.name},
		}
		if _, err := cms.Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating configmap %s: %v", c.name, err)
		}
	}

	got, err := cms.Get(ctx, "b", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("getting configmap b: %v", err)
	}
	if got.Data["name"] != "b" || got.Labels["app"] != "web" {
		t.Errorf("configmap b = data %v labels %v, want name=b app=web", got.Data, got.Labels)
	}

	list, err := cms.List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
	if err != nil {
		t.Fatalf("listing app=web: %v", err)
	}
	var names []string
	for _, cm := range list.Items {
		names = append(names, cm.Name)
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"a", "b"}) {
		t.Errorf("app=web lists %v, want [a b]", names)
	}

	if err := cms.Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatalf("deleting configmap a: %v", err)
	}
	if _, err := cms.Get(ctx, "a", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("getting deleted configmap a: err = %v, want NotFound", err)
	}
}

func TestConfigMapsWithKubectl(t *testing.T) {
	ctx := t.Context()
	ns := namespace(t, "kubectl")
	kubectl := func(args ...string) string {
		t.Helper()
		out, err := cp.Kubectl(ctx, cp.AdminKubeconfig, append([]string{"--namespace=" + ns}, args...)...)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(out))
	}

	kubectl("create", "configmap", "one", "--from-literal=greeting=hello")
	kubectl("create", "configmap", "two", "--from-literal=greeting=bye")
	kubectl("label", "configmap", "one", "tier=front")

	if got := kubectl("get", "configmap", "one", "-o", "jsonpath={.data.greeting}"); got != "hello" {
		t.Errorf("greeting of one = %q, want hello", got)
	}
	if got := kubectl("get", "configmaps", "-l", "tier=front", "-o", "name"); got != "configmap/one" {
		t.Errorf("tier=front lists %q, want configmap/one", got)
	}
	// What kubectl wrote, client-go reads.
	two, err := cp.Client().CoreV1().ConfigMaps(ns).Get(ctx, "two", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("getting configmap two: %v", err)
	}
	if two.Data["greeting"] != "bye" {
		t.Errorf("greeting of two = %q, want bye", two.Data["greeting"])
	}

	kubectl("delete", "configmap", "one")
	out, err := cp.Kubectl(ctx, "", "--namespace="+ns, "get", "configmap", "one")
	if err == nil || !strings.Contains(string(out), "NotFound") {
		t.Errorf("getting deleted configmap: err = %v, output %q; want NotFound", err, out)
	}
}

func TestNodeCredentialsAreNodeScoped(t *testing.T) {
	ctx := t.Context()
	const node = "e2e-node-a"
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node, Labels: map[string]string{"e2e": "yes"}}}
	if _, err := cp.Client().CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating node: %v", err)
	}
	t.Cleanup(func() { _ = cp.Client().CoreV1().Nodes().Delete(context.Background(), node, metav1.DeleteOptions{}) })
	ns := namespace(t, "nodeauth")
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "unrelated"}, StringData: map[string]string{"k": "v"}}
	if _, err := cp.Client().CoreV1().Secrets(ns).Create(ctx, secret, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating secret: %v", err)
	}

	kubeconfig, err := cp.NodeKubeconfig(node, cp.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	nodeClient := clientFor(t, kubeconfig)

	got, err := nodeClient.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("node reading its own Node: %v", err)
	}
	if got.Labels["e2e"] != "yes" {
		t.Errorf("node labels = %v, want e2e=yes", got.Labels)
	}
	// The Node authorizer lets a node read only secrets its pods use.
	if _, err := nodeClient.CoreV1().Secrets(ns).Get(ctx, "unrelated", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("node reading an unrelated secret: err = %v, want Forbidden", err)
	}

	out, err := cp.Kubectl(ctx, kubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.TrimSpace(string(out)), "system:node:"+node; got != want {
		t.Errorf("kubectl auth whoami = %q, want %q", got, want)
	}
}

// clientFor builds a clientset from a kubeconfig file, as a component under
// test would.
func clientFor(t *testing.T, kubeconfig string) kubernetes.Interface {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestBootstrapTokenGetsNodeClientCertificate(t *testing.T) {
	ctx := t.Context()
	id, _, _ := strings.Cut(cp.BootstrapToken, ".")
	kubeconfig := filepath.Join(t.TempDir(), "bootstrap.kubeconfig")
	if err := framework.WriteKubeconfig(kubeconfig, cp.URL(0), cp.CAFile, "", "", cp.BootstrapToken); err != nil {
		t.Fatal(err)
	}
	out, err := cp.Kubectl(ctx, kubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.TrimSpace(string(out)), "system:bootstrap:"+id; got != want {
		t.Errorf("bootstrap token is %q, want %q", got, want)
	}

	// What a kubelet does on TLS bootstrap: ask for a node client
	// certificate and wait for kube-controller-manager to approve and sign.
	const node = "e2e-bootstrapped"
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: "system:node:" + node, Organization: []string{"system:nodes"}},
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr := &certificatesv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "e2e-node-csr-"},
		Spec: certificatesv1.CertificateSigningRequestSpec{
			Request:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER}),
			SignerName: certificatesv1.KubeAPIServerClientKubeletSignerName,
			Usages:     []certificatesv1.KeyUsage{certificatesv1.UsageDigitalSignature, certificatesv1.UsageClientAuth},
		},
	}
	bootstrapClient := clientFor(t, kubeconfig)
	created, err := bootstrapClient.CertificatesV1().CertificateSigningRequests().Create(ctx, csr, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating CSR with the bootstrap token: %v", err)
	}
	t.Cleanup(func() {
		_ = cp.Client().CertificatesV1().CertificateSigningRequests().Delete(context.Background(), created.Name, metav1.DeleteOptions{})
	})

	var signed []byte
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		got, err := cp.Client().CertificatesV1().CertificateSigningRequests().Get(ctx, created.Name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		signed = got.Status.Certificate
		return len(signed) > 0, nil
	})
	if err != nil {
		t.Fatalf("waiting for the CSR to be approved and signed: %v", err)
	}
	block, _ := pem.Decode(signed)
	if block == nil {
		t.Fatalf("signed certificate is not PEM: %q", signed)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if cert.Subject.CommonName != "system:node:"+node {
		t.Errorf("signed certificate CN = %q", cert.Subject.CommonName)
	}
	caPEM, err := os.ReadFile(cp.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("signed certificate does not chain to the cluster CA: %v", err)
	}
}

func TestDefaultServiceAccountAppears(t *testing.T) {
	ns := namespace(t, "serviceaccounts")
	err := wait.PollUntilContextTimeout(t.Context(), 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := cp.Client().CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		return err == nil, err
	})
	if err != nil {
		t.Fatalf("waiting for the default ServiceAccount in %s: %v", ns, err)
	}
}

func TestKwokRunsAnnotatedNodes(t *testing.T) {
	ctx := t.Context()
	if err := cp.StartKwok(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cp.StopKwok(); err != nil {
			t.Error(err)
		}
	})

	const node = "e2e-kwok-node"
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name:        node,
		Annotations: map[string]string{framework.KwokNodeAnnotation: "fake"},
	}}
	if _, err := cp.Client().CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating node: %v", err)
	}
	t.Cleanup(func() { _ = cp.Client().CoreV1().Nodes().Delete(context.Background(), node, metav1.DeleteOptions{}) })
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		got, err := cp.Client().CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, c := range got.Status.Conditions {
			if c.Type == corev1.NodeReady {
				return c.Status == corev1.ConditionTrue, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("waiting for kwok to make the node Ready: %v", err)
	}

	ns := namespace(t, "kwok")
	// The ServiceAccount admission plugin rejects pods until the
	// namespace has its default ServiceAccount.
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := cp.Client().CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
	if err != nil {
		t.Fatalf("waiting for the default ServiceAccount: %v", err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.PodSpec{
			NodeName:   node,
			Containers: []corev1.Container{{Name: "web", Image: "example.invalid/web"}},
		},
	}
	if _, err := cp.Client().CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating pod: %v", err)
	}
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		got, err := cp.Client().CoreV1().Pods(ns).Get(ctx, "web", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return got.Status.Phase == corev1.PodRunning, nil
	})
	if err != nil {
		t.Fatalf("waiting for kwok to run the pod: %v", err)
	}
}

// TestAPIServerRestart runs last among the tests that share the control
// plane (Go runs tests in source order): it takes the apiserver away.
func TestAPIServerRestart(t *testing.T) {
	ctx := t.Context()
	ns := namespace(t, "restart")
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "survivor"}, Data: map[string]string{"k": "v"}}
	if _, err := cp.Client().CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating configmap: %v", err)
	}
	url := cp.URL(0)

	if err := cp.StopAPIServer(0); err != nil {
		t.Fatal(err)
	}
	shortCtx, cancel := context.WithTimeout(ctx, 3*time.Second)
	_, err := cp.Client().CoreV1().ConfigMaps(ns).Get(shortCtx, "survivor", metav1.GetOptions{})
	cancel()
	if err == nil {
		t.Fatal("getting a configmap from a stopped apiserver succeeded")
	}
	// Stopping twice is harmless; starting twice is a mistake.
	if err := cp.StopAPIServer(0); err != nil {
		t.Errorf("stopping a stopped apiserver: %v", err)
	}

	if err := cp.StartAPIServer(0); err != nil {
		t.Fatal(err)
	}
	if err := cp.StartAPIServer(0); err == nil {
		t.Error("starting a running apiserver succeeded")
	}
	if cp.URL(0) != url {
		t.Errorf("URL changed across restart: %s -> %s", url, cp.URL(0))
	}
	got, err := cp.Client().CoreV1().ConfigMaps(ns).Get(ctx, "survivor", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("getting configmap after restart: %v", err)
	}
	if got.Data["k"] != "v" {
		t.Errorf("configmap after restart = %v, want k=v", got.Data)
	}
}
