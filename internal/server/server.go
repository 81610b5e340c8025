// Package server runs the listeners of both programs with one lifecycle:
// Run serves until its context ends, then drains within a deadline and
// closes. outpost has the TLS port for clients, the optional plain-HTTP port
// and the admin port; outpost-controller the webhook port (TLS) and the
// metrics port.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"
)

// Server is one listener. Set the fields, then call Run once.
type Server struct {
	// Name appears in logs ("secure", "insecure", "admin").
	Name string
	// Addr is the host:port to listen on. Ignored when Listener is set.
	Addr string
	// Listener, if set, is used instead of listening on Addr: in tests, or
	// by a caller that listens before starting anything so that a taken
	// port fails fast. Run closes it.
	Listener net.Listener
	// Handler serves the requests.
	Handler http.Handler
	// TLS, if set, makes this a TLS listener offering HTTP/2 and HTTP/1.1,
	// with its Certificates or GetCertificate (certificates that rotate).
	// If nil, the listener serves plain HTTP/1.1.
	TLS *tls.Config
	// ShutdownTimeout bounds the drain once the context ends; then open
	// connections are closed. Zero: close at once.
	ShutdownTimeout time.Duration
	// Log receives start, stop and failure lines.
	Log *slog.Logger
	// Ready, if set, is called with the bound address once listening.
	Ready func(addr net.Addr)
}

// Run listens and serves until ctx is done, then shuts down.
func (s *Server) Run(ctx context.Context) error {
	ln := s.Listener
	if ln == nil {
		var err error
		ln, err = net.Listen("tcp", s.Addr)
		if err != nil {
			return fmt.Errorf("listening on %s for %s: %w", s.Addr, s.Name, err)
		}
	}
	// Every handler is waited for, upgraded ones too: http.Server forgets
	// a connection once a handler hijacks it (exec, attach, port-forward),
	// and its handler then runs until the stream ends.
	var handlers sync.WaitGroup
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			handlers.Add(1)
			defer handlers.Done()
			s.Handler.ServeHTTP(w, r)
		}),
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       5 * time.Minute,
		MaxHeaderBytes:    1 << 20,
		ErrorLog:          slog.NewLogLogger(s.Log.Handler(), slog.LevelDebug),
		HTTP2: &http.HTTP2Config{
			// As kube-apiserver's default, so clients multiplexing many
			// watches on one connection do not queue behind 100 streams.
			MaxConcurrentStreams: 1000,
		},
	}
	if s.TLS != nil {
		cfg := s.TLS.Clone()
		cfg.NextProtos = []string{"h2", "http/1.1"}
		ln = tls.NewListener(ln, cfg)
	}
	if s.Ready != nil {
		s.Ready(ln.Addr())
	}
	s.Log.Info("listening", "listener", s.Name, "addr", ln.Addr().String(), "tls", s.TLS != nil)

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serving %s: %w", s.Name, err)
	case <-ctx.Done():
	}

	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.ShutdownTimeout)
	defer cancel()
	err := srv.Shutdown(sctx)
	if errors.Is(err, context.DeadlineExceeded) {
		s.Log.Warn("drain deadline passed; closing open connections", "listener", s.Name)
		err = srv.Close()
	}
	if serr := <-errc; !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	// No request starts any more. Upgraded streams end with their
	// request's context, which the handler ties to shutdown; give them
	// another drain deadline.
	done := make(chan struct{})
	go func() {
		handlers.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(max(s.ShutdownTimeout, time.Second)):
		s.Log.Warn("requests still running after the drain deadline; leaving them", "listener", s.Name)
	}
	return err
}
