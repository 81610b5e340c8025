package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math/big"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/outposthq/outpost/internal/request"
)

type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(t *testing.T) ca {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return ca{c, key}
}

func (c ca) issue(t *testing.T, cn string, orgs ...string) *x509.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return leaf
}

func withCert(c *x509.Certificate) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/api/v1/pods", nil)
	r.TLS = &tls.ConnectionState{PeerCertificates: []*x509.Certificate{c}}
	return r
}

func TestCertificates(t *testing.T) {
	cluster, other := newCA(t), newCA(t)
	pool := x509.NewCertPool()
	pool.AddCert(cluster.cert)
	a := &Authenticator{NodeName: "edge-1", ClientCAs: pool}

	id, err := a.Authenticate(withCert(cluster.issue(t, "system:node:edge-1", "system:nodes")))
	if err != nil || id.Kind != request.NodeCert || id.User != "system:node:edge-1" {
		t.Fatalf("this node's certificate: %+v, %v; want the node identity", id, err)
	}
	for name, c := range map[string]*x509.Certificate{
		"another node":             cluster.issue(t, "system:node:edge-2", "system:nodes"),
		"admin":                    cluster.issue(t, "admin", "system:masters"),
		"node name, not the group": cluster.issue(t, "system:node:edge-1"),
	} {
		if _, err := a.Authenticate(withCert(c)); !apierrors.IsForbidden(err) {
			t.Errorf("%s: err = %v, want 403", name, err)
		}
	}
	if _, err := a.Authenticate(withCert(other.issue(t, "system:node:edge-1", "system:nodes"))); !apierrors.IsUnauthorized(err) {
		t.Errorf("certificate of a foreign CA: err = %v, want 401", err)
	}
	// Such a certificate beside a bearer token leaves the token to judge,
	// as kube-apiserver does; a valid certificate of someone else does not.
	withToken := func(r *http.Request) *http.Request {
		r.Header.Set("Authorization", "Bearer some-token")
		return r
	}
	if id, err := a.Authenticate(withToken(withCert(other.issue(t, "system:node:edge-1", "system:nodes")))); err != nil || id.Kind != request.BearerToken {
		t.Errorf("foreign certificate and a token: %+v, %v; want the token's caller", id, err)
	}
	if _, err := a.Authenticate(withToken(withCert(cluster.issue(t, "admin", "system:masters")))); !apierrors.IsForbidden(err) {
		t.Errorf("another user's valid certificate and a token: err = %v, want 403", err)
	}
	if _, err := a.Authenticate(httptest.NewRequest(http.MethodGet, "/", nil)); !apierrors.IsUnauthorized(err) {
		t.Errorf("no credentials: err = %v, want 401", err)
	}
}

func TestTokensLearnedOnceAndForwarded(t *testing.T) {
	var reviews atomic.Int32
	a := &Authenticator{NodeName: "edge-1", Review: func(ctx context.Context, token string) (string, []string, bool, error) {
		reviews.Add(1)
		if token == "good" {
			return "system:serviceaccount:default:app", []string{"system:serviceaccounts"}, true, nil
		}
		return "", nil, false, nil
	}}
	for range 3 {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.Header.Set("Authorization", "Bearer good")
		// A forged User-Agent changes nothing about who the caller is.
		r.Header.Set("User-Agent", "kubelet/v1.37.2")
		id, err := a.Authenticate(r)
		if err != nil {
			t.Fatal(err)
		}
		if id.Kind != request.BearerToken || id.User != "system:serviceaccount:default:app" || id.Token != "good" || id.TokenHash == "" {
			t.Fatalf("identity = %+v", id)
		}
	}
	if n := reviews.Load(); n != 1 {
		t.Fatalf("reviews = %d, want 1 (remembered by hash)", n)
	}
	r := httptest.NewRequest(http.MethodGet, "/", nil)
	r.Header.Set("Authorization", "Bearer bad")
	id, err := a.Authenticate(r)
	if err != nil || id.User != "" || id.Kind != request.BearerToken {
		t.Fatalf("rejected token: %+v, %v; want forwarded with no learned user (the apiserver answers 401)", id, err)
	}
}

func TestOfflineTokens(t *testing.T) {
	online := true
	a := &Authenticator{NodeName: "edge-1", Online: func() bool { return online },
		Review: func(ctx context.Context, token string) (string, []string, bool, error) {
			if !online {
				return "", nil, false, errors.New("dial tcp: connection refused")
			}
			return "system:serviceaccount:default:app", nil, true, nil
		}}
	req := func(token string) *http.Request {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.Header.Set("Authorization", "Bearer "+token)
		return r
	}
	exp := func(d time.Duration) string {
		claims, _ := json.Marshal(map[string]int64{"exp": time.Now().Add(d).Unix()})
		return "h." + base64.RawURLEncoding.EncodeToString(claims) + ".s"
	}
	seen, expiring := exp(time.Hour), exp(-time.Minute)
	if _, err := a.Authenticate(req(seen)); err != nil {
		t.Fatal(err)
	}
	online = false
	if id, err := a.Authenticate(req(seen)); err != nil || id.User != "system:serviceaccount:default:app" {
		t.Fatalf("token confirmed online, offline: %+v %v", id, err)
	}
	if _, err := a.Authenticate(req("never-seen")); !apierrors.IsUnauthorized(err) {
		t.Fatalf("unknown token offline: %v; want 401", err)
	}
	online = true
	if _, err := a.Authenticate(req(expiring)); err != nil {
		t.Fatal(err)
	}
	online = false
	if _, err := a.Authenticate(req(expiring)); !apierrors.IsUnauthorized(err) {
		t.Fatalf("expired token offline: %v; want 401", err)
	}
}

