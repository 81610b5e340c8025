package peer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"
)

// authority is a test CA that issues client certificates as
// kube-controller-manager issues node certificates.
type authority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newAuthority(t *testing.T) *authority {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &authority{cert: cert, key: key, pool: pool}
}

func (a *authority) issue(t *testing.T, cn string, orgs ...string) GetCertificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, &key.PublicKey, a.key)
	if err != nil {
		t.Fatal(err)
	}
	c := &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return func() (*tls.Certificate, error) { return c, nil }
}

func (a *authority) node(t *testing.T, name string) GetCertificate {
	return a.issue(t, "system:node:"+name, "system:nodes")
}

// serve starts a probe endpoint presenting cert as node, accepting callers
// verified against ca, and returns its address.
func serve(t *testing.T, node string, cert GetCertificate, ca *x509.CertPool) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: handler(node), TLSConfig: ServerTLS(cert, ca), ErrorLog: log.New(io.Discard, "", 0)}
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

func TestProbeMutualTLS(t *testing.T) {
	ca, other := newAuthority(t), newAuthority(t)
	good := serve(t, "b", ca.node(t, "b"), ca.pool)
	impostor := serve(t, "b", ca.node(t, "c"), ca.pool) // c's certificate at b's address
	foreign := serve(t, "b", other.node(t, "b"), other.pool)
	notNode := serve(t, "b", ca.issue(t, "system:node:b"), ca.pool) // no system:nodes group
	answersWrong := serve(t, "c", ca.node(t, "b"), ca.pool)         // b's identity, another name in the body

	newProber := func(cert GetCertificate) *prober {
		return &prober{cert: cert, ca: ca.pool, timeout: 2 * time.Second, fanout: 1, threshold: 1}
	}
	a := newProber(ca.node(t, "a"))
	tests := []struct {
		name string
		p    *prober
		addr string
		ok   bool
	}{
		{"peer b with b's certificate", a, good, true},
		{"c's certificate at b's address", a, impostor, false},
		{"b's certificate from another CA", a, foreign, false},
		{"b's name without the system:nodes group", a, notNode, false},
		{"the answer names another node", a, answersWrong, false},
		{"caller with a certificate from another CA", newProber(other.node(t, "a")), good, false},
		{"caller that is a user, not a node", newProber(ca.issue(t, "alice", "system:masters")), good, false},
		{"caller with no certificate", newProber(func() (*tls.Certificate, error) { return &tls.Certificate{}, nil }), good, false},
		{"nothing listening", a, "127.0.0.1:1", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.p.probe(t.Context(), "b", tt.addr)
			if (err == nil) != tt.ok {
				t.Errorf("probe: %v, want ok=%v", err, tt.ok)
			}
		})
	}
}

func TestProbeTimesOutOnSilentPeer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0") // accepts, never answers the handshake
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ca := newAuthority(t)
	p := &prober{cert: ca.node(t, "a"), ca: ca.pool, timeout: 200 * time.Millisecond}
	start := time.Now()
	if err := p.probe(t.Context(), "b", ln.Addr().String()); err == nil {
		t.Fatal("probe of a silent peer succeeded")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("probe took %v, want about its 200ms timeout", d)
	}
}

// A site of n nodes: each round probes Fanout peers, every peer is probed
// once per ceil((n-1)/Fanout) rounds, a peer turns unreachable after
// FailureThreshold failures in a row and reachable again after one success.
func TestRoundsCoverPeersAndThreshold(t *testing.T) {
	ca := newAuthority(t)
	const n = 7 // six peers, fanout 3: two rounds probe each exactly once
	addrs := map[string]string{}
	for i := range n - 1 {
		name := fmt.Sprintf("n%d", i)
		addrs[name] = serve(t, name, ca.node(t, name), ca.pool)
	}
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close() // refused from now on
	addrs["n0"] = deadAddr

	var probes atomic.Int32 // observe is called from each probe's goroutine
	p := &prober{cert: ca.node(t, "self"), ca: ca.pool, timeout: time.Second, fanout: 3, threshold: 2,
		observe: func(bool) { probes.Add(1) }}
	p.setPeers(addrs)
	if got := p.rounds(); got != 2 {
		t.Fatalf("rounds for 6 peers, fanout 3: %d, want 2", got)
	}
	start := time.Now()
	for range p.rounds() {
		p.round(t.Context())
	}
	if got := probes.Load(); got != 6 {
		t.Errorf("%d probes in 2 rounds of fanout 3, want 6", got)
	}
	reachable, unreachable, all := p.seen(start)
	if all != 6 || len(reachable) != 5 || len(unreachable) != 0 {
		t.Errorf("after one turn: reachable %v, unreachable %v of %d; want 5 reachable, n0 not yet unreachable (threshold 2)", reachable, unreachable, all)
	}
	for range p.rounds() {
		p.round(t.Context())
	}
	if _, unreachable, _ := p.seen(start); !slices.Equal(unreachable, []string{"n0"}) {
		t.Errorf("after two turns: unreachable %v, want [n0]", unreachable)
	}
	// Only what was probed since counts.
	if r, u, _ := p.seen(time.Now().Add(time.Minute)); len(r)+len(u) != 0 {
		t.Errorf("seen in the future: %v %v", r, u)
	}
	// n0 comes back at a new address: a fresh start, reached at once.
	addrs["n0"] = serve(t, "n0", ca.node(t, "n0"), ca.pool)
	p.setPeers(addrs)
	for range p.rounds() {
		p.round(t.Context())
	}
	if _, unreachable, _ := p.seen(start); len(unreachable) != 0 {
		t.Errorf("after n0 returned: unreachable %v", unreachable)
	}
}

func TestProbeStopsWithContext(t *testing.T) {
	ca := newAuthority(t)
	p := &prober{cert: ca.node(t, "a"), ca: ca.pool, timeout: time.Second, fanout: 1, threshold: 1}
	p.setPeers(map[string]string{"b": "127.0.0.1:1"})
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	p.round(ctx)
	if _, u, _ := p.seen(time.Time{}); len(u) != 0 {
		t.Errorf("a probe cut short by shutdown counted as a failure: %v", u)
	}
}

// NodeRestriction's rule for the labels a node may set on itself.
func TestNodeMaySetLabel(t *testing.T) {
	for key, want := range map[string]bool{
		"topology.kubernetes.io/zone":              true,
		"failure-domain.beta.kubernetes.io/zone":   true,
		"example.com/site":                         true,
		"site":                                     true,
		"node.kubernetes.io/site":                  true,
		"x.kubelet.kubernetes.io/site":             true,
		"node-restriction.kubernetes.io/site":      false,
		"kubernetes.io/site":                       false,
		"topology.kubernetes.io/site":              false,
		"example.k8s.io/site":                      false,
		"node-role.kubernetes.io/edge":             false,
		"node-restriction.kubernetes.io.example/x": true,
	} {
		if got := NodeMaySetLabel(key); got != want {
			t.Errorf("NodeMaySetLabel(%q) = %v, want %v", key, got, want)
		}
	}
}
