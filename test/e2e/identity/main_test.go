// Package identity_test proves end to end that outpost is as strict about
// who is calling offline as the apiserver is online: with its link to a
// real kube-apiserver cut, a caller reads only what its own identity read
// online, whatever its User-Agent; unknown and expired tokens get 401; and
// a service-account token never seen online is verified against the keys
// the cluster published, then served only its own service account's views.
//
// The link is cut with a framework.FaultProxy between outpost and the
// apiserver, while the tests keep talking to the apiserver directly. Tokens
// with chosen claims are minted with the cluster's service-account signing
// key, as kube-apiserver would mint them.
package identity_test

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	// The apiserver alone: TokenRequest needs only the ServiceAccount
	// object, and no controller must change anything behind the tests.
	os.Exit(framework.Run(m, framework.Options{}, &cp))
}

// kubeletUA is the User-Agent every offline request below forges: it must
// change nothing about whose data a caller gets.
const kubeletUA = "kubelet/v1.37.2 (linux/amd64) kubernetes/abcdef"

// An edge is outpost for one node behind a fault proxy to the apiserver.
type edge struct {
	node  string
	proxy *framework.FaultProxy
	o     *framework.Outpost
}

// startEdge starts a fault proxy and outpost for node behind it, both
// stopped when the test ends, and waits until outpost is online.
func startEdge(t *testing.T, node string) *edge {
	t.Helper()
	o, proxy := cp.StartOutpostWithLinkT(t, node)
	return &edge{node: node, proxy: proxy, o: o}
}

func (e *edge) waitState(t *testing.T, want string) {
	t.Helper()
	if _, err := e.o.WaitState(t.Context(), want, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}

// cut resets the link to the cloud and waits until outpost is offline.
func (e *edge) cut(t *testing.T) {
	t.Helper()
	// What was read online reaches the store within a batch (100 ms).
	time.Sleep(300 * time.Millisecond)
	e.proxy.Reset()
	e.waitState(t, "offline")
}

// waitIssuer waits until outpost has fetched the cluster's
// service-account keys. The node may not read them (only the group
// system:serviceaccounts may, by default), so outpost uses the token of a
// service account it saw: the test must have made such a call first.
func (e *edge) waitIssuer(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		log, _ := os.ReadFile(e.o.LogPath)
		if bytes.Contains(log, []byte("service-account issuer keys fetched")) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("outpost did not fetch the service-account issuer's keys within 15s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// caller is how a request reaches outpost: a bearer token, this node's
// client certificate, or nothing; always with the forged kubelet
// User-Agent.
type caller struct {
	token string
	cert  *tls.Certificate
}

func (e *edge) asNode(t *testing.T) caller {
	t.Helper()
	pair, err := tls.LoadX509KeyPair(e.o.NodeCertFile, e.o.NodeKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	return caller{cert: &pair}
}

// answer is outpost's response to one GET.
type answer struct {
	code     int
	body     string
	servedBy string
}

func (a answer) String() string {
	body := a.body
	if len(body) > 300 {
		body = body[:300] + "..."
	}
	return fmt.Sprintf("%d (served by %q) %s", a.code, a.servedBy, body)
}

// get sends GET path to outpost as c, on a connection of its own.
func (e *edge) get(t *testing.T, c caller, path string) answer {
	t.Helper()
	return e.send(t, c, http.MethodGet, path, "")
}

// send sends method path (with a merge-patch body, if any) to outpost as c.
func (e *edge) send(t *testing.T, c caller, method, path, body string) answer {
	t.Helper()
	cfg := &tls.Config{RootCAs: framework.CertPool(t, e.o.ServingCAFile)}
	if c.cert != nil {
		cfg.Certificates = []tls.Certificate{*c.cert}
	}
	tr := &http.Transport{TLSClientConfig: cfg}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, method, e.o.URL+path, strings.NewReader(body))
	req.Header.Set("Accept", "application/json")
	if body != "" {
		req.Header.Set("Content-Type", "application/merge-patch+json")
	}
	req.Header.Set("User-Agent", kubeletUA)
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	return answer{code: resp.StatusCode, body: string(got), servedBy: resp.Header.Get("X-Outpost-Served-By")}
}

// status decodes a Status answer; ok is false if the body is not one.
func (a answer) status() (metav1.Status, bool) {
	var st metav1.Status
	err := json.Unmarshal([]byte(a.body), &st)
	return st, err == nil && st.Kind == "Status" && int(st.Code) == a.code
}

// itemNames returns the names in a list answer.
func (a answer) itemNames(t *testing.T) []string {
	t.Helper()
	var l struct {
		Kind  string `json:"kind"`
		Items []struct {
			Metadata metav1.ObjectMeta `json:"metadata"`
		} `json:"items"`
	}
	if err := json.Unmarshal([]byte(a.body), &l); err != nil || !strings.HasSuffix(l.Kind, "List") {
		t.Fatalf("not a list: %v", a)
	}
	var out []string
	for _, it := range l.Items {
		out = append(out, it.Metadata.Name)
	}
	return out
}

// refusedByOutpost fails the test unless a is outpost's own refusal: a
// Status with one of codes, saying it comes from outpost, and none of the
// secret bytes in it.
func refusedByOutpost(t *testing.T, what string, a answer, secret string, codes ...int) {
	t.Helper()
	st, ok := a.status()
	if !ok || !strings.HasPrefix(st.Message, "outpost:") || !slices.Contains(codes, a.code) {
		t.Errorf("%s: %v; want outpost's Status with code %v", what, a, codes)
	}
	if secret != "" && strings.Contains(a.body, secret) {
		t.Errorf("%s: the answer holds the secret's data: %v", what, a)
	}
	t.Logf("%s: %d %s", what, a.code, st.Message)
}

// namespace creates namespace ns with, for each name in accounts, a
// ServiceAccount allowed to get and list its configmaps.
func namespace(t *testing.T, ns string, accounts ...string) map[string]*corev1.ServiceAccount {
	t.Helper()
	ctx := t.Context()
	c := cp.Client()
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RbacV1().Roles(ns).Create(ctx, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "configmap-reader"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"get", "list", "watch"}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	out := map[string]*corev1.ServiceAccount{}
	for _, name := range accounts {
		sa, err := c.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		out[name] = sa
		if _, err := c.RbacV1().RoleBindings(ns).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name},
			RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "configmap-reader"},
			Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: name}}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// configMaps creates configmaps with the given names in ns.
func configMaps(t *testing.T, ns string, names ...string) {
	t.Helper()
	for _, n := range names {
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: n}, Data: map[string]string{"k": n}}
		if _, err := cp.Client().CoreV1().ConfigMaps(ns).Create(t.Context(), cm, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

// nodeSecret creates secret name in ns holding value, and a pod on node
// that mounts it, so that the node authorizer lets the node read it. It
// returns the pod and the secret's data as the API encodes it.
func nodeSecret(t *testing.T, node, ns, name, value, serviceAccount string) (*corev1.Pod, string) {
	t.Helper()
	ctx := t.Context()
	c := cp.Client()
	if _, err := c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name}, StringData: map[string]string{"password": value}}
	if _, err := c.CoreV1().Secrets(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "app"},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: serviceAccount,
			Containers: []corev1.Container{{Name: "c", Image: "example/app:1"}},
			Volumes:    []corev1.Volume{{Name: "s", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: name}}}}}}
	pod, err := c.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	encoded, _ := json.Marshal([]byte(value))
	return pod, strings.Trim(string(encoded), `"`)
}

