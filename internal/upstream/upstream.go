// Package upstream is outpost's way to the cloud apiservers: it picks a
// server (round-robin or priority among the healthy ones), sends each
// request with the credentials its caller is entitled to, retries a failed
// read once elsewhere, and reports failed connections as health evidence.
// It knows nothing of caching.
package upstream

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"k8s.io/client-go/util/connrotation"

	"github.com/outposthq/outpost/internal/config"
	"github.com/outposthq/outpost/internal/request"
)

// Health is what the pool needs to know of server health.
type Health interface {
	Healthy(i int) bool
	// ReportFailure: a request to server i could not connect or timed out.
	ReportFailure(i int, err error)
	// ReportAnswer: a request to server i got an answer.
	ReportAnswer(i int)
}

// Credentials are the node's own credentials toward the apiservers.
type Credentials struct {
	// TLS verifies the apiservers and, when it has a certificate, presents
	// the node's client certificate.
	TLS *tls.Config
	// Token, if set, is the node's bearer token.
	Token string
}

// Server is one apiserver with its transports.
type Server struct {
	URL *url.URL
	// node carries the node's credentials; caller carries only the CA, for
	// requests that travel with the caller's own bearer token. They must
	// never mix: kube-apiserver tries the client certificate before the
	// token, so a token request on the node's TLS session would run as the
	// node.
	node, caller http.RoundTripper
	// nodeH1 and callerH1 are the same over HTTP/1.1 only, for upgrades
	// (exec, attach, port-forward): HTTP/2 cannot carry a SPDY upgrade,
	// and Go's transport picks HTTP/1.1 by itself only for WebSocket.
	nodeH1, callerH1 http.RoundTripper
	tracker          *connrotation.ConnectionTracker
	// handshake verifies the server, presenting no client certificate.
	handshake *tls.Config
	ping      pinger
}

// Pool sends requests to a list of apiservers. It implements
// http.RoundTripper for outpost's reverse proxy.
type Pool struct {
	servers []*Server
	mode    string
	health  Health
	next    atomic.Uint64
}

// New builds a pool for servers. health may be nil until SetHealth is called.
func New(servers []*url.URL, creds Credentials, mode string) (*Pool, error) {
	if len(servers) == 0 {
		return nil, errors.New("no apiserver to proxy to")
	}
	p := &Pool{mode: mode}
	for _, u := range servers {
		tracker := connrotation.NewConnectionTracker()
		nodeTLS := creds.TLS.Clone()
		callerTLS := creds.TLS.Clone()
		callerTLS.Certificates, callerTLS.GetClientCertificate = nil, nil
		s := &Server{URL: u, tracker: tracker, handshake: callerTLS,
			node: newTransport(nodeTLS, tracker, true), nodeH1: newTransport(nodeTLS, tracker, false),
			caller: newTransport(callerTLS, tracker, true), callerH1: newTransport(callerTLS, tracker, false)}
		if creds.Token != "" {
			s.node = bearerRoundTripper{token: creds.Token, next: s.node}
			s.nodeH1 = bearerRoundTripper{token: creds.Token, next: s.nodeH1}
		}
		p.servers = append(p.servers, s)
	}
	return p, nil
}

