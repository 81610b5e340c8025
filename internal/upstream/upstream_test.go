package upstream

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/outposthq/outpost/internal/config"
	"github.com/outposthq/outpost/internal/request"
)

// echo answers with who the caller was: the client certificate's CN (or
// "-") and the Authorization header.
func echo(w http.ResponseWriter, r *http.Request) {
	cn := "-"
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		cn = r.TLS.PeerCertificates[0].Subject.CommonName
	}
	_, _ = io.WriteString(w, cn+"|"+r.Header.Get("Authorization")+"|"+r.Proto)
}

func newServer(t *testing.T, h http.Handler) *httptest.Server {
	s := httptest.NewUnstartedServer(h)
	s.EnableHTTP2 = true
	s.TLS = &tls.Config{ClientAuth: tls.RequestClientCert}
	s.StartTLS()
	t.Cleanup(s.Close)
	return s
}

func clientCert(t *testing.T, cn string) tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func newPool(t *testing.T, servers ...*httptest.Server) *Pool {
	roots := x509.NewCertPool()
	var urls []*url.URL
	for _, s := range servers {
		roots.AddCert(s.Certificate())
		u, _ := url.Parse(s.URL)
		urls = append(urls, u)
	}
	creds := Credentials{TLS: &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{clientCert(t, "system:node:edge-1")}}}
	p, err := New(urls, creds, config.LBPriority)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func get(t *testing.T, p *Pool, kind request.CredentialKind, method, auth string) (string, error) {
	t.Helper()
	var body io.Reader
	if method != http.MethodGet {
		body = strings.NewReader("{}")
	}
	req, _ := http.NewRequest(method, "https://placeholder/api/v1/pods", body)
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	info := &request.Info{Identity: request.Identity{Kind: kind}, Verb: "get"}
	resp, err := p.RoundTrip(req.WithContext(request.WithInfo(context.Background(), info)))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b), nil
}

func TestCredentialsNeverMix(t *testing.T) {
	p := newPool(t, newServer(t, http.HandlerFunc(echo)))
	got, err := get(t, p, request.NodeCert, http.MethodGet, "Bearer sneaky")
	if err != nil {
		t.Fatal(err)
	}
	if got != "system:node:edge-1||HTTP/2.0" {
		t.Errorf("node caller: upstream saw %q, want the node certificate, no token, over HTTP/2", got)
	}
	got, err = get(t, p, request.BearerToken, http.MethodGet, "Bearer abc")
	if err != nil {
		t.Fatal(err)
	}
	if got != "-|Bearer abc|HTTP/2.0" {
		t.Errorf("token caller: upstream saw %q, want no certificate and the caller's token", got)
	}
	if _, err := get(t, p, request.Anonymous, http.MethodGet, ""); err == nil {
		t.Error("an anonymous caller must never be sent upstream")
	}
}

type fakeHealth struct {
	mu       sync.Mutex
	down     map[int]bool
	reported []int
	answered []int
}

func (f *fakeHealth) ReportAnswer(i int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.answered = append(f.answered, i)
}

func (f *fakeHealth) Healthy(i int) bool { f.mu.Lock(); defer f.mu.Unlock(); return !f.down[i] }
func (f *fakeHealth) ReportFailure(i int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down[i] = true
	f.reported = append(f.reported, i)
}

func TestReadRetriedOnAnotherServer(t *testing.T) {
	dead := newServer(t, http.HandlerFunc(echo))
	live := newServer(t, http.HandlerFunc(echo))
	p := newPool(t, dead, live)
	h := &fakeHealth{down: map[int]bool{}}
	p.SetHealth(h)
	dead.Close()

	got, err := get(t, p, request.NodeCert, http.MethodGet, "")
	if err != nil || !strings.HasPrefix(got, "system:node:edge-1") {
		t.Fatalf("read through a dead first server: %q, %v; want it retried on the live one", got, err)
	}
	if len(h.reported) != 1 || h.reported[0] != 0 {
		t.Fatalf("reported failures = %v, want [0]", h.reported)
	}
	if len(h.answered) != 1 || h.answered[0] != 1 {
		t.Fatalf("reported answers = %v, want [1]: only the live server answered", h.answered)
	}

	// A write is not retried: it may have reached the server.
	h.down = map[int]bool{}
	if _, err := get(t, p, request.NodeCert, http.MethodPost, ""); err == nil {
		t.Fatal("a write to a dead server must fail, not be retried elsewhere")
	}
}

