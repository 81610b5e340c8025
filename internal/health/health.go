// Package health judges whether each apiserver is healthy, from active
// probes and from the passive evidence of failed requests, and folds that
// into one online/offline state the rest of outpost reads and subscribes to.
//
// A failure counts at once (a failed probe, or a dial, TLS or timeout error
// on a real request); coming back takes SuccessThreshold consecutive good
// probes, so a flapping link does not flip the state every probe.
//
// Answers count too: a probe that only timed out while real requests to
// the same server were answered (since the previous probe, and at most a
// probe timeout before this one started; the pool reports each response's
// headers and then the arrival of its streamed body) proves nothing
// but a busy server or a busy node, and is not counted. Otherwise a
// saturated machine, where /readyz takes longer than the probe timeout,
// would turn outpost offline (closing every connection, serving reads from
// the cache) while the apiserver was answering all along.
package health

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// ProbeFunc checks apiserver i once. A nil error means healthy.
type ProbeFunc func(ctx context.Context, i int) error

// Monitor tracks the health of a fixed list of apiservers. Set the exported
// fields, then call Run; the query methods are safe for concurrent use at any
// time (before Run every server counts as healthy, so the first requests are
// tried rather than refused).
type Monitor struct {
	// Count is the number of apiservers.
	Count int
	// Probe checks one apiserver. Required.
	Probe ProbeFunc
	// Ping, if set, is a cheaper check of a healthy apiserver (an HTTP/2
	// PING: the link and the process, not its readiness), used for every
	// probe but one each ReadyInterval. A server not healthy is always
	// probed with Probe, so that it comes back only once ready.
	Ping ProbeFunc
	// ReadyInterval is the time between Probes of a healthy server when
	// Ping is set; 0 probes with Probe every time.
	ReadyInterval time.Duration
	// Reachable, if set, is a cheaper check of the link to one apiserver
	// and of its process (a TLS handshake), started when a probe has taken
	// half its timeout. A probe that then times out while Reachable
	// succeeded is excused, at most MaxReachableExcuses times in a row: a
	// saturated apiserver (its /readyz waits on etcd) is not a lost one,
	// and turning offline would close every watch and bring a re-list
	// storm on it. A black-holed link fails both.
	Reachable ProbeFunc
	// Interval between probes of each apiserver. Default 1s.
	Interval time.Duration
	// Timeout of one probe. Default 1s.
	Timeout time.Duration
	// FailureThreshold consecutive failed probes mark a server unhealthy.
	// Default 1.
	FailureThreshold int
	// SuccessThreshold consecutive good probes mark it healthy again.
	// Default 2.
	SuccessThreshold int
	// OnChange, if set, is called (from the goroutine that saw the change,
	// without locks held) whenever server i changes state, with err the
	// evidence of a failure.
	OnChange func(i int, healthy bool, err error)
	// OnProbe, if set, is told the result of every probe of server i.
	OnProbe func(i int, result ProbeResult)

	// answered[i] is when a real request to server i last got an answer
	// (unix nanoseconds); written on every proxied request, so atomic.
	answered []atomic.Int64
	reached  atomic.Bool // a probe succeeded

	mu      sync.Mutex // guards the fields below
	servers []serverState
	online  bool
	changed chan struct{} // closed and replaced at every online/offline change

	answeredOnce sync.Once
}

// MaxReachableExcuses bounds how many timed-out probes in a row Reachable
// excuses: an apiserver that completes handshakes but answers nothing for
// that long counts as lost.
const MaxReachableExcuses = 4

// ProbeResult is how one probe counted.
type ProbeResult string

const (
	ProbeOK     ProbeResult = "ok"
	ProbeFailed ProbeResult = "failed"
	// ProbeExcused: the probe timed out, but the server answered real
	// requests since the previous probe, so it counted neither way.
	ProbeExcused ProbeResult = "excused"
)

type serverState struct {
	healthy   bool
	successes int
	failures  int
}

func (m *Monitor) init() {
	if m.servers == nil {
		m.answered = make([]atomic.Int64, m.Count)
		m.servers = make([]serverState, m.Count)
		for i := range m.servers {
			m.servers[i].healthy = true
		}
		m.online = m.Count > 0
		m.changed = make(chan struct{})
	}
}

// Healthy reports whether apiserver i is currently judged healthy.
func (m *Monitor) Healthy(i int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	return m.servers[i].healthy
}

// Reached reports whether a probe of any apiserver has succeeded since Run
// started. Servers count as healthy before their first probe, so that the
// first requests are tried; readiness waits for proof.
func (m *Monitor) Reached() bool { return m.reached.Load() }

