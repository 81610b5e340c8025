package memory

import (
	"context"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// run starts r with a 40 ms quiet interval, counting releases; held says
// what a release would return. Call it inside a synctest bubble.
func run(t *testing.T, r *Releaser, held *atomic.Uint64) *atomic.Int32 {
	t.Helper()
	var released atomic.Int32
	r.Quiet = 40 * time.Millisecond
	r.Threshold = 1000
	r.Release = func() { released.Add(1) }
	r.Held = func() uint64 { return held.Load() }
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	wg.Go(func() { _ = r.Run(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait() })
	return &released
}

// sleep lets d pass on the bubble's clock, then lets Run finish what it
// does at that instant (a tick may fall on it).
func sleep(d time.Duration) {
	time.Sleep(d)
	synctest.Wait()
}

func TestReleaseWhenQuietAfterRequests(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var held atomic.Uint64
		r := &Releaser{}
		released := run(t, r, &held)

		sleep(150 * time.Millisecond)
		if n := released.Load(); n != 0 {
			t.Fatalf("%d releases with no request at all", n)
		}

		// Requests that leave little behind: nothing to release.
		held.Store(10)
		r.Begin()
		r.End()
		sleep(150 * time.Millisecond)
		if n := released.Load(); n != 0 {
			t.Fatalf("%d releases for %d bytes held, under the threshold", n, held.Load())
		}

		// A burst that leaves a lot: released once quiet, and only once.
		held.Store(1 << 20)
		for range 5 {
			r.Begin()
			r.End()
		}
		sleep(200 * time.Millisecond)
		if n := released.Load(); n != 1 {
			t.Fatalf("%d releases after one burst; want 1", n)
		}

		// Not while a request is being served, however long it takes.
		r.Begin()
		r.Begin()
		r.End()
		sleep(150 * time.Millisecond)
		if n := released.Load(); n != 1 {
			t.Fatalf("released while a request was in flight (%d releases)", n)
		}
		r.End()
		sleep(150 * time.Millisecond)
		if n := released.Load(); n != 2 {
			t.Fatalf("%d releases once the last request ended; want 2", n)
		}
	})
}

func TestReleaseAfterLargeAnswerDespiteTraffic(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var held atomic.Uint64 // nothing held: only the large answer counts
		var reason atomic.Value
		r := &Releaser{Released: func(why string) { reason.Store(why) }}
		released := run(t, r, &held)

		r.Large()
		// Requests keep coming, never quiet for 40 ms.
		deadline := time.Now().Add(300 * time.Millisecond)
		for time.Now().Before(deadline) {
			r.Begin()
			r.End()
			sleep(5 * time.Millisecond)
		}
		if n := released.Load(); n != 1 {
			t.Fatalf("%d releases after one large answer under steady traffic; want 1", n)
		}
		if why := reason.Load(); why != ReasonLarge {
			t.Fatalf("release reported as %v; want %q", why, ReasonLarge)
		}
	})
}

// TestHeldBeyondLive: garbage and freed heap count as held, even when the
// last collection ran while it was still in use (during the burst); after
// a release they no longer count.
func TestHeldBeyondLive(t *testing.T) {
	const threshold = 8 << 20
	debug.FreeOSMemory()
	before := heldBeyondLive(threshold)
	var keep [][]byte
	for range 64 {
		keep = append(keep, make([]byte, 1<<20))
	}
	sink.Store(&keep)
	runtime.GC() // during the burst: 64 MiB live
	sink.Store(nil)
	keep = nil // now garbage
	if held := heldBeyondLive(threshold); held < before+48<<20 {
		t.Fatalf("held %d bytes after dropping 64 MiB (%d before)", held, before)
	}
	debug.FreeOSMemory()
	if held := heldBeyondLive(threshold); held > before+16<<20 {
		t.Fatalf("still held %d bytes after a release (%d before)", held, before)
	}
}

var sink atomic.Pointer[[][]byte]
