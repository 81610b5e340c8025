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

// pingConnMaxAge is how long a ping connection is used before a new one
// replaces it, opened beside it: kube-apiserver closes an HTTP/2
// connection that has carried no stream for 90 s, and PINGs do not count.
var pingConnMaxAge = 60 * time.Second

// pingDialTimeout bounds the opening of a ping connection, which no probe
// waits for.
const pingDialTimeout = 10 * time.Second

// pinger is the HTTP/2 connection Ping keeps to one apiserver: a PING
// frame is answered by the server's HTTP/2 layer, with no request, no
// authentication, no handler and nothing in the apiserver's metrics, yet
// it crosses the same link and reaches the same process as every request.
// The connection is opened in the background, never within a probe's
// time: a probe that finds none asks /readyz instead.
type pinger struct {
	mu      sync.Mutex // guards the fields below; held for one ping at a time
	conn    net.Conn
	fr      *http2.Framer
	opened  time.Time
	seq     uint64
	dialing bool
	cancel  context.CancelFunc // of the dial in progress
	closed  bool
	// failed counts dials that failed in a row; none is tried again
	// before notBefore (a front that refuses a connection without a
	// client certificate would otherwise cost a handshake per probe, and
	// a server without HTTP/2 is tried again only every maxDialBackoff).
	failed    int
	notBefore time.Time
}

// maxDialBackoff bounds the wait after failed dials of ping connections;
// it is also how often a server found without HTTP/2 is tried again.
const maxDialBackoff = 5 * time.Minute

// Ping checks that apiserver i answers an HTTP/2 PING within ctx, on a
// connection of its own (opened without a client certificate). Without
// one ready (the first time, after a failure, or when the server closed
// it), it probes /readyz (Probe) and opens one in the background for the
// next time; a server reached only over HTTP/1.1 is probed so, and tried
// again every maxDialBackoff.
func (p *Pool) Ping(ctx context.Context, i int) error {
	s := p.servers[i]
	pg := &s.ping
	pg.mu.Lock()
	if pg.closed {
		pg.mu.Unlock()
		return p.Probe(ctx, i)
	}
	if pg.conn == nil || time.Since(pg.opened) > pingConnMaxAge {
		pg.dialLater(s)
	}
	if pg.conn == nil {
		pg.mu.Unlock()
		return p.Probe(ctx, i)
	}
	err := pg.once(ctx)
	if err != nil {
		pg.drop()
		pg.dialLater(s)
	}
	pg.mu.Unlock()
	if err != nil && ctx.Err() == nil {
		// The connection failed before the probe's time was up (the
		// server closed it, a reset): that says nothing of the link, which
		// /readyz asks about within the time left.
		return p.Probe(ctx, i)
	}
	return err
}

// ClosePings closes the connections Ping keeps, and keeps Ping from
// opening new ones.
func (p *Pool) ClosePings() {
	for _, s := range p.servers {
		s.ping.mu.Lock()
		s.ping.closed = true
		s.ping.drop()
		if s.ping.cancel != nil {
			s.ping.cancel()
		}
		s.ping.mu.Unlock()
	}
}

// once sends one PING on pg.conn and waits for its acknowledgement.
// pg.mu is held.
func (pg *pinger) once(ctx context.Context) error {
	conn, fr := pg.conn, pg.fr
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(5 * time.Second)
	}
	if err := conn.SetDeadline(deadline); err != nil {
		return err
	}
	// A ctx cancelled before its deadline ends the wait too.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	pg.seq++
	var data [8]byte
	binary.BigEndian.PutUint64(data[:], pg.seq)
	if err := fr.WritePing(false, data); err != nil {
		return fmt.Errorf("sending an HTTP/2 PING: %w", err)
	}
	for {
		f, err := fr.ReadFrame()
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
				if err := fr.WritePing(true, f.Data); err != nil {
					return err
				}
			}
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if err := fr.WriteSettingsAck(); err != nil {
					return err
				}
			}
		case *http2.GoAwayFrame:
			return errors.New("the server is closing the connection (HTTP/2 GOAWAY)")
		}
	}
}

// drop closes pg.conn. pg.mu is held.
func (pg *pinger) drop() {
	if pg.conn != nil {
		_ = pg.conn.Close()
		pg.conn, pg.fr = nil, nil
	}
}

// dialLater opens a new connection in the background, which replaces
// pg.conn once ready. pg.mu is held.
// After failures (or a server without HTTP/2), it waits: 1 s, doubling up
// to maxDialBackoff, during which probes ask /readyz.
func (pg *pinger) dialLater(s *Server) {
	if pg.dialing || pg.closed || time.Now().Before(pg.notBefore) {
		return
	}
	pg.dialing = true
	ctx, cancel := context.WithTimeout(context.Background(), pingDialTimeout)
	pg.cancel = cancel
	go func() {
		defer cancel()
		conn, fr, err := dialPing(ctx, s)
		pg.mu.Lock()
		defer pg.mu.Unlock()
		pg.dialing, pg.cancel = false, nil
		switch {
		case err != nil:
			// Probes ask /readyz meanwhile.
			pg.failed++
			wait := maxDialBackoff
			if pg.failed < 10 {
				wait = min(time.Second<<(pg.failed-1), maxDialBackoff)
			}
			if errors.Is(err, errNoHTTP2) {
				wait = maxDialBackoff
			}
			pg.notBefore = time.Now().Add(wait)
		case pg.closed:
			_ = conn.Close()
		default:
			pg.failed, pg.notBefore = 0, time.Time{}
			pg.drop()
			pg.conn, pg.fr, pg.opened = conn, fr, time.Now()
		}
	}()
}

var errNoHTTP2 = errors.New("the server does not speak HTTP/2")

// dialPing opens a ping connection: TLS verifying the server, ALPN h2,
// then the client preface and empty settings.
func dialPing(ctx context.Context, s *Server) (net.Conn, *http2.Framer, error) {
	cfg := s.handshake.Clone()
	cfg.NextProtos = []string{"h2", "http/1.1"}
	d := tls.Dialer{NetDialer: &net.Dialer{}, Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", s.hostPort())
	if err != nil {
		return nil, nil, err
	}
	if conn.(*tls.Conn).ConnectionState().NegotiatedProtocol != "h2" {
		_ = conn.Close()
		return nil, nil, errNoHTTP2
	}
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	fr := http2.NewFramer(conn, conn)
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		_ = conn.Close()
		return nil, nil, err
	}
	if err := fr.WriteSettings(); err != nil {
		_ = conn.Close()
		return nil, nil, err
	}
	return conn, fr, nil
}
