package framework

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/url"
	"sync"
	"time"
)

// A FaultProxy is a TCP proxy on 127.0.0.1 in front of one address, whose
// behaviour a test switches at any moment: pass, black-hole, reset, or pass
// with added latency or packet loss. It sits between outpost and kube-apiserver so that a
// test cuts outpost's link to the cloud while the test itself keeps talking
// to the apiserver directly.
//
// It works at layer 4: TLS passes through untouched, so a client verifies
// the target's certificate as if it had connected directly. The apiserver's
// serving certificate covers 127.0.0.1, which is why the proxy listens there.
//
// A mode change applies to the connections already open as well as to new
// ones, as a real link failure does: a black-hole stalls a live HTTP/2
// connection in mid-stream, and when the link comes back the bytes held meanwhile
// are delivered in order, as TCP retransmission would deliver them. Clients
// must notice a dead link themselves, with timeouts or pings.
type FaultProxy struct {
	target string
	ln     net.Listener
	wg     sync.WaitGroup // one per accepted connection

	mu      sync.Mutex // guards the fields below
	mode    faultMode
	latency time.Duration
	loss    float64
	changed chan struct{} // closed and replaced at every change of mode
	links   map[*link]struct{}
	closed  bool
}

type faultMode int

const (
	modePass faultMode = iota
	modeBlackhole
	modeReset
)

// chunkSize is how much one read of a connection takes; chunkQueue is how
// many chunks one direction holds while black-holed or delayed, after which
// the proxy stops reading and the sender's TCP window closes.
const (
	chunkSize  = 32 << 10
	chunkQueue = 16
)

// dialTimeout bounds the connection to the target, which is on loopback.
const dialTimeout = 5 * time.Second

// StartFaultProxy starts a proxy on a free port of 127.0.0.1 that forwards
// to target, given as host:port or as a URL such as https://127.0.0.1:6443.
// It starts in pass mode; Close stops it.
func StartFaultProxy(target string) (*FaultProxy, error) {
	if u, err := url.Parse(target); err == nil && u.Host != "" {
		target = u.Host
	}
	if _, _, err := net.SplitHostPort(target); err != nil {
		return nil, fmt.Errorf("starting fault proxy: target %q: %w", target, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("starting fault proxy: %w", err)
	}
	p := &FaultProxy{target: target, ln: ln, changed: make(chan struct{}), links: map[*link]struct{}{}}
	p.wg.Go(p.serve)
	return p, nil
}

// Addr is the proxy's host:port on 127.0.0.1.
func (p *FaultProxy) Addr() string { return p.ln.Addr().String() }

// URL is https://Addr(), for a client of an HTTPS target.
func (p *FaultProxy) URL() string { return "https://" + p.Addr() }

// Pass forwards every byte at once, on open and new connections alike;
// bytes held by a black-hole are delivered now.
func (p *FaultProxy) Pass() { p.set(modePass, 0, 0) }

// Latency passes every byte d late in each direction, so a round trip takes
// 2d longer. Bytes already on their way keep the delay they had when read,
// now measured with d.
func (p *FaultProxy) Latency(d time.Duration) { p.set(modePass, d, 0) }

// Loss passes bytes as TCP delivers them over a link that drops packets:
// each chunk (one read, up to 32 KiB) is lost with probability rate, and a
// lost chunk arrives only after TCP's retransmission timeout (200 ms,
// doubling while the retransmission is lost too, up to 3.2 s), holding up
// everything behind it on its connection. A userspace proxy cannot drop
// bytes from a TCP stream; the stall is what the endpoints see of a loss.
func (p *FaultProxy) Loss(rate float64) { p.set(modePass, 0, rate) }

// Retransmission timeouts of the Loss mode: Linux's minimum RTO, and the
// backoff limit beyond which a connection this lossy is as good as dead.
const (
	minRTO = 200 * time.Millisecond
	maxRTO = 3200 * time.Millisecond
)

// Blackhole forwards nothing: new connections are accepted (the kernel
// completes the handshake) and held, open ones stall, and neither side hears
// from the other, not even of a close, until the mode changes.
func (p *FaultProxy) Blackhole() { p.set(modeBlackhole, 0, 0) }

// Reset ends every open connection with a TCP RST on both sides and resets
// every new one at once, as a stateful firewall dropping the flows would.
func (p *FaultProxy) Reset() { p.set(modeReset, 0, 0) }

// Mode describes the current mode, for logs: "pass", "latency 2s",
// "loss 5%", "blackhole" or "reset".
func (p *FaultProxy) Mode() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.mode == modeBlackhole:
		return "blackhole"
	case p.mode == modeReset:
		return "reset"
	case p.latency > 0:
		return "latency " + p.latency.String()
	case p.loss > 0:
		return fmt.Sprintf("loss %g%%", p.loss*100)
	default:
		return "pass"
	}
}

// Conns is the number of client connections the proxy holds open.
func (p *FaultProxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// Close stops listening, resets every connection and waits until all the
// proxy's goroutines have ended. It is idempotent.
func (p *FaultProxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	links := p.takeLinks()
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()

	err := p.ln.Close()
	for _, l := range links {
		l.abort(true)
	}
	p.wg.Wait()
	return err
}

func (p *FaultProxy) set(m faultMode, latency time.Duration, loss float64) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.mode, p.latency, p.loss = m, latency, loss
	close(p.changed)
	p.changed = make(chan struct{})
	var doomed []*link
	if m == modeReset {
		doomed = p.takeLinks()
	}
	p.mu.Unlock()
	for _, l := range doomed {
		l.abort(true)
	}
}

