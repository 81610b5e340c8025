// Package proxy_test proves outpost's online behaviour end to end: real
// kube-apiservers on one etcd, the outpost binary in front of them, and real
// clients (kubectl, client-go) compared with the same calls made directly.
package proxy_test

import (
	"os"
	"path/filepath"
	"testing"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

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
	return cp.ServiceAccountToken(t, "default", "e2e-admin", "cluster-admin")
}

// createNamespace creates namespace ns directly.
func createNamespace(t *testing.T, ns string) {
	t.Helper()
	if _, err := cp.Client().CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
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