func TestPriorityAndRoundRobin(t *testing.T) {
	a := newServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "a") }))
	b := newServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "b") }))
	p := newPool(t, a, b)
	h := &fakeHealth{down: map[int]bool{}}
	p.SetHealth(h)
	for range 4 {
		if got, _ := get(t, p, request.NodeCert, http.MethodGet, ""); got != "a" {
			t.Fatalf("priority mode answered by %q, want a", got)
		}
	}
	h.down[0] = true
	if got, _ := get(t, p, request.NodeCert, http.MethodGet, ""); got != "b" {
		t.Fatalf("with a down, answered by %q, want b", got)
	}
	h.down[0] = false
	p.mode = config.LBRoundRobin
	seen := map[string]int{}
	for range 6 {
		got, _ := get(t, p, request.NodeCert, http.MethodGet, "")
		seen[got]++
	}
	if seen["a"] != 3 || seen["b"] != 3 {
		t.Fatalf("round-robin spread = %v, want 3 and 3", seen)
	}
}

// TestAllDownTriesEveryServer: with every server judged unhealthy, the
// first choice goes round all of them, in priority mode too, so that
// whichever server comes back first gets real requests.
func TestAllDownTriesEveryServer(t *testing.T) {
	var servers []*httptest.Server
	for range 3 {
		servers = append(servers, newServer(t, http.HandlerFunc(echo)))
	}
	p := newPool(t, servers...)
	p.SetHealth(&fakeHealth{down: map[int]bool{0: true, 1: true, 2: true}})
	first := map[int]int{}
	for range 6 {
		first[p.pick(-1)]++
	}
	if len(first) != 3 {
		t.Fatalf("first choices with every server down: %v; want all three", first)
	}
}

