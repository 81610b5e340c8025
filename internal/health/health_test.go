package health

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

func TestHysteresis(t *testing.T) {
	var changes []bool
	m := &Monitor{Count: 2, SuccessThreshold: 2, FailureThreshold: 1,
		OnChange: func(i int, healthy bool, err error) {
			if i == 0 {
				changes = append(changes, healthy)
			}
		}}
	if !m.Online() || !m.Healthy(0) {
		t.Fatal("servers must start healthy so the first requests are tried")
	}
	fail := errors.New("dial tcp: connection refused")
	changed := m.Changed()

	m.observe(0, fail, false)
	if m.Healthy(0) {
		t.Fatal("one failed probe must mark the server unhealthy")
	}
	if !m.Online() {
		t.Fatal("server 1 is still healthy: online")
	}
	m.ReportFailure(1, fail)
	if m.Online() {
		t.Fatal("both servers failed: offline")
	}
	select {
	case <-changed:
	default:
		t.Fatal("Changed did not fire on going offline")
	}

	m.observe(0, nil, false)
	if m.Healthy(0) {
		t.Fatal("one good probe must not bring the server back")
	}
	m.observe(0, fail, false)
	m.observe(0, nil, false)
	if m.Healthy(0) {
		t.Fatal("a failure must reset the success count")
	}
	m.observe(0, nil, false)
	if !m.Healthy(0) || !m.Online() {
		t.Fatal("two consecutive good probes must bring the server back")
	}
	if want := []bool{false, true}; len(changes) != 2 || changes[0] != want[0] || changes[1] != want[1] {
		t.Fatalf("OnChange calls = %v, want %v", changes, want)
	}
}

func TestFailureThreshold(t *testing.T) {
	m := &Monitor{Count: 1, FailureThreshold: 3}
	fail := errors.New("timeout")
	m.observe(0, fail, false)
	m.observe(0, fail, false)
	if !m.Healthy(0) {
		t.Fatal("two failed probes under a threshold of three must not mark it down")
	}
	m.observe(0, fail, false)
	if m.Healthy(0) {
		t.Fatal("third failed probe must mark it down")
	}
}

func TestRunProbesUntilCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	probes := make(chan int, 10)
	m := &Monitor{Count: 1, Probe: func(ctx context.Context, i int) error {
		probes <- i
		cancel()
		return errors.New("down")
	}}
	if err := m.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if len(probes) != 1 {
		t.Fatalf("probes = %d, want 1", len(probes))
	}
}

// TestSlowProbeWhileAnswering: a probe that times out while real requests
// to the same server are answered does not count; one that times out with
// no answer since the previous probe does, and so does a probe that fails
// outright.
func TestSlowProbeWhileAnswering(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var answering atomic.Bool
		var refuse atomic.Bool
		probed := make(chan struct{}, 100)
		m := &Monitor{Count: 1, Interval: 10 * time.Millisecond, Timeout: 20 * time.Millisecond, FailureThreshold: 1, SuccessThreshold: 1}
		m.Probe = func(ctx context.Context, i int) error {
			// Told as each probe starts: the loop has then judged the one
			// before.
			probed <- struct{}{}
			if refuse.Load() {
				return errors.New("readyz answered 500 Internal Server Error")
			}
			for ctx.Err() == nil { // a server too busy to answer /readyz in time
				if answering.Load() {
					m.ReportAnswer(i) // ... that answers the requests proxied meanwhile
				}
				time.Sleep(2 * time.Millisecond)
			}
			return ctx.Err()
		}
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() { _ = m.Run(ctx) })
		defer func() { cancel(); wg.Wait() }()
		// waitProbes waits until n probes more have started, so that n-1
		// started after the caller's change have been judged, with the one
		// under way at the change.
		waitProbes := func(n int) {
			for len(probed) > 0 {
				<-probed
			}
			for range n {
				select {
				case <-probed:
				case <-time.After(5 * time.Second):
					t.Fatal("no probe ran")
				}
			}
		}

		answering.Store(true)
		waitProbes(5)
		if !m.Healthy(0) {
			t.Fatal("slow probes while requests were answered marked the server unhealthy")
		}
		answering.Store(false)
		// The probe under way and the next may still be excused (an answer
		// came since the previous probe); the one after is not.
		waitProbes(4)
		if m.Healthy(0) {
			t.Fatal("probes timing out with no answer since the previous probe must mark the server unhealthy")
		}
		answering.Store(true)
		waitProbes(4)
		if m.Healthy(0) {
			t.Fatal("answers alone must not bring a server back; only good probes do")
		}
		refuse.Store(true)
		waitProbes(3)
		if m.Healthy(0) {
			t.Fatal("a probe that fails outright counts even while requests are answered")
		}
	})
}

// TestOldAnswerDoesNotExcuse: with a long interval, an answer long before
// a probe that times out does not excuse it; only answers within a probe
// timeout of its start, or during it, do.
func TestOldAnswerDoesNotExcuse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var probes atomic.Int32
		m := &Monitor{Count: 1, Interval: 300 * time.Millisecond, Timeout: 20 * time.Millisecond, FailureThreshold: 1, SuccessThreshold: 1}
		m.Probe = func(ctx context.Context, i int) error {
			if probes.Add(1) == 1 {
				return nil
			}
			<-ctx.Done() // every later probe times out
			return ctx.Err()
		}
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() { _ = m.Run(ctx) })
		defer func() { cancel(); wg.Wait() }()
		for probes.Load() < 1 {
			time.Sleep(time.Millisecond)
		}
		m.ReportAnswer(0) // right after the first probe: ~300 ms before the second
		deadline := time.Now().Add(5 * time.Second)
		for probes.Load() < 3 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if m.Healthy(0) {
			t.Fatal("a probe that timed out 300 ms after the last answer was excused")
		}
	})
}

