package framework

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// echoServer echoes every line back on each connection, until the test ends.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func startProxy(t *testing.T, target string) *FaultProxy {
	t.Helper()
	p, err := StartFaultProxy(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// client is one connection through the proxy that sends lines and reads
// their echo.
type client struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func dial(t *testing.T, p *FaultProxy) *client {
	t.Helper()
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &client{t: t, conn: c, r: bufio.NewReader(c)}
}

func (c *client) send(line string) {
	c.t.Helper()
	if _, err := io.WriteString(c.conn, line+"\n"); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// recv reads one line within d.
func (c *client) recv(d time.Duration) (string, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(d))
	line, err := c.r.ReadString('\n')
	return strings.TrimSuffix(line, "\n"), err
}

func (c *client) echo(line string) {
	c.t.Helper()
	c.send(line)
	got, err := c.recv(2 * time.Second)
	if err != nil || got != line {
		c.t.Fatalf("echo of %q = %q, %v", line, got, err)
	}
}

// expectSilence checks that nothing arrives within d.
func (c *client) expectSilence(d time.Duration) {
	c.t.Helper()
	got, err := c.recv(d)
	if !isTimeout(err) {
		c.t.Fatalf("black-holed connection received %q, %v; want nothing", got, err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestFaultProxyPass(t *testing.T) {
	p := startProxy(t, "http://"+echoServer(t)) // a URL target works too
	if !strings.HasPrefix(p.Addr(), "127.0.0.1:") || p.URL() != "https://"+p.Addr() {
		t.Fatalf("Addr %q, URL %q", p.Addr(), p.URL())
	}
	c := dial(t, p)
	c.echo("hello")
	// A large write crosses many chunks and arrives intact and in order.
	big := strings.Repeat("0123456789", 100_000)
	sent := make(chan error, 1)
	go func() {
		_, err := io.WriteString(c.conn, big+"\n")
		sent <- err
	}()
	got, err := c.recv(5 * time.Second)
	if werr := <-sent; werr != nil {
		t.Fatalf("big write: %v", werr)
	}
	if err != nil || got != big {
		t.Fatalf("big echo: %d bytes, %v; want %d", len(got), err, len(big))
	}
	if p.Mode() != "pass" {
		t.Errorf("Mode = %q", p.Mode())
	}
}

func TestFaultProxyBlackhole(t *testing.T) {
	p := startProxy(t, echoServer(t))
	live := dial(t, p)
	live.echo("before")

	p.Blackhole()
	if p.Mode() != "blackhole" {
		t.Errorf("Mode = %q", p.Mode())
	}
	// The open connection stalls.
	live.send("during")
	live.expectSilence(300 * time.Millisecond)
	// A new connection is accepted, and then hears nothing.
	fresh := dial(t, p)
	fresh.send("new")
	fresh.expectSilence(300 * time.Millisecond)

	// The link comes back: what was held arrives, in order, on both.
	p.Pass()
	if got, err := live.recv(2 * time.Second); err != nil || got != "during" {
		t.Fatalf("held line on the open connection = %q, %v", got, err)
	}
	if got, err := fresh.recv(2 * time.Second); err != nil || got != "new" {
		t.Fatalf("held line on the new connection = %q, %v", got, err)
	}
	live.echo("after")
	fresh.echo("after")
}

func TestFaultProxyReset(t *testing.T) {
	p := startProxy(t, echoServer(t))
	live := dial(t, p)
	live.echo("before")

	p.Reset()
	if _, err := live.recv(2 * time.Second); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read on an open connection after Reset: %v; want ECONNRESET", err)
	}
	// New connections are reset too: the handshake completes in the
	// kernel, then the first read fails.
	if err := firstReadErr(p.Addr()); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("new connection during Reset: %v; want ECONNRESET", err)
	}

	p.Pass()
	dial(t, p).echo("after")
}

func TestFaultProxyBlackholeThenReset(t *testing.T) {
	p := startProxy(t, echoServer(t))
	held := dial(t, p)
	p.Blackhole()
	held.send("held")
	held.expectSilence(100 * time.Millisecond)
	p.Reset()
	if _, err := held.recv(2 * time.Second); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("held connection after Reset: %v; want ECONNRESET", err)
	}
	if n := p.Conns(); n != 0 {
		t.Errorf("Conns after Reset = %d, want 0", n)
	}
}

func TestFaultProxyLatency(t *testing.T) {
	p := startProxy(t, echoServer(t))
	c := dial(t, p)
	c.echo("warm")

	const d = 150 * time.Millisecond
	p.Latency(d)
	if p.Mode() != "latency 150ms" {
		t.Errorf("Mode = %q", p.Mode())
	}
	start := time.Now()
	c.echo("slow")
	if rtt := time.Since(start); rtt < 2*d || rtt > 2*d+time.Second {
		t.Errorf("round trip with latency %v took %v, want about %v", d, rtt, 2*d)
	}
	// Latency delays without serialising: several lines in flight arrive
	// one delay later, not one delay each.
	start = time.Now()
	for _, l := range []string{"a", "b", "c", "d"} {
		c.send(l)
	}
	for _, want := range []string{"a", "b", "c", "d"} {
		if got, err := c.recv(2 * time.Second); err != nil || got != want {
			t.Fatalf("pipelined echo = %q, %v; want %q", got, err, want)
		}
	}
	if rtt := time.Since(start); rtt > 2*d+500*time.Millisecond {
		t.Errorf("four pipelined lines took %v, want about %v", rtt, 2*d)
	}

	p.Pass()
	start = time.Now()
	c.echo("fast")
	if rtt := time.Since(start); rtt > d {
		t.Errorf("round trip after Pass took %v", rtt)
	}
}

func TestFaultProxyTargetDown(t *testing.T) {
	p := startProxy(t, "127.0.0.1:"+strconv.Itoa(FreePort(t)))
	// The reset may come before or after connect returns.
	if err := firstReadErr(p.Addr()); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("connection to a closed target: %v; want ECONNRESET", err)
	}
}

