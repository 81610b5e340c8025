package fleet

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// outpostSample is one outpost's own figures at one instant, read from its
// /metrics: what answered its clients and, with --watch-cache, what its
// shared streams hold and asked upstream. Counters are cumulative.
type outpostSample struct {
	// Answered counts the clients' requests as their answers began
	// (outpost_client_requests_total), by served_by: "upstream",
	// "watch-cache" (a shared stream), "cache" (offline), "outpost".
	Answered map[string]float64
	// Streams and Watchers are the shared streams open and the local
	// watches served from them (outpost_watchcache_streams and
	// outpost_watchcache_watchers); Bytes what the streams hold
	// (outpost_watchcache_bytes).
	Streams, Watchers, Bytes float64
	// Heap is the Go heap in use (go_memstats_heap_inuse_bytes).
	Heap float64
	// StreamLists and StreamWatches are the streams' own upstream requests
	// (outpost_watchcache_upstream_requests_total): whole fetches (LIST and
	// WatchList, which the apiserver's counters see as lists), and plain
	// watches (resumed from a resourceVersion).
	StreamLists, StreamWatches float64
	// FreshReads and CatchUps are what consistent WatchLists served from
	// streams cost upstream (verb current and catchup).
	FreshReads, CatchUps float64
	// Reviews are the access reviews made with callers' own credentials,
	// by result (outpost_watchcache_reviews_total): allowed, denied, error.
	Reviews map[string]float64
}

// servedBy are the values of outpost's served_by label the report reads.
var servedBy = []string{"upstream", "watch-cache", "cache", "outpost"}

// scrapeOutpost reads o's figures.
func scrapeOutpost(ctx context.Context, o *framework.Outpost) (outpostSample, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	raw, err := framework.GetOK(ctx, nil, o.AdminURL+"/metrics")
	if err != nil {
		return outpostSample{}, fmt.Errorf("metrics of outpost %s: %w", o.Node, err)
	}
	text := string(raw)
	s := outpostSample{Answered: map[string]float64{}, Reviews: map[string]float64{}}
	var errs []error
	sum := func(into *float64, name string, match ...string) {
		v, err := framework.SumMetric(text, name, match...)
		if err != nil {
			errs = append(errs, err)
		}
		*into = v
	}
	for _, by := range servedBy {
		var v float64
		sum(&v, "outpost_client_requests_total", "served_by="+by)
		s.Answered[by] = v
	}
	sum(&s.Streams, "outpost_watchcache_streams")
	sum(&s.Watchers, "outpost_watchcache_watchers")
	sum(&s.Bytes, "outpost_watchcache_bytes")
	sum(&s.Heap, "go_memstats_heap_inuse_bytes")
	sum(&s.StreamLists, "outpost_watchcache_upstream_requests_total", "verb=list")
	var watchLists float64
	sum(&watchLists, "outpost_watchcache_upstream_requests_total", "verb=watchlist")
	s.StreamLists += watchLists
	sum(&s.StreamWatches, "outpost_watchcache_upstream_requests_total", "verb=watch")
	sum(&s.FreshReads, "outpost_watchcache_upstream_requests_total", "verb=current")
	sum(&s.CatchUps, "outpost_watchcache_upstream_requests_total", "verb=catchup")
	for _, res := range []string{"allowed", "denied", "error"} {
		var v float64
		sum(&v, "outpost_watchcache_reviews_total", "result="+res)
		s.Reviews[res] = v
	}
	if len(errs) > 0 {
		return s, fmt.Errorf("metrics of outpost %s: %v", o.Node, errs[0])
	}
	return s, nil
}

// scrapeOutposts reads every running outpost's figures at once; a nil
// outpost, or one that did not answer, gets a nil entry.
func scrapeOutposts(ctx context.Context, outposts []*framework.Outpost) ([]*outpostSample, error) {
	out := make([]*outpostSample, len(outposts))
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	for i, o := range outposts {
		if o == nil {
			continue
		}
		wg.Go(func() {
			s, err := scrapeOutpost(ctx, o)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if first == nil {
					first = err
				}
				return
			}
			out[i] = &s
		})
	}
	wg.Wait()
	return out, first
}

// outpostWindow is what the fleet's outposts did between two scrapes of
// them all: sums over the nodes, and the gauges of the later scrape as a
// median and maximum per node.
type outpostWindow struct {
	Nodes                      int
	Answered                   map[string]float64
	StreamLists, StreamWatches float64
	// FreshReads and CatchUps are what consistent WatchLists served
	// from streams cost upstream: the read of the current version, and
	// the metadata-only WatchLists that brought quiet streams to it.
	FreshReads, CatchUps float64
	Reviews              map[string]float64
	// Streams, Watchers, Bytes and Heap are per node at the later
	// scrape: median and maximum.
	Streams, Watchers, Bytes, Heap [2]float64
}

// outpostsBetween sums the outposts' counters between a and b (the nodes
// read both times) and summarizes b's gauges.
func outpostsBetween(a, b []*outpostSample) outpostWindow {
	w := outpostWindow{Answered: map[string]float64{}, Reviews: map[string]float64{}}
	var streams, watchers, bytes, heap []float64
	for i := range b {
		if b[i] == nil {
			continue
		}
		streams = append(streams, b[i].Streams)
		watchers = append(watchers, b[i].Watchers)
		bytes = append(bytes, b[i].Bytes)
		heap = append(heap, b[i].Heap)
		if i >= len(a) || a[i] == nil {
			continue
		}
		w.Nodes++
		for k, v := range b[i].Answered {
			w.Answered[k] += v - a[i].Answered[k]
		}
		for k, v := range b[i].Reviews {
			w.Reviews[k] += v - a[i].Reviews[k]
		}
		w.StreamLists += b[i].StreamLists - a[i].StreamLists
		w.StreamWatches += b[i].StreamWatches - a[i].StreamWatches
		w.FreshReads += b[i].FreshReads - a[i].FreshReads
		w.CatchUps += b[i].CatchUps - a[i].CatchUps
	}
	w.Streams, w.Watchers, w.Bytes, w.Heap = medianMax(streams), medianMax(watchers), medianMax(bytes), medianMax(heap)
	return w
}

func medianMax(v []float64) [2]float64 {
	if len(v) == 0 {
		return [2]float64{}
	}
	s := slices.Sorted(slices.Values(v))
	return [2]float64{s[len(s)/2], s[len(s)-1]}
}

// keepLogs copies each outpost's log into dir/<mode>/<node>.log, so that
// what the outposts said outlives the control plane's temporary
// directory.
func keepLogs(dir, mode string, outposts []*framework.Outpost) error {
	into := filepath.Join(dir, "logs", mode)
	if err := os.MkdirAll(into, 0o755); err != nil {
		return err
	}
	for _, o := range outposts {
		if o == nil {
			continue
		}
		data, err := os.ReadFile(o.LogPath)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(into, o.Node+".log"), data, 0o644); err != nil {
			return err
		}
	}
	return nil
}
