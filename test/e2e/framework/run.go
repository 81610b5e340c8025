package framework

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Run is for TestMain: it starts a control plane into *cp, runs the tests,
// stops everything and returns the exit code for os.Exit. A control plane
// that cannot start fails the package with the reason, never skips it:
// an e2e suite that silently skips is one that silently stops testing.
//
// SIGINT and SIGTERM stop the control plane before the binary exits, since
// its processes live in their own process groups and a terminal's ^C does
// not reach them.
func Run(m *testing.M, opts Options, cp **ControlPlane) int {
	// m.Run would parse the flags too, but -v must be known before it.
	if !flag.Parsed() {
		flag.Parse()
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()

	var (
		mu          sync.Mutex // guards the two below
		started     *ControlPlane
		interrupted bool
	)
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigc)
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-done:
		case sig := <-sigc:
			cancel() // ends a Start in progress, which then cleans up
			mu.Lock()
			c := started
			interrupted = true
			mu.Unlock()
			if c != nil {
				fmt.Fprintf(os.Stderr, "e2e: %v: stopping control plane\n", sig)
				c.MarkFailed()
				c.Stop()
				os.Exit(1)
			}
		}
	}()

	defer removeOutpostBinary()
	defer removeControllerBinary()
	begin := time.Now()
	c, err := Start(ctx, opts)
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: FAIL: %v\n", err)
		return 1
	}
	// Stop even if m.Run panics outside a test; a panic inside a test kills
	// the binary, and the parent-death signal then kills the processes.
	defer c.Stop()
	mu.Lock()
	started = c
	late := interrupted // a signal between Start returning and now
	mu.Unlock()
	if late {
		fmt.Fprintln(os.Stderr, "e2e: interrupted while starting the control plane")
		c.MarkFailed()
		return 1
	}
	if testing.Verbose() {
		fmt.Fprintf(os.Stderr, "e2e: control plane ready in %v: %v (dir %s)\n", time.Since(begin).Round(time.Millisecond), c.URLs(), c.Dir)
	}
	*cp = c

	code := m.Run()
	if code != 0 {
		c.MarkFailed()
	}
	return code
}

// StartForTest starts a control plane owned by one test (for a test that
// needs a topology of its own, such as several apiservers) and stops it in
// t.Cleanup, keeping Dir on failure when OUTPOST_E2E_KEEP=1. A start error
// fails the test.
func StartForTest(t testing.TB, opts Options) *ControlPlane {
	t.Helper()
	c, err := Start(t.Context(), opts)
	if err != nil {
		t.Fatalf("starting control plane: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			c.MarkFailed()
		}
		c.Stop()
	})
	return c
}