// TestSlowProbeOfReachableServer: a probe that times out while a
// handshake with the server succeeds (a saturated apiserver, whose /readyz
// waits on etcd) is excused, at most MaxReachableExcuses times in a row;
// when the handshake fails too (a black-holed link), it counts at once.
func TestSlowProbeOfReachableServer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var reachable atomic.Bool
		var results sync.Mutex
		var got []ProbeResult
		m := &Monitor{Count: 1, Interval: 5 * time.Millisecond, Timeout: 40 * time.Millisecond, FailureThreshold: 1, SuccessThreshold: 1,
			Probe: func(ctx context.Context, i int) error { <-ctx.Done(); return ctx.Err() }, // /readyz never answers in time
			Reachable: func(ctx context.Context, i int) error {
				if reachable.Load() {
					return nil
				}
				<-ctx.Done()
				return ctx.Err()
			},
			OnProbe: func(i int, r ProbeResult) { results.Lock(); got = append(got, r); results.Unlock() },
		}
		reachable.Store(true)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() { _ = m.Run(ctx) })
		deadline := time.Now().Add(5 * time.Second)
		for {
			results.Lock()
			n := len(got)
			results.Unlock()
			if n >= MaxReachableExcuses+1 || time.Now().After(deadline) {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		cancel()
		wg.Wait()
		results.Lock()
		defer results.Unlock()
		if len(got) < MaxReachableExcuses+1 {
			t.Fatalf("only %d probes ran", len(got))
		}
		for k, r := range got[:MaxReachableExcuses] {
			if r != ProbeExcused {
				t.Fatalf("probe %d of a reachable server: %s, want excused (all: %v)", k, r, got)
			}
		}
		if r := got[MaxReachableExcuses]; r != ProbeFailed {
			t.Fatalf("probe %d in a row timing out: %s, want failed (all: %v)", MaxReachableExcuses+1, r, got)
		}

		// Black-holed: the handshake times out too, and the first probe counts.
		got = nil
		reachable.Store(false)
		m2 := &Monitor{Count: 1, Interval: 5 * time.Millisecond, Timeout: 40 * time.Millisecond, FailureThreshold: 1, SuccessThreshold: 1,
			Probe: m.Probe, Reachable: m.Reachable}
		done := make(chan ProbeResult, 1)
		m2.OnProbe = func(i int, r ProbeResult) {
			select {
			case done <- r:
			default:
			}
		}
		ctx2, cancel2 := context.WithCancel(context.Background())
		wg.Go(func() { _ = m2.Run(ctx2) })
		defer func() { cancel2(); wg.Wait() }()
		select {
		case r := <-done:
			if r != ProbeFailed {
				t.Fatalf("first probe of a black-holed server: %s, want failed", r)
			}
			// Counted before it changes the state: the change follows.
			for deadline := time.Now().Add(time.Second); m2.Healthy(0); time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("a failed probe did not mark the server unhealthy")
				}
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no probe ran")
		}
	})
}

// TestPingBetweenReadyProbes: a healthy server is pinged between probes,
// one probe each ReadyInterval; once a ping fails, only probes run until
// the server is healthy again, so that it comes back only once ready.
func TestPingBetweenReadyProbes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		var log []string
		pingOK, probeOK := true, true
		note := func(kind string, ok bool) error {
			mu.Lock()
			defer mu.Unlock()
			log = append(log, kind)
			if !ok {
				return errors.New(kind + " failed")
			}
			return nil
		}
		m := &Monitor{Count: 1, Interval: 10 * time.Millisecond, ReadyInterval: 100 * time.Millisecond, SuccessThreshold: 2,
			Probe: func(context.Context, int) error { mu.Lock(); ok := probeOK; mu.Unlock(); return note("probe", ok) },
			Ping:  func(context.Context, int) error { mu.Lock(); ok := pingOK; mu.Unlock(); return note("ping", ok) }}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- m.Run(ctx) }()
		counts := func() (probes, pings int) {
			mu.Lock()
			defer mu.Unlock()
			for _, k := range log {
				if k == "probe" {
					probes++
				} else {
					pings++
				}
			}
			log = log[:0]
			return probes, pings
		}
		time.Sleep(550 * time.Millisecond)
		if probes, pings := counts(); probes < 4 || probes > 8 || pings < 5*probes {
			t.Errorf("healthy for 550ms: %d probes and %d pings; want about one probe per 100ms and pings between", probes, pings)
		}

		mu.Lock()
		pingOK, probeOK = false, false
		mu.Unlock()
		if !waitOffline(m, time.Second) {
			t.Fatal("a failed ping did not mark the server down")
		}
		counts()
		time.Sleep(200 * time.Millisecond)
		if probes, pings := counts(); pings != 0 || probes < 5 {
			t.Errorf("while down: %d probes and %d pings; want probes only", probes, pings)
		}
		mu.Lock()
		pingOK, probeOK = true, true
		mu.Unlock()
		time.Sleep(200 * time.Millisecond)
		if !m.Online() {
			t.Fatal("not back online")
		}
		if probes, pings := counts(); probes < 2 || pings == 0 {
			t.Errorf("coming back: %d probes and %d pings; want two probes, then pings", probes, pings)
		}
		cancel()
		<-done
	})
}

func waitOffline(m *Monitor, within time.Duration) bool {
	for end := time.Now().Add(within); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if !m.Online() {
			return true
		}
	}
	return false
}