// firstReadErr connects to addr and reads, for up to 2 s, and returns the
// error of the connect or of the read.
func firstReadErr(addr string) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = c.Read(make([]byte, 1))
	return err
}

// TestFaultProxyHTTP2 is the case the e2e tests depend on: a black-hole
// stalls requests on an HTTP/2 connection that is already open (as
// outpost's to the apiserver is), and the connection works again after Pass.
func TestFaultProxyHTTP2(t *testing.T) {
	var served, conns atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		_, _ = io.WriteString(w, r.Proto)
	}))
	srv.EnableHTTP2 = true
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.StartTLS()
	defer srv.Close()
	p := startProxy(t, srv.URL)
	hc := srv.Client() // trusts the server's certificate, which covers 127.0.0.1
	get := func(d time.Duration) (string, error) {
		ctx, cancel := context.WithTimeout(t.Context(), d)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.URL(), nil)
		resp, err := hc.Do(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}
	if got, err := get(2 * time.Second); err != nil || got != "HTTP/2.0" {
		t.Fatalf("through the proxy: %q, %v; want HTTP/2.0", got, err)
	}

	p.Blackhole()
	before := served.Load()
	if got, err := get(500 * time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("request on the live HTTP/2 connection while black-holed: %q, %v; want a timeout", got, err)
	}
	if served.Load() != before {
		t.Error("the server saw a request sent while black-holed")
	}

	p.Pass()
	if got, err := get(3 * time.Second); err != nil || got != "HTTP/2.0" {
		t.Fatalf("after Pass: %q, %v", got, err)
	}
	t.Logf("server connections: %d", conns.Load())
}

// TestFaultProxyClose checks that Close ends every connection in any mode
// and leaves no goroutine behind.
func TestFaultProxyClose(t *testing.T) {
	target := echoServer(t)
	before := runtime.NumGoroutine()
	p, err := StartFaultProxy(target)
	if err != nil {
		t.Fatal(err)
	}
	a := dial(t, p)
	a.echo("x")
	p.Blackhole()
	b := dial(t, p)
	b.send("held")
	// Let the proxy accept b before closing.
	deadline := time.Now().Add(2 * time.Second)
	for p.Conns() < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	for _, c := range []*client{a, b} {
		if _, err := c.recv(2 * time.Second); err == nil || isTimeout(err) {
			t.Errorf("connection after Close: %v; want it ended", err)
		}
	}
	if _, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		t.Error("proxy still accepts after Close")
	}
	// The echo server's goroutines for a and b end once the proxy's
	// upstream connections are closed; allow them a moment.
	deadline = time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("%d goroutines after Close, %d before", n, before)
	}
}

func TestFaultProxyLoss(t *testing.T) {
	p := startProxy(t, echoServer(t))
	c := dial(t, p)
	c.echo("warm")

	p.Loss(0.5)
	if p.Mode() != "loss 50%" {
		t.Errorf("Mode = %q", p.Mode())
	}
	// Every line arrives, in order, but some only after a retransmission
	// timeout: with half the chunks lost, 20 round trips (40 chunks) all
	// on time would happen once in 10^12 runs.
	var slow int
	for i := range 20 {
		line := "line " + strconv.Itoa(i)
		start := time.Now()
		c.send(line)
		got, err := c.recv(15 * time.Second)
		if err != nil || got != line {
			t.Fatalf("echo under loss = %q, %v; want %q", got, err, line)
		}
		if time.Since(start) >= minRTO {
			slow++
		}
	}
	if slow == 0 {
		t.Error("no round trip waited for a retransmission at 50% loss")
	}

	p.Pass()
	start := time.Now()
	c.echo("fast")
	if rtt := time.Since(start); rtt >= minRTO {
		t.Errorf("round trip after Pass took %v", rtt)
	}
}
