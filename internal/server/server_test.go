package server

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestUpgradedStreamsAwaited: Run returns only once an upgraded stream's
// handler has ended, though http.Server forgot its connection when it was
// hijacked.
func TestUpgradedStreamsAwaited(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hijacked, release, handlerDone := make(chan struct{}), make(chan struct{}), make(chan struct{})
	s := &Server{Name: "test", Listener: ln, ShutdownTimeout: 5 * time.Second, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			defer close(handlerDone)
			conn, _, err := http.NewResponseController(w).Hijack()
			if err != nil {
				t.Error(err)
				return
			}
			defer conn.Close()
			_, _ = io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n")
			close(hijacked)
			<-release // the stream, until it ends
		})}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- s.Run(ctx) }()

	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, _ = io.WriteString(conn, "POST /exec HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n")
	if resp, err := http.ReadResponse(bufio.NewReader(conn), nil); err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("%v %v", resp, err)
	}
	<-hijacked
	cancel()
	select {
	case err := <-ran:
		t.Fatalf("Run returned (%v) while an upgraded stream's handler still ran", err)
	case <-time.After(300 * time.Millisecond):
	}
	close(release)
	select {
	case <-ran:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return once the stream ended")
	}
	select {
	case <-handlerDone:
	default:
		t.Fatal("Run returned before the handler")
	}
}

// TestServes: a TLS listener whose certificate comes from GetCertificate
// (outpost-controller's rotating webhook certificate) speaks HTTP/2, a
// listener without TLS plain HTTP/1.1; both return nil once drained.
func TestServes(t *testing.T) {
	// httptest's certificate, for 127.0.0.1, and a client trusting it.
	ts := httptest.NewUnstartedServer(nil)
	ts.StartTLS()
	cert, roots := ts.TLS.Certificates[0], x509.NewCertPool()
	roots.AddCert(ts.Certificate())
	ts.Close()

	tests := []struct {
		name      string
		tls       *tls.Config
		scheme    string
		wantProto string
	}{
		{"tls", &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &cert, nil }}, "https", "HTTP/2.0"},
		{"plain", nil, "http", "HTTP/1.1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ln := listen(t)
			stop := start(t, &Server{Name: tt.name, Listener: ln, TLS: tt.tls, ShutdownTimeout: time.Second, Log: slog.New(slog.DiscardHandler),
				Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, r.Proto) })})

			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: true}
			resp, err := (&http.Client{Transport: tr}).Get(tt.scheme + "://" + ln.Addr().String() + "/")
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.Proto != tt.wantProto || string(body) != tt.wantProto {
				t.Errorf("answer %s %q %v, want %s", resp.Proto, body, err, tt.wantProto)
			}
			// Else an HTTP/2 server waits a second for the client to act
			// on its GOAWAY.
			tr.CloseIdleConnections()
			if err := stop(); err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
}

// TestDrainDeadline: a request still running when the drain deadline passes
// has its connection closed, and Run returns nil: the deadline is handled,
// not a failure.
func TestDrainDeadline(t *testing.T) {
	ln := listen(t)
	started := make(chan struct{})
	stop := start(t, &Server{Name: "test", Listener: ln, ShutdownTimeout: 200 * time.Millisecond, Log: slog.New(slog.DiscardHandler),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			close(started)
			<-r.Context().Done() // ends when the connection is closed
		})})

	got := make(chan error, 1)
	go func() {
		resp, err := http.Get("http://" + ln.Addr().String() + "/")
		if err == nil {
			resp.Body.Close()
		}
		got <- err
	}()
	<-started
	if err := stop(); err != nil {
		t.Errorf("Run: %v", err)
	}
	if err := <-got; err == nil {
		t.Error("the request cut off at the drain deadline got an answer")
	}
}

// TestServeErrorReturned: a listener that fails is Run's error, named.
func TestServeErrorReturned(t *testing.T) {
	ln := listen(t)
	ln.Close()
	s := &Server{Name: "test", Listener: ln, Handler: http.NotFoundHandler(), Log: slog.New(slog.DiscardHandler)}
	if err := s.Run(t.Context()); err == nil || !strings.Contains(err.Error(), "serving test") {
		t.Errorf("Run: %v, want the serve error", err)
	}
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// start runs s; stop ends its context and returns what Run returned.
func start(t *testing.T, s *Server) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	ran := make(chan error, 1)
	go func() { ran <- s.Run(ctx) }()
	return func() error {
		cancel()
		select {
		case err := <-ran:
			return err
		case <-time.After(5 * time.Second):
			t.Fatal("Run did not return within 5 s of its context's end")
			return nil
		}
	}
}