// Online reports whether at least one apiserver is healthy.
func (m *Monitor) Online() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	return m.online
}

// Changed returns a channel closed at the next online/offline change.
func (m *Monitor) Changed() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.init()
	return m.changed
}

// probe runs one probe of server i within timeout and, if it is slow and
// checkReachable is set, Reachable beside it; reachable reports whether
// that ran and succeeded.
func (m *Monitor) probe(ctx context.Context, i int, probe ProbeFunc, timeout time.Duration, checkReachable bool) (reachable bool, err error) {
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if m.Reachable == nil || !checkReachable {
		return false, probe(pctx, i)
	}
	reach := make(chan error, 1)
	slow := time.AfterFunc(timeout/2, func() { reach <- m.Reachable(pctx, i) })
	err = probe(pctx, i)
	if slow.Stop() {
		return false, err // answered within half its timeout
	}
	if err == nil {
		cancel() // the check's answer is not needed
	}
	return <-reach == nil, err
}

// ReportFailure is passive evidence: a real request to apiserver i failed
// to connect or timed out. The server is marked unhealthy at once.
func (m *Monitor) ReportFailure(i int, err error) {
	m.observe(i, err, true)
}

// ReportAnswer is passive evidence the other way: a real request to
// apiserver i got an answer (any status), or more of its body. It never
// marks a server healthy by itself; it only keeps a probe that timed out
// meanwhile from counting.
func (m *Monitor) ReportAnswer(i int) {
	m.answers()[i].Store(time.Now().UnixNano())
}

// answers returns m.answered, made once.
func (m *Monitor) answers() []atomic.Int64 {
	m.answeredOnce.Do(func() {
		m.mu.Lock()
		m.init()
		m.mu.Unlock()
	})
	return m.answered
}

// Run probes every apiserver until ctx is done.
func (m *Monitor) Run(ctx context.Context) error {
	m.answers()
	var wg sync.WaitGroup
	for i := 0; i < m.Count; i++ {
		wg.Go(func() { m.loop(ctx, i) })
	}
	wg.Wait()
	return nil
}

func (m *Monitor) loop(ctx context.Context, i int) {
	interval := m.Interval
	if interval <= 0 {
		interval = time.Second
	}
	timeout := m.Timeout
	if timeout <= 0 {
		timeout = time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	since := time.Now().UnixNano() // when the previous probe started
	reachableExcuses := 0          // in a row
	var ready time.Time            // when the last Probe started
	for {
		now := time.Now()
		start := now.UnixNano()
		probe := m.Probe
		if m.Ping != nil && m.ReadyInterval > 0 && now.Sub(ready) < m.ReadyInterval && m.Healthy(i) {
			probe = m.Ping
		} else {
			ready = now
		}
		reachable, err := m.probe(ctx, i, probe, timeout, reachableExcuses < MaxReachableExcuses)
		if ctx.Err() != nil {
			return
		}
		result := ProbeOK
		switch {
		case err == nil:
		case errors.Is(err, context.DeadlineExceeded) && m.answered[i].Load() >= max(since, start-int64(timeout)):
			// Too slow, but the server answered real requests since the
			// previous probe (and no longer than a timeout before this
			// one, however long the interval): neither a failure nor a
			// success.
			result = ProbeExcused
		case errors.Is(err, context.DeadlineExceeded) && reachable:
			// Too slow, but the server completed a handshake meanwhile.
			result = ProbeExcused
			reachableExcuses++
		default:
			result = ProbeFailed
		}
		since = start
		if result == ProbeOK {
			m.reached.Store(true)
			reachableExcuses = 0
		}
		// Counted before it changes the state: whoever sees the new state
		// also sees the probe that changed it.
		if m.OnProbe != nil {
			m.OnProbe(i, result)
		}
		if result != ProbeExcused {
			m.observe(i, err, false)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (m *Monitor) observe(i int, err error, passive bool) {
	failureThreshold := max(m.FailureThreshold, 1)
	successThreshold := max(m.SuccessThreshold, 1)

	m.mu.Lock()
	m.init()
	s := &m.servers[i]
	was := s.healthy
	if err != nil {
		s.successes = 0
		s.failures++
		if passive || s.failures >= failureThreshold {
			s.healthy = false
		}
	} else {
		s.failures = 0
		s.successes++
		if s.successes >= successThreshold {
			s.healthy = true
		}
	}
	now := s.healthy
	online := false
	for _, st := range m.servers {
		online = online || st.healthy
	}
	if online != m.online {
		m.online = online
		close(m.changed)
		m.changed = make(chan struct{})
	}
	m.mu.Unlock()

	if now != was && m.OnChange != nil {
		m.OnChange(i, now, err)
	}
}
