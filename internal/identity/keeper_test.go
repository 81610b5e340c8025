package identity

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/outposthq/outpost/internal/config"
	"github.com/outposthq/outpost/internal/store"
	"github.com/outposthq/outpost/internal/upstream"
)

const testIssuerURL = "https://kubernetes.default.svc.cluster.local"

// discoveryServer serves the two documents as kube-apiserver does by
// default: only to service accounts (here the token "sa-good"), 403 to
// the node (no token), 401 to a token it does not know.
func discoveryServer(t *testing.T, key *rsa.PrivateKey) *httptest.Server {
	t.Helper()
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k1", Algorithm: "RS256", Use: "sig"}}})
	cfg, _ := json.Marshal(map[string]any{"issuer": testIssuerURL, "jwks_uri": testIssuerURL + "/openid/v1/jwks",
		"id_token_signing_alg_values_supported": []string{"RS256"}})
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.Header.Get("Authorization") {
		case "":
			http.Error(w, "forbidden", http.StatusForbidden)
			return
		case "Bearer sa-good":
		default:
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		switch r.URL.Path {
		case issuerConfigPath:
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write(cfg)
		case issuerKeysPath:
			if !strings.Contains(r.Header.Get("Accept"), "application/jwk-set+json") {
				http.Error(w, "not acceptable", http.StatusNotAcceptable)
				return
			}
			w.Header().Set("Content-Type", "application/jwk-set+json")
			_, _ = w.Write(jwks)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// lockedBuffer collects log output written from several goroutines.
type lockedBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// keeper is an IssuerKeeper toward srv, online, with its store in dir and
// its tokens seen in tokens.
type keeper struct {
	*IssuerKeeper
	tokens *Tokens
}

func issuerKeeper(t *testing.T, srv *httptest.Server, dir string, logs *lockedBuffer) keeper {
	t.Helper()
	u, _ := url.Parse(srv.URL)
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	pool, err := upstream.New([]*url.URL{u}, upstream.Credentials{TLS: &tls.Config{RootCAs: roots}}, config.LBRoundRobin)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(filepath.Join(dir, "cache.db"), store.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	auth := &Authenticator{NodeName: "edge-1"}
	tokens := &Tokens{}
	return keeper{&IssuerKeeper{Store: st, Auth: auth, Upstream: pool.As, Node: auth.Node(), Tokens: tokens.All,
		Online: func() bool { return true }, Changed: func() <-chan struct{} { return nil },
		Log: slog.New(slog.NewTextHandler(logs, nil))}, tokens}
}

func serviceAccountToken(t *testing.T, key *rsa.PrivateKey) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", "k1"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	token, err := jwt.Signed(signer).Claims(jwt.Claims{Issuer: testIssuerURL, Subject: "system:serviceaccount:shop:web",
		Audience: jwt.Audience{testIssuerURL}, IssuedAt: jwt.NewNumericDate(now), Expiry: jwt.NewNumericDate(now.Add(time.Hour))}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return token
}

func TestIssuerFetchedWithAServiceAccountTokenAndKept(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	srv := discoveryServer(t, key)
	dir := t.TempDir()
	logs := &lockedBuffer{}
	h := issuerKeeper(t, srv, dir, logs)
	tried := map[string]bool{}

	// The node may not read the documents, and no service account was seen.
	if err := h.refreshIssuer(t.Context(), tried); !errors.Is(err, errNoIssuerReader) {
		t.Fatalf("as the node only: %v; want errNoIssuerReader", err)
	}
	// Tokens that are not a service account's are not used; a refused
	// one is not tried again.
	h.tokens.Seen("system:node:edge-1", "node-token")
	h.tokens.Seen("system:serviceaccount:shop:old", "sa-revoked")
	if err := h.refreshIssuer(t.Context(), tried); !errors.Is(err, errNoIssuerReader) || !tried["sa-revoked"] || tried["node-token"] {
		t.Fatalf("with a refused token: %v, tried %v", err, tried)
	}
	if h.Auth.ServiceAccounts.Load() != nil {
		t.Fatal("an issuer without documents")
	}

	h.tokens.Seen("system:serviceaccount:shop:web", "sa-good")
	if err := h.refreshIssuer(t.Context(), tried); err != nil {
		t.Fatal(err)
	}
	token := serviceAccountToken(t, key)
	if id, err := h.Auth.ServiceAccounts.Load().Verify(token, time.Now()); err != nil || id.User != "system:serviceaccount:shop:web" {
		t.Fatalf("fetched issuer: %+v, %v", id, err)
	}

	// A restart (offline: nothing upstream is asked) verifies from the store.
	h.Store.Close()
	again := issuerKeeper(t, srv, dir, logs)
	again.Load()
	iss := again.Auth.ServiceAccounts.Load()
	if iss == nil {
		t.Fatalf("nothing loaded from the store; log:\n%s", logs)
	}
	if id, err := iss.Verify(token, time.Now()); err != nil || id.User != "system:serviceaccount:shop:web" {
		t.Fatalf("issuer loaded from the store: %+v, %v", id, err)
	}
}

func TestRunIssuerWaitsForAServiceAccountAndLogsOnce(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	h := issuerKeeper(t, discoveryServer(t, key), t.TempDir(), logs)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 5s; log:\n%s", what, logs)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	failures := func() int { return strings.Count(logs.String(), "cannot fetch the service-account issuer") }
	waitFor("first failure logged", func() bool { return failures() == 1 })
	// A refused token is tried at the next poll, and the same failure is
	// not logged again.
	h.tokens.Seen("system:serviceaccount:shop:old", "sa-revoked")
	time.Sleep(2 * issuerPoll)
	// A token that may read the documents: fetched within a poll.
	h.tokens.Seen("system:serviceaccount:shop:web", "sa-good")
	waitFor("issuer fetched", func() bool { return h.Auth.ServiceAccounts.Load() != nil })
	if n := failures(); n != 1 {
		t.Fatalf("%d failure lines; want one for one failure:\n%s", n, logs)
	}
	if !strings.Contains(logs.String(), "service-account issuer keys fetched") {
		t.Fatalf("no line for the fetch:\n%s", logs)
	}
}
