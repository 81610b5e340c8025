package health

import (
	"context"
	"errors"
	"testing"
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