// newTransport makes a transport whose connections tracker can close; h2
// says whether it speaks HTTP/2 (else HTTP/1.1 only).
func newTransport(tlsConfig *tls.Config, tracker *connrotation.ConnectionTracker, h2 bool) *http.Transport {
	if !h2 {
		tlsConfig = tlsConfig.Clone()
		tlsConfig.NextProtos = []string{"http/1.1"}
	}
	dialer := connrotation.NewDialerWithTracker((&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext, tracker)
	return &http.Transport{
		Proxy:                 nil, // the link to the apiserver is ours; no environment proxy
		DialContext:           dialer.DialContext,
		TLSClientConfig:       tlsConfig,
		TLSHandshakeTimeout:   5 * time.Second,
		ForceAttemptHTTP2:     h2,
		MaxIdleConnsPerHost:   100,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
		// Pass the client's Accept-Encoding through untouched; do not add
		// gzip and decompress on the client's behalf.
		DisableCompression: true,
		HTTP2: &http.HTTP2Config{
			// Find a dead HTTP/2 connection even when no probe runs on it.
			SendPingTimeout: 15 * time.Second,
			PingTimeout:     5 * time.Second,
			// What an answer may hold here ahead of its client: many
			// clients listing at once otherwise hold 4 MiB each (the
			// default), more than a small node's whole budget. 1 MiB still
			// lets one answer stream at 10 MB/s over a 100 ms link.
			MaxReceiveBufferPerStream: 1 << 20,
		},
	}
}

type bearerRoundTripper struct {
	token string
	next  http.RoundTripper
}

func (b bearerRoundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	out := *req
	out.Header = req.Header.Clone()
	if out.Header == nil {
		out.Header = http.Header{}
	}
	out.Header.Set("Authorization", "Bearer "+b.token)
	return b.next.RoundTrip(&out)
}

// SetHealth sets where the pool reads and reports health.
func (p *Pool) SetHealth(h Health) { p.health = h }

// Len is the number of apiservers.
func (p *Pool) Len() int { return len(p.servers) }

// Name is apiserver i's URL, for logs and metric labels.
func (p *Pool) Name(i int) string { return p.servers[i].URL.String() }

// CloseConnections closes every connection to apiserver i, so that the
// watches open on it end and their clients re-establish them elsewhere.
func (p *Pool) CloseConnections(i int) { p.servers[i].tracker.CloseAll() }

// Handshake opens a new connection to apiserver i, completes a TLS
// handshake and closes it: proof that the link and the server process
// work, at a cost (no request, no client certificate) that a saturated
// apiserver still pays at once, unlike /readyz, which checks etcd.
func (p *Pool) Handshake(ctx context.Context, i int) error {
	s := p.servers[i]
	d := tls.Dialer{NetDialer: &net.Dialer{}, Config: s.handshake}
	conn, err := d.DialContext(ctx, "tcp", s.hostPort())
	if err != nil {
		return err
	}
	return conn.Close()
}

// Probe checks apiserver i's /readyz with the node's credentials.
func (p *Pool) Probe(ctx context.Context, i int) error {
	s := p.servers[i]
	u := *s.URL
	u.Path = joinPath(s.URL.Path, "/readyz")
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	resp, err := s.node.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("readyz answered %s", resp.Status)
	}
	return nil
}

// RoundTrip sends req to a healthy apiserver with the credentials of the
// caller described by the request.Info in its context. A read that fails
// before any response is retried once on another apiserver.
func (p *Pool) RoundTrip(req *http.Request) (*http.Response, error) {
	info := request.From(req.Context())
	if info == nil || info.Identity.Kind == request.Anonymous {
		// Defence in depth: the proxy authenticates first.
		return nil, errors.New("upstream: refusing to send a request without an authenticated caller")
	}
	first := p.pick(-1)
	resp, err := p.send(first, req, info)
	if err == nil {
		p.answered(first)
		return p.streaming(first, resp), nil
	}
	if req.Context().Err() != nil {
		return resp, err
	}
	if connectionFailure(err) {
		p.report(first, err)
	}
	if !retryable(req, info) {
		return nil, err
	}
	second := p.pick(first)
	if second == first {
		return nil, err
	}
	resp, err2 := p.send(second, req, info)
	switch {
	case err2 == nil:
		p.answered(second)
		resp = p.streaming(second, resp)
	case connectionFailure(err2) && req.Context().Err() == nil:
		p.report(second, err2)
	}
	return resp, err2
}

// streaming makes every chunk of resp's body that arrives count as an
// answer from server i, as its headers did: a saturated apiserver may send
// no new response for longer than a probe timeout while it streams lists
// and watch events, and a probe that timed out meanwhile must be excused
// as one during a stream of new responses is. An upgraded connection's
// body (101) is left as it is: the proxy needs it whole.
func (p *Pool) streaming(i int, resp *http.Response) *http.Response {
	if p.health == nil || resp.StatusCode == http.StatusSwitchingProtocols || resp.Body == nil || resp.Body == http.NoBody {
		return resp
	}
	resp.Body = &progressBody{ReadCloser: resp.Body, p: p, i: i, last: time.Now().UnixNano()}
	return resp
}

// progressBody reports the arrival of body bytes to the pool's health, at
// most once per answerEvery; one goroutine reads it.
type progressBody struct {
	io.ReadCloser
	p    *Pool
	i    int
	last int64 // when it last reported, in Unix nanoseconds
}

// answerEvery bounds how often one body reports progress: often enough for
// any probe timeout, rarely enough to cost nothing.
const answerEvery = 10 * time.Millisecond

func (b *progressBody) Read(buf []byte) (int, error) {
	n, err := b.ReadCloser.Read(buf)
	if n > 0 {
		if now := time.Now().UnixNano(); now-b.last >= int64(answerEvery) {
			b.last = now
			b.p.answered(b.i)
		}
	}
	return n, err
}

func (p *Pool) report(i int, err error) {
	if p.health != nil {
		p.health.ReportFailure(i, err)
	}
}

func (p *Pool) answered(i int) {
	if p.health != nil {
		p.health.ReportAnswer(i)
	}
}

