package framework

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// Poll calls cond every `every` until it reports true, and returns how long
// that took. Each call gets a context of at most 10 s. When timeout passes
// (or ctx ends) first, the error carries cond's last explanation.
func Poll(ctx context.Context, every, timeout time.Duration, cond func(ctx context.Context) (bool, string)) (time.Duration, error) {
	start := time.Now()
	last := ""
	for {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		ok, why := cond(cctx)
		cancel()
		if ok {
			return time.Since(start), nil
		}
		if why != "" {
			last = why
		}
		if time.Since(start) > timeout || ctx.Err() != nil {
			return 0, fmt.Errorf("not within %v: %s", timeout, last)
		}
		select {
		case <-ctx.Done():
		case <-time.After(every):
		}
	}
}

// WaitFor polls cond every 200 ms until it holds, failing the test with
// what was awaited when ctx's deadline passes, or at once when cond errs
// (the controller exited, a pod is gone: waiting longer would not help).
func WaitFor(ctx context.Context, t *testing.T, what string, cond func(ctx context.Context) (bool, error)) {
	t.Helper()
	deadline, ok := ctx.Deadline()
	if !ok {
		t.Fatalf("waiting for %s: the test's context has no deadline", what)
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	var condErr error
	_, err := Poll(ctx, 200*time.Millisecond, time.Until(deadline), func(ctx context.Context) (bool, string) {
		ok, err := cond(ctx)
		if err != nil {
			condErr = err
			stop() // Poll returns once ctx is done
		}
		return ok, ""
	})
	if condErr != nil {
		err = condErr
	}
	if err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}