// readAsNode waits until the node may read path through outpost (the node
// authorizer learns of a new pod asynchronously) and returns the answer.
func (e *edge) readAsNode(t *testing.T, path string) answer {
	t.Helper()
	node := e.asNode(t)
	deadline := time.Now().Add(15 * time.Second)
	for {
		a := e.get(t, node, path)
		if a.code == http.StatusOK {
			return a
		}
		if time.Now().After(deadline) {
			t.Fatalf("node reading %s online: %v", path, a)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// tokenFor asks the apiserver for a token of service account ns/name,
// bound to pod when it is not nil.
func tokenFor(t *testing.T, ns, name string, pod *corev1.Pod) string {
	t.Helper()
	exp := int64(3600)
	tr := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}
	if pod != nil {
		tr.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := cp.Client().CoreV1().ServiceAccounts(ns).CreateToken(t.Context(), name, tr, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token for %s/%s: %v", ns, name, err)
	}
	return tr.Status.Token
}

// minter signs tokens as the cluster's service-account issuer does.
type minter struct {
	issuer, kid string
	signer      jose.Signer
}

// clusterMinter reads the cluster's signing key and, from the apiserver
// itself, its issuer and the key id it publishes.
func clusterMinter(t *testing.T) *minter {
	t.Helper()
	ctx := t.Context()
	rc := cp.Client().CoreV1().RESTClient()
	cfgDoc, err := rc.Get().AbsPath("/.well-known/openid-configuration").DoRaw(ctx)
	if err != nil {
		t.Fatalf("openid-configuration: %v", err)
	}
	var discovery struct {
		Issuer string `json:"issuer"`
	}
	if err := json.Unmarshal(cfgDoc, &discovery); err != nil || discovery.Issuer == "" {
		t.Fatalf("openid-configuration %s: %v", cfgDoc, err)
	}
	keysDoc, err := rc.Get().AbsPath("/openid/v1/jwks").DoRaw(ctx)
	if err != nil {
		t.Fatalf("jwks: %v", err)
	}
	var keys jose.JSONWebKeySet
	if err := json.Unmarshal(keysDoc, &keys); err != nil || len(keys.Keys) != 1 {
		t.Fatalf("jwks %s: %v; want one key", keysDoc, err)
	}
	pemData, err := os.ReadFile(cp.ServiceAccountKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(pemData)
	if block == nil {
		t.Fatalf("no PEM block in %s", cp.ServiceAccountKeyFile)
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, ok := key.(*rsa.PrivateKey)
	if !ok {
		t.Fatalf("service-account key is a %T, not RSA", key)
	}
	kid := keys.Keys[0].KeyID
	return &minter{issuer: discovery.Issuer, kid: kid, signer: newSigner(t, rsaKey, kid)}
}

func newSigner(t *testing.T, key *rsa.PrivateKey, kid string) jose.Signer {
	t.Helper()
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", kid))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// claims are those of a bound token kube-apiserver would issue to sa,
// valid from a minute ago until exp.
func (m *minter) claims(sa *corev1.ServiceAccount, exp time.Time) map[string]any {
	now := time.Now()
	return map[string]any{
		"iss": m.issuer,
		"sub": "system:serviceaccount:" + sa.Namespace + ":" + sa.Name,
		"aud": []string{m.issuer},
		"iat": now.Add(-time.Minute).Unix(),
		"nbf": now.Add(-time.Minute).Unix(),
		"exp": exp.Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      sa.Namespace,
			"serviceaccount": map[string]any{"name": sa.Name, "uid": string(sa.UID)},
		},
	}
}

// sign serializes claims signed with m's key (or with signer, if given).
func (m *minter) sign(t *testing.T, claims map[string]any, signer ...jose.Signer) string {
	t.Helper()
	s := m.signer
	if len(signer) > 0 {
		s = signer[0]
	}
	token, err := jwt.Signed(s).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return token
}
