package framework

import (
	"context"
	"fmt"
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