func (p *Pool) send(i int, req *http.Request, info *request.Info) (*http.Response, error) {
	s := p.servers[i]
	// A shallow copy with its own URL: only the URL changes here, and the
	// headers only when the caller sent an Authorization of its own to
	// drop. A deep copy (Request.Clone) of every proxied request cost more
	// than the rest of this function.
	out := new(http.Request)
	*out = *req
	u := *req.URL
	out.URL = &u
	out.URL.Scheme = s.URL.Scheme
	out.URL.Host = s.URL.Host
	out.Host = s.URL.Host
	if s.URL.Path != "" && s.URL.Path != "/" {
		out.URL.Path = joinPath(s.URL.Path, req.URL.Path)
		out.URL.RawPath = ""
	}
	if info.Identity.Kind == request.NodeCert {
		// The caller proved it is this node; it travels as the node, with
		// nothing of its own that could change who it is upstream.
		if _, ok := out.Header["Authorization"]; ok {
			out.Header = out.Header.Clone()
			delete(out.Header, "Authorization")
		}
		if info.Upgrade {
			return s.nodeH1.RoundTrip(out)
		}
		return s.node.RoundTrip(out)
	}
	if info.Upgrade {
		return s.callerH1.RoundTrip(out)
	}
	return s.caller.RoundTrip(out)
}

// pick chooses a healthy server other than avoid (-1: none to avoid). When
// none is healthy it still picks one, in turn, so that every server keeps
// being tried.
func (p *Pool) pick(avoid int) int {
	n := len(p.servers)
	if n == 1 {
		return 0
	}
	start := 0
	if p.mode != config.LBPriority {
		start = int(p.next.Add(1) % uint64(n))
	}
	for k := 0; k < n; k++ {
		i := (start + k) % n
		if i != avoid && (p.health == nil || p.health.Healthy(i)) {
			return i
		}
	}
	// None healthy: keep trying every server in turn, whatever the mode,
	// so that whichever comes back first is found by real requests too.
	if avoid >= 0 {
		return (avoid + 1) % n
	}
	return int(p.next.Add(1) % uint64(n))
}

func retryable(req *http.Request, info *request.Info) bool {
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		return false
	}
	return !info.Upgrade && (req.Body == nil || req.Body == http.NoBody)
}

// connectionFailure reports whether err says the server could not be
// reached or did not answer: a failed dial, a TLS failure or a timeout, as
// opposed to the caller giving up. A connection that ended (EOF, reset)
// proves nothing alone: a server closes idle connections, and a request on
// one that was just closed fails so; the next dial, or the next probe,
// tells whether the server is gone.
func connectionFailure(err error) bool {
	if errors.Is(err, context.Canceled) {
		return false
	}
	var netErr net.Error
	var opErr *net.OpError
	return (errors.As(err, &opErr) && opErr.Op == "dial") || (errors.As(err, &netErr) && netErr.Timeout()) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, os.ErrDeadlineExceeded) ||
		isTLSError(err)
}

func isTLSError(err error) bool {
	var recordErr tls.RecordHeaderError
	var certErr *tls.CertificateVerificationError
	return errors.As(err, &recordErr) || errors.As(err, &certErr)
}

func joinPath(base, p string) string {
	if base == "" || base == "/" {
		return p
	}
	if base[len(base)-1] == '/' {
		base = base[:len(base)-1]
	}
	return base + p
}

// As returns the one way outpost sends requests of its own upstream (CSRs,
// re-lists, replayed statuses and events, token reviews): through the
// pool, as the caller id. A node identity travels with the node's
// credentials; a bearer-token identity with its token (id.Token) as the
// Authorization header, on the transport that has no client certificate.
// The verb is only informative: the pool retries reads by method.
func (p *Pool) As(id request.Identity) http.RoundTripper {
	return callerTransport{p: p, id: id}
}

type callerTransport struct {
	p  *Pool
	id request.Identity
}

func (t callerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	verb := strings.ToLower(r.Method)
	if r.Method == http.MethodGet {
		verb = "get"
	}
	if t.id.Kind == request.BearerToken {
		r = r.Clone(r.Context())
		r.Header.Set("Authorization", "Bearer "+t.id.Token)
	}
	info := &request.Info{Identity: t.id, Verb: verb}
	return t.p.RoundTrip(r.WithContext(request.WithInfo(r.Context(), info)))
}

// hostPort is the server's address to dial: its URL's host, with port 443
// when the URL names none.
func (s *Server) hostPort() string {
	if s.URL.Port() == "" {
		return net.JoinHostPort(s.URL.Hostname(), "443")
	}
	return s.URL.Host
}
