package proxy_test

import (
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/test/e2e/framework"
)

func whoami(t *testing.T, cfg *rest.Config) (string, error) {
	t.Helper()
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.AuthenticationV1().SelfSubjectReviews().Create(t.Context(), &authnReview, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	return r.Status.UserInfo.Username, nil
}

// rawGet sends a GET to outpost with an http.Client of the given TLS
// certificate (or none), headers and returns code and body.
func rawGet(t *testing.T, o *framework.Outpost, path string, cert *tls.Certificate, header http.Header) (int, string) {
	t.Helper()
	cfg := &tls.Config{RootCAs: framework.CertPool(t, o.ServingCAFile)}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, o.URL+path, nil)
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestAuthentication(t *testing.T) {
	ctx := t.Context()
	const node = "edge-auth"
	o := cp.StartOutpostT(t, node)
	if _, err := cp.Client().CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}

	// This node's certificate is served with the node's credentials.
	nodeCfg := o.ClientConfig(o.NodeCertFile, o.NodeKeyFile, "")
	if who, err := whoami(t, nodeCfg); err != nil || who != "system:node:"+node {
		t.Fatalf("node certificate: whoami = %q, %v", who, err)
	}
	nodeClient := kubernetes.NewForConfigOrDie(nodeCfg)
	if _, err := nodeClient.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{}); err != nil {
		t.Fatalf("node reads its own Node through outpost: %v", err)
	}

	// A bearer token is forwarded as it is: the caller stays itself, and
	// the apiserver judges its rights.
	weak := cp.ServiceAccountToken(t, "default", "e2e-weak", "")
	tokenCfg := o.ClientConfig("", "", weak)
	tokenCfg.UserAgent = "kubelet/v1.37.2 (linux/amd64) kubernetes/abcdef" // forged: changes nothing
	if who, err := whoami(t, tokenCfg); err != nil || who != "system:serviceaccount:default:e2e-weak" {
		t.Fatalf("token caller: whoami = %q, %v", who, err)
	}
	_, err := kubernetes.NewForConfigOrDie(tokenCfg).CoreV1().Secrets("default").List(ctx, metav1.ListOptions{})
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "system:serviceaccount:default:e2e-weak") {
		t.Fatalf("weak token listing secrets: %v; want the apiserver's 403 for that service account", err)
	}
	_, err = kubernetes.NewForConfigOrDie(o.ClientConfig("", "", "not-a-token")).CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if !apierrors.IsUnauthorized(err) {
		t.Fatalf("invalid token: %v; want 401 from the apiserver", err)
	}

	// Another node's valid certificate, and an admin's: 403 from outpost.
	for _, cn := range [][]string{{"other-node", "system:node:edge-other", "system:nodes"}, {"admin2", "admin", "system:masters"}} {
		certFile, keyFile, err := cp.IssueClientCert(cn[0], cn[1], cn[2])
		if err != nil {
			t.Fatal(err)
		}
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		code, body := rawGet(t, o, "/api/v1/namespaces", &pair, nil)
		if code != http.StatusForbidden || !statusReason(body, "Forbidden") || !strings.Contains(body, "only of this node") {
			t.Fatalf("certificate %s: %d %s; want a 403 Status from outpost", cn[1], code, body)
		}
	}

	// No credentials, even claiming to be kubelet: 401.
	code, body := rawGet(t, o, "/api/v1/namespaces", nil, http.Header{"User-Agent": {"kubelet/v1.37.2"}})
	if code != http.StatusUnauthorized || !statusReason(body, "Unauthorized") {
		t.Fatalf("no credentials: %d %s; want a 401 Status", code, body)
	}
}

func statusReason(body, reason string) bool {
	var st metav1.Status
	return json.Unmarshal([]byte(body), &st) == nil && st.Kind == "Status" && string(st.Reason) == reason
}
