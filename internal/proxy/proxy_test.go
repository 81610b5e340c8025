package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/outposthq/outpost/internal/config"
	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/upstream"
)

// newHandler puts a proxy in front of an upstream test server; every caller
// counts as the node.
func newHandler(t *testing.T, up *httptest.Server, opts ...func(*Handler)) *httptest.Server {
	t.Helper()
	u, _ := url.Parse(up.URL)
	pool, err := upstream.New([]*url.URL{u}, upstream.Credentials{TLS: &tls.Config{InsecureSkipVerify: true}}, config.LBRoundRobin)
	if err != nil {
		t.Fatal(err)
	}
	h := &Handler{
		Authenticate: func(*http.Request) (request.Identity, error) {
			return request.Identity{Kind: request.NodeCert, User: "system:node:n"}, nil
		},
		Upstream: pool,
		Log:      slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	for _, o := range opts {
		o(h)
	}
	h.Init()
	s := httptest.NewServer(h)
	t.Cleanup(s.Close)
	return s
}

// TestWatchEventsFlushedAtOnce: each event reaches the client while the
// upstream response is still open.
func TestWatchEventsFlushedAtOnce(t *testing.T) {
	release := make(chan struct{})
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"type":"ADDED","object":{}}`+"\n")
		w.(http.Flusher).Flush()
		<-release
	}))
	defer up.Close()
	defer close(release)
	p := newHandler(t, up)

	resp, err := http.Get(p.URL + "/api/v1/pods?watch=true")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(resp.Body).ReadString('\n')
		got <- line
	}()
	select {
	case line := <-got:
		if !strings.Contains(line, "ADDED") {
			t.Fatalf("first line %q", line)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("watch event not delivered while the stream is open")
	}
}

// TestUpgradeStreams: SPDY and WebSocket upgrades (exec, attach,
// port-forward) are passed through as bidirectional byte streams, to an
// apiserver that also speaks HTTP/2, as kube-apiserver does (HTTP/2 cannot
// carry an upgrade: outpost must ask for HTTP/1.1).
func TestUpgradeStreams(t *testing.T) {
	for _, proto := range []string{"SPDY/3.1", "websocket"} {
		t.Run(proto, func(t *testing.T) {
			up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Header.Get("Upgrade") != proto || r.Header.Get("X-Stream-Protocol-Version") != "v5.channel.k8s.io" {
					http.Error(w, "bad upgrade request: "+r.Header.Get("Upgrade"), http.StatusBadRequest)
					return
				}
				conn, brw, err := http.NewResponseController(w).Hijack()
				if err != nil {
					t.Error(err)
					return
				}
				defer conn.Close()
				_, _ = io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "+proto+"\r\n\r\n")
				// Echo in upper case until the client closes.
				buf := make([]byte, 64)
				for {
					n, err := brw.Read(buf)
					if err != nil {
						return
					}
					_, _ = conn.Write([]byte(strings.ToUpper(string(buf[:n]))))
				}
			}))
			up.EnableHTTP2 = true
			up.StartTLS()
			defer up.Close()
			p := newHandler(t, up)

			conn, err := net.Dial("tcp", strings.TrimPrefix(p.URL, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			_, _ = io.WriteString(conn, "POST /api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true HTTP/1.1\r\nHost: x\r\n"+
				"Connection: Upgrade\r\nUpgrade: "+proto+"\r\nX-Stream-Protocol-Version: v5.channel.k8s.io\r\nContent-Length: 0\r\n\r\n")
			br := bufio.NewReader(conn)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != http.StatusSwitchingProtocols {
				b, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %s: %s", resp.Status, b)
			}
			for _, msg := range []string{"hello", "second frame"} {
				_, _ = io.WriteString(conn, msg)
				buf := make([]byte, len(msg))
				if _, err := io.ReadFull(br, buf); err != nil {
					t.Fatal(err)
				}
				if string(buf) != strings.ToUpper(msg) {
					t.Fatalf("echo %q, want %q", buf, strings.ToUpper(msg))
				}
			}
		})
	}
}

// TestNoUpstreamIsAStatus: with the apiserver gone, the client gets a 503
// Kubernetes Status, not a bare proxy error.
func TestNoUpstreamIsAStatus(t *testing.T) {
	up := httptest.NewTLSServer(http.NotFoundHandler())
	p := newHandler(t, up)
	up.Close()
	resp, err := http.Get(p.URL + "/api/v1/pods")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(b), `"kind":"Status"`) || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("%s %s %v", resp.Status, b, resp.Header)
	}
}

// TestStreamedBodiesArriveWhole: answers without a Content-Length (lists,
// which kube-apiserver streams) and with one arrive byte for byte, however
// the apiserver cuts and flushes them.
func TestStreamedBodiesArriveWhole(t *testing.T) {
	body := make([]byte, 300<<10)
	for i := range body {
		body[i] = byte('a' + i%26)
	}
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Query().Get("length") != "" {
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		}
		for rest := body; len(rest) > 0; {
			n := min(len(rest), 1+len(rest)%7000)
			_, _ = w.Write(rest[:n])
			w.(http.Flusher).Flush()
			rest = rest[n:]
		}
	}))
	defer up.Close()
	p := newHandler(t, up)
	for _, q := range []string{"", "?length=1"} {
		resp, err := http.Get(p.URL + "/api/v1/pods" + q)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(got, body) {
			t.Fatalf("%s: %s, %d of %d bytes, %v", q, resp.Status, len(got), len(body), err)
		}
	}
}

// TestCutAnswersCounted: a request whose answer breaks off midway (the
// apiserver's connection broke: 502) or whose client went away first (499)
// is counted, with the code saying so, not lost from the metrics nor
// counted as a 200.
func TestCutAnswersCounted(t *testing.T) {
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("slow") != "" {
			<-r.Context().Done()
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(bytes.Repeat([]byte("x"), 100<<10))
		w.(http.Flusher).Flush()
		// The connection breaks before the body ends.
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			_ = conn.Close()
		}
	}))
	defer up.Close()
	m := metrics.New(prometheus.NewRegistry())
	p := newHandler(t, up, func(h *Handler) { h.Metrics = m })
	count := func(code string) float64 {
		var d dto.Metric
		if err := m.Requests.WithLabelValues("list", "pods", code, servedByUpstream).Write(&d); err != nil {
			t.Fatal(err)
		}
		return d.GetCounter().GetValue()
	}

	resp, err := http.Get(p.URL + "/api/v1/pods")
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err == nil {
		t.Fatal("an answer cut off upstream reached the client whole")
	}
	waitCount(t, func() bool { return count("502") == 1 }, "the cut answer counted as 502")

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.URL+"/api/v1/pods?slow=1", nil)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatal("a request the client gave up on was answered")
	}
	waitCount(t, func() bool { return count("499") == 1 }, "the abandoned request counted as 499")
	if n := count("200"); n != 0 {
		t.Fatalf("%v requests counted as 200", n)
	}
}

// waitCount waits for cond: the handler counts after the client saw the end.
func waitCount(t *testing.T, cond func() bool, what string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("not seen: %s", what)
		}
	}
}

// answerAll is a cache that would answer anything offline.
type answerAll struct{ served atomic.Int32 }

func (a *answerAll) Answers(*http.Request, *request.Info) bool { return true }
func (a *answerAll) Serve(w http.ResponseWriter, _ *http.Request, _ *request.Info) {
	a.served.Add(1)
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte(`{"kind":"ConfigMapList","apiVersion":"v1","items":[]}`))
}

// TestImpersonatedRequestsOnlyUpstream: a request with Impersonate-*
// headers is answered by the apiserver as another user, whom outpost does
// not know: it was recorded as its caller's own answer, and offline
// answered from the caller's own views, without the narrowing it asked for.
func TestImpersonatedRequestsOnlyUpstream(t *testing.T) {
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"kind":"ConfigMapList","apiVersion":"v1","items":[]}`))
	}))
	defer up.Close()
	var online atomic.Bool
	var recorded atomic.Int32
	online.Store(true)
	cache := &answerAll{}
	p := newHandler(t, up, func(h *Handler) {
		h.Record = func(*http.Response, *request.Info) { recorded.Add(1) }
		h.Cache = cache
		h.Online = online.Load
	})
	get := func(impersonate bool) *http.Response {
		r, _ := http.NewRequest("GET", p.URL+"/api/v1/configmaps", nil)
		if impersonate {
			r.Header.Set("Impersonate-User", "system:serviceaccount:tenant:restricted")
		}
		resp, err := http.DefaultClient.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	if resp := get(true); resp.StatusCode != 200 || recorded.Load() != 0 {
		t.Errorf("online, impersonated: %s, recorded %d times", resp.Status, recorded.Load())
	}
	if get(false); recorded.Load() != 1 {
		t.Errorf("online, the caller itself: recorded %d times, want 1", recorded.Load())
	}
	online.Store(false)
	if resp := get(true); resp.StatusCode != http.StatusServiceUnavailable || cache.served.Load() != 0 {
		t.Errorf("offline, impersonated: %s, answered from the cache %d times", resp.Status, cache.served.Load())
	}
	up.Close()
	online.Store(true) // judged online, but no apiserver answers
	if resp := get(true); resp.StatusCode != http.StatusServiceUnavailable || cache.served.Load() != 0 {
		t.Errorf("no apiserver answered, impersonated: %s, answered from the cache %d times", resp.Status, cache.served.Load())
	}
}