func TestCloseConnectionsEndsStreams(t *testing.T) {
	started := make(chan struct{})
	s := newServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		close(started)
		<-r.Context().Done()
	}))
	p := newPool(t, s)
	req, _ := http.NewRequest(http.MethodGet, "https://placeholder/api/v1/pods?watch=1", nil)
	info := &request.Info{Identity: request.Identity{Kind: request.NodeCert}, Verb: "watch"}
	resp, err := p.RoundTrip(req.WithContext(request.WithInfo(context.Background(), info)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	<-started
	done := make(chan error, 1)
	go func() { _, err := io.ReadAll(resp.Body); done <- err }()
	p.CloseConnections(0)
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("stream ended cleanly; want a connection error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("stream still open 5s after CloseConnections")
	}
}

// TestStreamedBodyCountsAsAnswers: the chunks of a body that streams for a
// second (a long list, a watch's events) count as answers from its server
// as they arrive, not only its headers, so that a probe timing out while
// the server streams is excused.
func TestStreamedBodyCountsAsAnswers(t *testing.T) {
	s := newServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for range 10 {
			_, _ = io.WriteString(w, "chunk\n")
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond)
		}
	}))
	p := newPool(t, s)
	h := &fakeHealth{down: map[int]bool{}}
	p.SetHealth(h)
	req, _ := http.NewRequest(http.MethodGet, "https://placeholder/api/v1/pods?watch=true", nil)
	info := &request.Info{Identity: request.Identity{Kind: request.NodeCert}, Verb: "watch"}
	resp, err := p.RoundTrip(req.WithContext(request.WithInfo(context.Background(), info)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	count := func() int { h.mu.Lock(); defer h.mu.Unlock(); return len(h.answered) }
	if n := count(); n != 1 {
		t.Fatalf("%d answers reported once the headers arrived, want 1", n)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || strings.Count(string(body), "chunk") != 10 {
		t.Fatalf("body %q, %v", body, err)
	}
	// The first chunk may come with the headers; the nine later ones
	// arrive 100 ms apart, each reported.
	if n := count(); n < 10 {
		t.Fatalf("%d answers reported for a body that streamed 10 chunks over a second, want 10 or more", n)
	}
}

// TestConnectionFailure: what counts as passive evidence of a lost server.
func TestConnectionFailure(t *testing.T) {
	for _, c := range []struct {
		name string
		err  error
		want bool
	}{
		{"dial refused", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, true},
		{"dial timeout", &net.OpError{Op: "dial", Net: "tcp", Err: os.ErrDeadlineExceeded}, true},
		{"response timeout", fmt.Errorf("awaiting headers: %w", os.ErrDeadlineExceeded), true},
		{"TLS", &tls.CertificateVerificationError{Err: errors.New("unknown authority")}, true},
		{"closed idle connection", io.EOF, false},
		{"cut body", io.ErrUnexpectedEOF, false},
		{"reset on read", &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}, false},
		{"caller gone", context.Canceled, false},
	} {
		if got := connectionFailure(c.err); got != c.want {
			t.Errorf("%s (%v): %v, want %v", c.name, c.err, got, c.want)
		}
	}
}

// TestHandshake: a TLS handshake with a live server succeeds; with one
// that is gone it fails.
func TestHandshake(t *testing.T) {
	live := newServer(t, http.HandlerFunc(echo))
	gone := newServer(t, http.HandlerFunc(echo))
	p := newPool(t, live, gone)
	gone.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.Handshake(ctx, 0); err != nil {
		t.Errorf("handshake with a live server: %v", err)
	}
	if err := p.Handshake(ctx, 1); err == nil {
		t.Error("handshake with a server that is gone succeeded")
	}
}

// TestPing: the first ping of a server, with no connection of its own
// yet, asks /readyz and opens one in the background; later pings reach no
// handler and share that connection, which is replaced once old; one the
// server closed costs one /readyz and a new connection; a server that is
// gone, or accepts connections but never answers, fails the ping within
// its time; a server that speaks only HTTP/1.1 is asked /readyz every time.
func TestPing(t *testing.T) {
	var requests, conns atomic.Int64
	h2 := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { requests.Add(1) }))
	h2.EnableHTTP2 = true
	h2.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	h2.StartTLS()
	defer h2.Close()
	var readyz atomic.Int64
	h1 := newServerH1(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/readyz" {
			readyz.Add(1)
		}
	}))
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	go func() { // accepts, then says nothing
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	silentURL, _ := url.Parse("https://" + silent.Addr().String())
	p := newPool(t, h2, h1)
	defer p.ClosePings()
	p.servers = append(p.servers, &Server{URL: silentURL, handshake: p.servers[0].handshake, node: p.servers[0].node})
	ping := func(i int, within time.Duration) error {
		ctx, cancel := context.WithTimeout(t.Context(), within)
		defer cancel()
		return p.Ping(ctx, i)
	}
	ready := func(i int) bool { // a connection, and none being opened
		pg := &p.servers[i].ping
		pg.mu.Lock()
		defer pg.mu.Unlock()
		return pg.conn != nil && !pg.dialing
	}
	waitReady := func(i int) {
		t.Helper()
		for end := time.Now().Add(5 * time.Second); !ready(i); time.Sleep(time.Millisecond) {
			if time.Now().After(end) {
				t.Fatal("no ping connection opened")
			}
		}
	}

	if err := ping(0, 5*time.Second); err != nil || requests.Load() != 1 {
		t.Fatalf("the first ping: %v, %d requests; want /readyz asked", err, requests.Load())
	}
	waitReady(0)
	before := conns.Load()
	for n := range 20 {
		if err := ping(0, 5*time.Second); err != nil {
			t.Fatalf("ping %d: %v", n, err)
		}
	}
	if requests.Load() != 1 || conns.Load() != before {
		t.Errorf("20 pings: %d more requests reached the handler, over %d new connections; want none", requests.Load()-1, conns.Load()-before)
	}
	// Old: replaced beside it, while pings go on.
	pingConnMaxAge = 0
	if err := ping(0, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	pingConnMaxAge = 60 * time.Second
	for end := time.Now().Add(5 * time.Second); conns.Load() == before; time.Sleep(time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("an old ping connection was not replaced")
		}
	}
	waitReady(0)
	if requests.Load() != 1 {
		t.Errorf("%d requests while the connection was replaced; want none", requests.Load()-1)
	}
	h2.CloseClientConnections()
	time.Sleep(50 * time.Millisecond)
	if err := ping(0, 5*time.Second); err != nil {
		t.Errorf("ping after the server closed the connection: %v", err)
	}
	waitReady(0)

	for range 2 {
		if err := ping(1, 5*time.Second); err != nil {
			t.Errorf("an HTTP/1.1 server: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if readyz.Load() != 2 {
		t.Errorf("an HTTP/1.1 server: %d /readyz for 2 pings; want it asked each time", readyz.Load())
	}
	start := time.Now()
	if err := ping(2, 300*time.Millisecond); err == nil {
		t.Error("a server that never answers was pinged")
	} else if took := time.Since(start); took > 2*time.Second {
		t.Errorf("a ping of a server that never answers took %v with 300ms given", took)
	}
	h2.Close()
	if err := ping(0, 5*time.Second); err == nil {
		t.Error("a server that is gone was pinged")
	}
}

func newServerH1(t *testing.T, h http.Handler) *httptest.Server {
	s := httptest.NewUnstartedServer(h)
	s.StartTLS()
	t.Cleanup(s.Close)
	return s
}

// TestPingDialBacksOff: a server whose ping connection cannot be opened
// (here: every connection closed at once) is probed with /readyz, and the
// ping connection is not tried again at every probe.
func TestPingDialBacksOff(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	live := newServer(t, http.HandlerFunc(echo))
	p := newPool(t, live)
	defer p.ClosePings()
	u, _ := url.Parse("https://" + ln.Addr().String())
	p.servers[0].URL = u
	for range 10 {
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		if err := p.Ping(ctx, 0); err == nil {
			t.Error("a server that closes every connection was pinged")
		}
		cancel()
		time.Sleep(20 * time.Millisecond)
	}
	pg := &p.servers[0].ping
	pg.mu.Lock()
	failed := pg.failed
	pg.mu.Unlock()
	// Each probe asks /readyz (a connection or two); the ping connection
	// was tried once.
	if failed != 1 || accepted.Load() > 25 {
		t.Errorf("10 probes: %d failed dials of the ping connection, %d connections; want 1 dial", failed, accepted.Load())
	}
}