// TestNoReviewOffline: offline, a token whose memo expired is recalled
// without asking the apiserver, which could only time out (a cut link
// drops packets): requests with it are not held up for the review's
// timeout every time the memo expires.
func TestNoReviewOffline(t *testing.T) {
	online := true
	reviews := 0
	a := &Authenticator{NodeName: "edge-1", Online: func() bool { return online }, TokenTTL: time.Nanosecond,
		Review: func(ctx context.Context, token string) (string, []string, bool, error) {
			reviews++
			if !online {
				<-ctx.Done() // a blackholed link
				return "", nil, false, ctx.Err()
			}
			return "system:serviceaccount:default:app", nil, true, nil
		}}
	known := map[string]request.Identity{}
	a.Remember = func(hash string, id request.Identity, _ time.Time) { known[hash] = id }
	a.Recall = func(hash string) (request.Identity, time.Time, bool) {
		id, ok := known[hash]
		return id, time.Now().Add(time.Hour), ok
	}
	r := httptest.NewRequest(http.MethodGet, "/", nil)
	r.Header.Set("Authorization", "Bearer opaque-token")
	if _, err := a.Authenticate(r); err != nil || reviews != 1 {
		t.Fatalf("online: %v, %d reviews", err, reviews)
	}
	online = false
	start := time.Now()
	id, err := a.Authenticate(r)
	if err != nil || id.User != "system:serviceaccount:default:app" {
		t.Fatalf("offline: %+v, %v", id, err)
	}
	if took := time.Since(start); reviews != 1 || took > time.Second {
		t.Fatalf("offline: %d reviews, took %v; want none more, at once", reviews, took)
	}
}

func TestOfflineServiceAccountTokens(t *testing.T) {
	online := true
	var seen []string
	a := &Authenticator{NodeName: "edge-1", Online: func() bool { return online },
		Seen: func(user, _ string) { seen = append(seen, user) },
		Review: func(ctx context.Context, token string) (string, []string, bool, error) {
			if !online {
				return "", nil, false, errors.New("dial tcp: connection refused")
			}
			return "", nil, false, nil // the apiserver rejects every token here
		}}
	req := func(token string) *http.Request {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.Header.Set("Authorization", "Bearer "+token)
		r.Header.Set("User-Agent", "kubelet/v1.37.2") // forged: changes nothing
		return r
	}
	k := newRSAKey(t, "k")
	now := time.Now()
	claims := func(exp time.Time) map[string]any {
		c := saClaims("shop", "web")
		c["iat"], c["nbf"], c["exp"] = now.Add(-time.Minute).Unix(), now.Add(-time.Minute).Unix(), exp.Unix()
		return c
	}
	valid := sign(t, k, claims(now.Add(time.Hour)))
	expired := sign(t, k, claims(now.Add(-time.Second)))
	forged := sign(t, newRSAKey(t, "k"), claims(now.Add(time.Hour)))

	// Online the apiserver judges, even a token the issuer would accept.
	a.ServiceAccounts.Store(newIssuer(t, nil, k))
	if id, err := a.Authenticate(req(valid)); err != nil || id.User != "" {
		t.Fatalf("online, a token the apiserver rejects: %+v, %v; want forwarded with no user", id, err)
	}

	online = false
	a.ServiceAccounts.Store(nil)
	if _, err := a.Authenticate(req(valid)); !apierrors.IsUnauthorized(err) {
		t.Fatalf("offline without the issuer's keys: %v; want 401", err)
	}
	a.ServiceAccounts.Store(newIssuer(t, nil, k))
	id, err := a.Authenticate(req(valid))
	if err != nil {
		t.Fatalf("offline, a valid service-account token never seen online: %v", err)
	}
	if id.Kind != request.BearerToken || id.User != "system:serviceaccount:shop:web" || id.Token != valid || id.TokenHash != tokenHash(valid) ||
		!slices.Equal(id.Groups, []string{"system:serviceaccounts", "system:serviceaccounts:shop", "system:authenticated"}) {
		t.Fatalf("identity = %+v", id)
	}
	if !slices.Equal(seen, []string{"system:serviceaccount:shop:web"}) {
		t.Fatalf("seen = %v; want the service account once", seen)
	}
	for name, token := range map[string]string{"expired": expired, "signed by another key": forged, "not a JWT": "opaque-token"} {
		if _, err := a.Authenticate(req(token)); !apierrors.IsUnauthorized(err) {
			t.Errorf("offline, %s: %v; want 401", name, err)
		}
	}

	// Still online, but the apiserver cannot be asked (the link fails
	// before the monitor notices): the issuer says who the token is, for a
	// read that the cache answers when its connection fails too.
	failing := &Authenticator{NodeName: "edge-1", Online: func() bool { return true },
		Review: func(context.Context, string) (string, []string, bool, error) {
			return "", nil, false, errors.New("dial tcp: connection refused")
		}}
	failing.ServiceAccounts.Store(newIssuer(t, nil, k))
	if id, err := failing.Authenticate(req(valid)); err != nil || id.User != "system:serviceaccount:shop:web" || id.Token != valid {
		t.Fatalf("apiserver unreachable, still online: %+v, %v; want the service account", id, err)
	}
	if id, err := failing.Authenticate(req(forged)); err != nil || id.User != "" {
		t.Fatalf("apiserver unreachable, forged token: %+v, %v; want forwarded with no user", id, err)
	}
}
