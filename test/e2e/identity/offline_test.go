package identity_test

import (
	"crypto/rand"
	"crypto/rsa"
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// Offline, a pod's service-account token sent with kubelet's User-Agent
// gets outpost's refusal for the Secret kubelet cached, never its data;
// the node itself still reads it from the cache.
func TestPodTokenCannotReadKubeletSecretsOffline(t *testing.T) {
	const node, ns = "edge-secrets", "secrets"
	namespace(t, ns, "app")
	configMaps(t, ns, "app-config")
	pod, secretData := nodeSecret(t, node, ns, "db", "s3cret-Pa55word", "app")
	e := startEdge(t, node)
	secretPath := "/api/v1/namespaces/" + ns + "/secrets/db"
	configPath := "/api/v1/namespaces/" + ns + "/configmaps"

	// kubelet (this node's certificate) reads the pod's Secret online.
	if a := e.readAsNode(t, secretPath); !strings.Contains(a.body, secretData) {
		t.Fatalf("node reading the secret online: %v", a)
	}
	// The pod's token reads what its account may; the Secret it may not,
	// and the apiserver says so.
	seen, unseen := tokenFor(t, ns, "app", pod), tokenFor(t, ns, "app", pod)
	if a := e.get(t, caller{token: seen}, configPath); a.code != http.StatusOK {
		t.Fatalf("pod token listing its configmaps online: %v", a)
	}
	if a := e.get(t, caller{token: seen}, secretPath); a.code != http.StatusForbidden || strings.Contains(a.body, secretData) {
		t.Fatalf("pod token reading the secret online: %v; want the apiserver's 403", a)
	}
	e.waitIssuer(t)
	e.cut(t)

	// The cache holds the Secret: what follows is a refusal by identity,
	// not an empty cache.
	if a := e.get(t, e.asNode(t), secretPath); a.code != http.StatusOK || a.servedBy != "cache" || !strings.Contains(a.body, secretData) {
		t.Fatalf("node reading its cached secret offline: %v", a)
	}
	for name, c := range map[string]caller{"pod token seen online": {token: seen}, "pod token never seen online": {token: unseen}} {
		// The token is accepted offline and served its own view...
		if a := e.get(t, c, configPath); a.code != http.StatusOK || a.servedBy != "cache" {
			t.Errorf("%s listing its configmaps offline: %v", name, a)
		}
		// ...but never the node's, whatever its User-Agent says.
		refusedByOutpost(t, name+" reading the secret", e.get(t, c, secretPath), secretData, http.StatusForbidden, http.StatusServiceUnavailable)
		refusedByOutpost(t, name+" listing the namespace's secrets", e.get(t, c, "/api/v1/namespaces/"+ns+"/secrets"), secretData, http.StatusForbidden, http.StatusServiceUnavailable)
		refusedByOutpost(t, name+" listing every secret", e.get(t, c, "/api/v1/secrets"), secretData, http.StatusForbidden, http.StatusServiceUnavailable)
	}
	// Writes outpost answers itself offline belong to this node's kubelet
	// alone: the pod's token, with kubelet's User-Agent, can neither renew
	// the node's Lease nor patch its Node status.
	for _, p := range []string{"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/" + node, "/api/v1/nodes/" + node + "/status"} {
		a := e.send(t, caller{token: seen}, http.MethodPatch, p, `{"metadata":{"labels":{"forged":"yes"}}}`)
		if st, ok := a.status(); a.code != http.StatusServiceUnavailable || !ok || st.Code != http.StatusServiceUnavailable {
			t.Errorf("pod token patching %s offline: %v; want outpost's 503 Status", p, a)
		}
	}
	refusedByOutpost(t, "kubelet's User-Agent and no credential", e.get(t, caller{}, secretPath), secretData, http.StatusUnauthorized)
	refusedByOutpost(t, "a made-up token", e.get(t, caller{token: "kubelet"}, secretPath), secretData, http.StatusUnauthorized)
}

// Offline, tokens outpost cannot vouch for get 401: unknown, forged,
// expired, for another audience or issuer; and a token confirmed online
// is accepted only until it expires.
func TestUnknownAndExpiredTokensOffline(t *testing.T) {
	const node, ns = "edge-tokens", "tokens"
	sas := namespace(t, ns, "short")
	configMaps(t, ns, "c1")
	m := clusterMinter(t)
	e := startEdge(t, node)
	configPath := "/api/v1/namespaces/" + ns + "/configmaps"

	exp := time.Now().Add(12 * time.Second)
	short := m.sign(t, m.claims(sas["short"], exp))
	// The apiserver accepts the minted token: its claims are the real ones.
	if a := e.get(t, caller{token: short}, configPath); a.code != http.StatusOK {
		t.Fatalf("minted token online: %v", a)
	}
	e.waitIssuer(t)
	e.cut(t)
	if time.Until(exp) < 2*time.Second {
		t.Fatalf("the cut took too long: the token expires in %v", time.Until(exp))
	}
	if a := e.get(t, caller{token: short}, configPath); a.code != http.StatusOK || a.servedBy != "cache" {
		t.Fatalf("token seen online, offline before it expires: %v", a)
	}

	other, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	valid := m.claims(sas["short"], time.Now().Add(time.Hour))
	with := func(k string, v any) map[string]any {
		c := maps.Clone(valid)
		c[k] = v
		return c
	}
	for _, tc := range []struct {
		name, token, why string
	}{
		{"an opaque token", "0123456789abcdef0123456789abcdef", "never confirmed online"},
		{"a JWT signed by another key", m.sign(t, valid, newSigner(t, other, m.kid)), "signature does not verify"},
		{"an expired JWT", m.sign(t, with("exp", time.Now().Add(-time.Minute).Unix())), "expired"},
		{"a JWT for another audience", m.sign(t, with("aud", []string{"vault"})), "audiences"},
		{"a JWT of another issuer", m.sign(t, with("iss", "https://evil.example")), "issued by"},
	} {
		a := e.get(t, caller{token: tc.token}, configPath)
		refusedByOutpost(t, tc.name, a, "", http.StatusUnauthorized)
		if !strings.Contains(a.body, tc.why) {
			t.Errorf("%s: %v; want a message saying %q", tc.name, a, tc.why)
		}
	}

	// The token seen online expires while offline: 401 from then on.
	time.Sleep(time.Until(exp) + 500*time.Millisecond)
	a := e.get(t, caller{token: short}, configPath)
	refusedByOutpost(t, "token seen online, expired offline", a, "", http.StatusUnauthorized)
	if !strings.Contains(a.body, "expired") {
		t.Errorf("token seen online, expired offline: %v; want a message saying it expired", a)
	}
}

// A service-account token never seen online but signed by the cluster
// reads offline, even after outpost restarted offline, exactly the views
// its own service account read online, and nothing of the node's or of
// another account's.
func TestSignedTokenNeverSeenOnlineReadsItsOwnViews(t *testing.T) {
	const node, ns = "edge-fresh", "fresh"
	sas := namespace(t, ns, "reader", "idle")
	configMaps(t, ns, "cm-a", "cm-b", "cm-c")
	_, secretData := nodeSecret(t, node, ns, "node-only", "n0de-0nly-value", "idle")
	m := clusterMinter(t)
	e := startEdge(t, node)
	secretPath := "/api/v1/namespaces/" + ns + "/secrets/node-only"
	configPath := "/api/v1/namespaces/" + ns + "/configmaps"

	e.readAsNode(t, secretPath)
	a := e.get(t, caller{token: tokenFor(t, ns, "reader", nil)}, configPath)
	if a.code != http.StatusOK {
		t.Fatalf("reader listing configmaps online: %v", a)
	}
	want := a.itemNames(t)
	if !slices.Equal(want, []string{"cm-a", "cm-b", "cm-c"}) {
		t.Fatalf("reader's configmaps online: %v", want)
	}
	e.waitIssuer(t)
	e.cut(t)
	// Restarted offline, outpost has the cluster's keys from its store.
	e.o.Stop()
	if err := e.o.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	e.waitState(t, "offline")

	fresh := caller{token: m.sign(t, m.claims(sas["reader"], time.Now().Add(time.Hour)))}
	a = e.get(t, fresh, configPath)
	if a.code != http.StatusOK || a.servedBy != "cache" {
		t.Fatalf("fresh token of reader listing configmaps offline: %v", a)
	}
	if got := a.itemNames(t); !slices.Equal(got, want) {
		t.Errorf("fresh token of reader offline: %v; want what reader read online, %v", got, want)
	}
	refusedByOutpost(t, "fresh token of reader reading the node's secret", e.get(t, fresh, secretPath), secretData, http.StatusForbidden, http.StatusServiceUnavailable)

	// Another account, verified just as well, read nothing online.
	idle := caller{token: m.sign(t, m.claims(sas["idle"], time.Now().Add(time.Hour)))}
	a = e.get(t, idle, configPath)
	refusedByOutpost(t, "fresh token of idle listing what reader read", a, "", http.StatusForbidden, http.StatusServiceUnavailable)
	if strings.Contains(a.body, "cm-a") {
		t.Errorf("idle got reader's configmaps: %v", a)
	}
	// The node still reads its secret: the refusals are about who asks.
	if a := e.get(t, e.asNode(t), secretPath); a.code != http.StatusOK || !strings.Contains(a.body, secretData) {
		t.Errorf("node reading its secret offline: %v", a)
	}
}
