package csr

import (
	"context"
	"testing"
	"time"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// waitFor polls cond every 200 ms until it holds, failing the test with
// what was awaited when ctx's deadline passes, or at once when cond errs.
func waitFor(ctx context.Context, t *testing.T, what string, cond func(ctx context.Context) (bool, error)) {
	t.Helper()
	deadline, ok := ctx.Deadline()
	if !ok {
		t.Fatalf("waiting for %s: the test's context has no deadline", what)
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	var condErr error
	_, err := framework.Poll(ctx, 200*time.Millisecond, time.Until(deadline), func(ctx context.Context) (bool, string) {
		ok, err := cond(ctx)
		if err != nil {
			condErr = err
			stop()
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
