// Package health judges whether each apiserver is healthy, from active
// probes and from the passive evidence of failed requests, and folds that
// into one online/offline state the rest of outpost reads and subscribes to.
//
// A failure counts at once (a failed probe, or a dial, TLS or timeout error
// on a real request); coming back takes SuccessThreshold consecutive good
// probes, so a flapping link does not flip the state every probe.
package health

import (
	"context"
	"sync"
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

	mu      sync.Mutex // guards the fields below
	servers []serverState
	online  bool
	changed chan struct{} // closed and replaced at every online/offline change
}

type serverState struct {
	healthy   bool
	successes int
	failures  int
}

func (m *Monitor) init() {
	if m.servers == nil {
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

// ReportFailure is passive evidence: a real request to apiserver i failed
// to connect or timed out. The server is marked unhealthy at once.
func (m *Monitor) ReportFailure(i int, err error) {
	m.observe(i, err, true)
}

// Run probes every apiserver until ctx is done.
func (m *Monitor) Run(ctx context.Context) error {
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
	for {
		pctx, cancel := context.WithTimeout(ctx, timeout)
		err := m.Probe(pctx, i)
		cancel()
		if ctx.Err() != nil {
			return
		}
		m.observe(i, err, false)
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
