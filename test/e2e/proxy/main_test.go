// Package proxy_test proves outpost's online behaviour end to end: real
// kube-apiservers on one etcd, the outpost binary in front of them, and real
// clients (kubectl, client-go) compared with the same calls made directly.
package proxy_test

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

// lenientProbes keep outpost online through probe timeouts caused by a
// loaded test machine, for tests that are not about health.
var lenientProbes = []string{"--probe-timeout=2s", "--failure-threshold=3"}

func TestMain(m *testing.M) {
	// CBOR is served only behind an alpha gate in Kubernetes 1.37; the
	// suite turns it on to compare CBOR answers through outpost with
	// direct ones.
	os.Exit(framework.Run(m, framework.Options{APIServers: 2, APIServerArgs: []string{"--feature-gates=CBORServingAndStorage=true"}}, &cp))
}

// adminToken returns a token of a service account bound to cluster-admin:
// a bearer-token caller with rights to do anything, as an operator would be.
func adminToken(t *testing.T) string {
	t.Helper()
	return saToken(t, "default", "e2e-admin", "cluster-admin")
}

// saToken creates (if needed) service account ns/name, binds it to
// clusterRole (when not empty) and returns a fresh token for it.
func saToken(t *testing.T, ns, name, clusterRole string) string {
	t.Helper()
	ctx := context.Background()
	c := cp.Client()
	_, _ = c.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if clusterRole != "" {
		_, _ = c.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: ns + "-" + name},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: clusterRole},
			Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: name}},
		}, metav1.CreateOptions{})
	}
	exp := int64(3600)
	tr, err := c.CoreV1().ServiceAccounts(ns).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token for %s/%s: %v", ns, name, err)
	}
	return tr.Status.Token
}

// roots reads the CA bundle caFile into a pool.
func roots(t *testing.T, caFile string) *x509.CertPool {
	t.Helper()
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("no certificate in %s", caFile)
	}
	return pool
}

// createNamespace creates namespace ns directly.
func createNamespace(t *testing.T, ns string) {
	t.Helper()
	if _, err := cp.Client().CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// startOutpost starts outpost for node and stops it when the test ends,
// printing its log if the test failed.
func startOutpost(t *testing.T, node string, args ...string) *framework.Outpost {
	t.Helper()
	return cp.StartOutpostT(t, node, args...)
}

func tokenKubeconfig(t *testing.T, o *framework.Outpost, token string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "token.kubeconfig")
	if err := o.WriteClientKubeconfig(path, "", "", token); err != nil {
		t.Fatal(err)
	}
	return path
}

func directTokenKubeconfig(t *testing.T, token string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "direct.kubeconfig")
	if err := framework.WriteKubeconfig(path, cp.URL(0), cp.CAFile, "", "", token); err != nil {
		t.Fatal(err)
	}
	return path
}

var authnReview = authenticationv1.SelfSubjectReview{}
