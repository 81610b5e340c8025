// Package memory gives the memory outpost's Go heap no longer uses back to
// the system soon after the work that needed it, rather than minutes later.
//
// The Go runtime keeps freed heap mapped for a while in case the heap grows
// again, returning it to the system gradually. A burst of requests (an
// informer resync, 64 clients listing at once) or one large answer can leave
// tens of MB resident that way. On an edge node that memory belongs to the
// workloads, and bursts are followed by quiet (kubelet's steady state is a
// few requests every ten seconds and its watches), so outpost collects and
// returns the free heap once quiet: one garbage collection per burst.
package memory

import (
	"context"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync/atomic"
	"time"
)

// Releaser returns free heap to the system one quiet interval after
//   - the last short request ended, if the heap then holds at least
//     Threshold bytes more than its live data;
//   - the last large answer (see Large), whatever other requests do.
//
// Set the fields, then call Run once; Begin, End and Large are safe for
// concurrent use at any time.
type Releaser struct {
	// Quiet is how long after the last activity memory is released.
	// Default 1s.
	Quiet time.Duration
	// Threshold is how much more than its live data the heap must hold
	// for quiet after requests to release it. Default 8 MiB.
	Threshold uint64
	// Release returns memory to the system. Default: two garbage
	// collections (buffers in a sync.Pool, such as bbolt's pages, survive
	// one), then debug.FreeOSMemory. Tests replace it.
	Release func()
	// Held reports how many bytes of heap a release may return. Default:
	// from runtime/metrics, what the heap holds beyond its live data; when
	// the heap holds Threshold or more in all, after a garbage collection,
	// since live data measured by a collection during the burst would hide
	// the burst's garbage. Tests replace it.
	Held func() uint64
	// Released, if set, is told after each release why it ran:
	// ReasonQuiet or ReasonLarge.
	Released func(reason string)

	inFlight atomic.Int64 // short requests being served
	last     atomic.Int64 // when the last one ended, Unix ns
	large    atomic.Int64 // when the last large answer was made, Unix ns; 0 once released
}

// Begin records that a short request started: memory is not released while
// one is served.
func (r *Releaser) Begin() { r.inFlight.Add(1) }

// End records that a short request ended.
func (r *Releaser) End() {
	r.last.Store(time.Now().UnixNano())
	r.inFlight.Add(-1)
}

// LargeAnswer is the size from which an answer outpost decodes, stores or
// serves is worth reporting to Large: handling one takes several times its
// size in short-lived memory.
const LargeAnswer = 8 << 20

// Large records that an answer of several MB was decoded, stored or served:
// its memory is released one quiet interval later even if other requests
// keep coming.
func (r *Releaser) Large() { r.large.Store(time.Now().UnixNano()) }

// Why a release ran.
const (
	ReasonQuiet = "quiet" // quiet after requests, with enough heap held
	ReasonLarge = "large" // quiet after a large answer
)

// Run releases memory as the fields say until ctx is done.
func (r *Releaser) Run(ctx context.Context) error {
	quiet := r.Quiet
	if quiet <= 0 {
		quiet = time.Second
	}
	threshold := r.Threshold
	if threshold == 0 {
		threshold = 8 << 20
	}
	free, held := r.Release, r.Held
	if free == nil {
		free = func() {
			runtime.GC()
			debug.FreeOSMemory()
		}
	}
	release := func(reason string) {
		free()
		if r.Released != nil {
			r.Released(reason)
		}
	}
	if held == nil {
		held = func() uint64 { return heldBeyondLive(threshold) }
	}
	tick := time.NewTicker(quiet / 2)
	defer tick.Stop()
	var judged int64 // the end of the last request already judged
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		now := time.Now().UnixNano()
		if large := r.large.Load(); large != 0 && now-large >= int64(quiet) {
			r.large.CompareAndSwap(large, 0)
			release(ReasonLarge)
			judged = r.last.Load()
			continue
		}
		last := r.last.Load()
		if last == judged || now-last < int64(quiet) || r.inFlight.Load() > 0 {
			continue
		}
		judged = last
		if held() >= threshold {
			release(ReasonQuiet)
		}
	}
}

// heldBeyondLive is what the heap holds beyond its live data. When it
// holds threshold bytes or more in all, it collects first: live data
// measured by a collection that ran during a burst counts the burst's
// garbage as live, and would hide it.
func heldBeyondLive(threshold uint64) uint64 {
	total, live := heapHeld()
	if total >= threshold {
		runtime.GC()
		total, live = heapHeld()
	}
	return total - min(total, live)
}

// heapHeld is what the heap holds (objects, free and unused span space not
// yet returned to the system) and its live data as of the last collection.
func heapHeld() (total, live uint64) {
	s := []metrics.Sample{
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/unused:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
		{Name: "/gc/heap/live:bytes"},
	}
	metrics.Read(s)
	for _, m := range s[:3] {
		if m.Value.Kind() == metrics.KindUint64 {
			total += m.Value.Uint64()
		}
	}
	if s[3].Value.Kind() == metrics.KindUint64 {
		live = s[3].Value.Uint64()
	}
	return total, live
}
