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