// takeLinks empties the set of links and returns them. p.mu must be held.
func (p *FaultProxy) takeLinks() []*link {
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	clear(p.links)
	return links
}

func (p *FaultProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			// Only Close ends the listener; transient accept errors on
			// loopback (EMFILE) are not worth surviving in a test.
			return
		}
		p.wg.Go(func() { p.handle(c) })
	}
}

// A link is one client connection and, once dialled, its upstream twin.
type link struct {
	client net.Conn
	done   chan struct{} // closed by abort

	mu       sync.Mutex // guards the fields below
	upstream net.Conn
	aborted  bool
}

// abort closes both connections, with an RST when rst is set (SO_LINGER 0),
// else with a FIN. Only the first call does anything.
func (l *link) abort(rst bool) {
	l.mu.Lock()
	if l.aborted {
		l.mu.Unlock()
		return
	}
	l.aborted = true
	close(l.done)
	conns := []net.Conn{l.client, l.upstream}
	l.mu.Unlock()
	for _, c := range conns {
		if c == nil {
			continue
		}
		if tc, ok := c.(*net.TCPConn); ok && rst {
			_ = tc.SetLinger(0)
		}
		_ = c.Close()
	}
}

// setUpstream records the dialled upstream connection, or reports false
// when the link was aborted meanwhile.
func (l *link) setUpstream(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.aborted {
		return false
	}
	l.upstream = c
	return true
}

func (p *FaultProxy) handle(client net.Conn) {
	l := &link{client: client, done: make(chan struct{})}
	p.mu.Lock()
	refuse := p.closed || p.mode == modeReset
	if !refuse {
		p.links[l] = struct{}{}
	}
	p.mu.Unlock()
	if refuse {
		l.abort(true)
		return
	}
	defer func() {
		p.mu.Lock()
		delete(p.links, l)
		p.mu.Unlock()
	}()
	// A graceful close once both directions have ended by themselves.
	defer l.abort(false)

	// A black-holed SYN never reaches the server: dial only once the link
	// passes traffic.
	if !p.await(l, time.Time{}) {
		l.abort(true)
		return
	}
	up, err := net.DialTimeout("tcp", p.target, dialTimeout)
	if err != nil {
		// The target is down: the client sees a reset, as it would
		// connecting directly to a closed port.
		l.abort(true)
		return
	}
	if !l.setUpstream(up) {
		_ = up.Close()
		return
	}
	var wg sync.WaitGroup
	wg.Go(func() { p.pump(l, client, up) })
	wg.Go(func() { p.pump(l, up, client) })
	wg.Wait()
}

// A chunk is what one read returned: data, or the error that ended the
// stream (io.EOF for a close), which travels in order with the data.
type chunk struct {
	data []byte
	err  error
	at   time.Time // when it was read
}

// pump copies src to dst, one chunk at a time, holding each as the mode
// says. A close of src (EOF) is passed on as a half-close of dst; any other
// error ends the link with a reset.
func (p *FaultProxy) pump(l *link, src, dst net.Conn) {
	chunks := make(chan chunk, chunkQueue)
	var reader sync.WaitGroup
	defer reader.Wait()
	reader.Go(func() {
		defer close(chunks)
		for {
			buf := make([]byte, chunkSize)
			n, err := src.Read(buf)
			c := chunk{data: buf[:n], err: err, at: time.Now()}
			if n > 0 && err != nil {
				// Deliver the data first; the error comes with the next read.
				c.err = nil
			}
			select {
			case chunks <- c:
			case <-l.done:
				return
			}
			if c.err != nil {
				return
			}
		}
	})
	for c := range chunks {
		if !p.await(l, c.at) {
			l.abort(true)
			return
		}
		if c.err != nil {
			if !errors.Is(c.err, io.EOF) {
				l.abort(true)
				return
			}
			if tc, ok := dst.(*net.TCPConn); ok {
				_ = tc.CloseWrite()
			}
			return
		}
		if len(c.data) == 0 {
			continue
		}
		if !p.retransmit(l) {
			l.abort(true)
			return
		}
		if _, err := dst.Write(c.data); err != nil {
			l.abort(true)
			return
		}
	}
}

// retransmit holds a chunk the Loss mode drops for as long as TCP would
// take to deliver it again. It reports false when the link ended meanwhile.
func (p *FaultProxy) retransmit(l *link) bool {
	p.mu.Lock()
	loss := p.loss
	p.mu.Unlock()
	var wait time.Duration
	for rto := minRTO; rto <= maxRTO && loss > 0 && rand.Float64() < loss; rto *= 2 {
		wait += rto
	}
	if wait == 0 {
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-l.done:
		return false
	}
}

// await blocks until a chunk read at `at` may be delivered: at once in pass
// mode, at+latency with latency, never while black-holed. It reports false
// when the link must end instead: reset, Close, or the link aborted.
func (p *FaultProxy) await(l *link, at time.Time) bool {
	for {
		p.mu.Lock()
		m, d, changed, closed := p.mode, p.latency, p.changed, p.closed
		p.mu.Unlock()
		if closed || m == modeReset {
			return false
		}
		if m == modeBlackhole {
			select {
			case <-changed:
				continue
			case <-l.done:
				return false
			}
		}
		wait := time.Until(at.Add(d))
		if at.IsZero() || wait <= 0 {
			return true
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
			return true
		case <-changed:
			t.Stop()
		case <-l.done:
			t.Stop()
			return false
		}
	}
}
