package upstream

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// pinger is the HTTP/2 connection Ping keeps to one apiserver: a PING
// frame is answered by the server's HTTP/2 layer, with no request, no
// authentication, no handler and nothing in the apiserver's metrics, yet
// it crosses the same link and reaches the same process as every request.
type pinger struct {
	mu      sync.Mutex // one ping at a time; guards the fields below
	conn    net.Conn
	fr      *http2.Framer
	seq     uint64
	noHTTP2 bool // the server (or a proxy before it) does not speak HTTP/2
}

// Ping checks that apiserver i answers an HTTP/2 PING within ctx, on a
// connection of its own, which it opens (without a client certificate) if
// it has none. A connection the server has closed meanwhile (its idle
// timeout) costs one more dial, within the same ctx. A server reached
// only over HTTP/1.1 cannot be pinged: it is probed (Probe) instead.
func (p *Pool) Ping(ctx context.Context, i int) error {
	s := p.servers[i]
	s.ping.mu.Lock()
	defer s.ping.mu.Unlock()
	if s.ping.noHTTP2 {
		return p.Probe(ctx, i)
	}
	reused := s.ping.conn != nil
	err := s.ping.once(ctx, s)
	if err != nil && reused && ctx.Err() == nil {
		err = s.ping.once(ctx, s)
	}
	if errors.Is(err, errNoHTTP2) {
		s.ping.noHTTP2 = true
		return p.Probe(ctx, i)
	}
	return err
}

var errNoHTTP2 = errors.New("the server does not speak HTTP/2")

// once sends one PING and waits for its acknowledgement; any failure
// closes the connection.
func (pg *pinger) once(ctx context.Context, s *Server) (err error) {
	defer func() {
		if err != nil && pg.conn != nil {
			_ = pg.conn.Close()
			pg.conn, pg.fr = nil, nil
		}
	}()
	if pg.conn == nil {
		if err := pg.dial(ctx, s); err != nil {
			return err
		}
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(5 * time.Second)
	}
	if err := pg.conn.SetDeadline(deadline); err != nil {
		return err
	}
	// A ctx cancelled before its deadline ends the wait too.
	stop := context.AfterFunc(ctx, func() { _ = pg.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	pg.seq++
	var data [8]byte
	binary.BigEndian.PutUint64(data[:], pg.seq)
	if err := pg.fr.WritePing(false, data); err != nil {
		return fmt.Errorf("sending an HTTP/2 PING: %w", err)
	}
	for {
		f, err := pg.fr.ReadFrame()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("waiting for the HTTP/2 PING's answer: %w", err)
		}
		switch f := f.(type) {
		case *http2.PingFrame:
			if f.IsAck() && f.Data == data {
				return nil
			}
			if !f.IsAck() {
				if err := pg.fr.WritePing(true, f.Data); err != nil {
					return err
				}
			}
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if err := pg.fr.WriteSettingsAck(); err != nil {
					return err
				}
			}
		case *http2.GoAwayFrame:
			return errors.New("the server is closing the connection (HTTP/2 GOAWAY)")
		}
	}
}

// dial opens the connection: TLS verifying the server, ALPN h2, then the
// client preface and empty settings.
func (pg *pinger) dial(ctx context.Context, s *Server) error {
	host := s.URL.Host
	if s.URL.Port() == "" {
		host = net.JoinHostPort(s.URL.Hostname(), "443")
	}
	cfg := s.handshake.Clone()
	cfg.NextProtos = []string{"h2", "http/1.1"}
	d := tls.Dialer{NetDialer: &net.Dialer{}, Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		return err
	}
	if conn.(*tls.Conn).ConnectionState().NegotiatedProtocol != "h2" {
		_ = conn.Close()
		return errNoHTTP2
	}
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	fr := http2.NewFramer(conn, conn)
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		_ = conn.Close()
		return err
	}
	if err := fr.WriteSettings(); err != nil {
		_ = conn.Close()
		return err
	}
	pg.conn, pg.fr = conn, fr
	return nil
}
