package fleet

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"slices"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// A sample is the apiserver's own figures at one instant, read from its
// /metrics. Counters are cumulative; figures of a window are differences.
type sample struct {
	At time.Time
	// Watchers is the number of open watches, read from WatchMetric:
	// apiserver_registered_watchers, or where the apiserver no longer has
	// it apiserver_longrunning_requests{verb="WATCH"}.
	Watchers    float64
	WatchMetric string
	// Requests is apiserver_request_total summed (which counts a request
	// as it ends: a WATCH when it closes, so a window after an outage
	// counts the outage's dead watches closing, not the new ones), less the requests the
	// harness made itself (writes and churn; kube-apiserver does not count
	// the scrapes of /metrics); Lists, Watches and
	// Gone count those with verb LIST, verb WATCH and code 410.
	Requests, Lists, Watches, Gone float64
	// Probes counts the health checks among Requests (/readyz, /livez,
	// /healthz): outpost asks /readyz every --probe-ready-interval, and
	// every --probe-interval while an apiserver is not healthy (it pings
	// between).
	Probes float64
	// Reviews counts the SelfSubjectAccessReviews among Requests: the
	// watch cache asks one with a caller's own credentials per identity,
	// verb and scope every --watch-cache-recheck.
	Reviews float64
	// WatchLists counts the watches that began with the state
	// (sendInitialEvents=true, apiserver_watch_list_duration_seconds):
	// how client-go's informers re-list since WatchListClient is on by
	// default, so a full re-list is a LIST or a WatchList.
	WatchLists float64
	// Bytes is what the apiserver sent: the bodies of answers
	// (apiserver_response_sizes) and watch events
	// (apiserver_watch_events_sizes).
	Bytes float64
	// CPU is the apiserver's process_cpu_seconds_total; RSS its
	// process_resident_memory_bytes.
	CPU, RSS float64
	// Latency is apiserver_request_duration_seconds summed over every
	// verb but WATCH and CONNECT (long-running): cumulative counts by
	// upper bound, +Inf included.
	Latency map[float64]float64
	// ResourceLatency is the same without non-resource requests (health
	// probes of /readyz, which outposts send and direct clients do not):
	// like for like between the modes.
	ResourceLatency map[float64]float64
}

const (
	registeredWatchers = "apiserver_registered_watchers"
	longRunning        = "apiserver_longrunning_requests"
)

// scrape reads a sample from the apiserver.
func (c *cluster) scrape(ctx context.Context) (sample, error) {
	// Read first: the scrape itself is not yet in the figures it returns.
	own := float64(c.own.Load())
	at := time.Now()
	raw, err := c.scraper.Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		return sample{}, fmt.Errorf("reading the apiserver's metrics: %w", err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(raw))
	if err != nil {
		return sample{}, fmt.Errorf("parsing the apiserver's metrics: %w", err)
	}
	s := sample{At: at, Latency: map[float64]float64{}, ResourceLatency: map[float64]float64{}}
	each := func(name string, f func(m *dto.Metric, labels map[string]string)) {
		fam := fams[name]
		if fam == nil {
			return
		}
		for _, m := range fam.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			f(m, labels)
		}
	}
	// kube-apiserver 1.37 no longer exports apiserver_registered_watchers;
	// its stable gauge of open long-running requests counts the watches
	// its clients hold.
	if fams[registeredWatchers] != nil {
		s.WatchMetric = registeredWatchers
		each(registeredWatchers, func(m *dto.Metric, _ map[string]string) { s.Watchers += m.GetGauge().GetValue() })
	} else {
		s.WatchMetric = longRunning + `{verb="WATCH"}`
		each(longRunning, func(m *dto.Metric, l map[string]string) {
			if l["verb"] == "WATCH" {
				s.Watchers += m.GetGauge().GetValue()
			}
		})
	}
	each("apiserver_request_total", func(m *dto.Metric, l map[string]string) {
		v := m.GetCounter().GetValue()
		s.Requests += v
		switch l["verb"] {
		case "LIST":
			s.Lists += v
		case "WATCH":
			s.Watches += v
		}
		if l["code"] == "410" {
			s.Gone += v
		}
		if l["resource"] == "selfsubjectaccessreviews" {
			s.Reviews += v
		}
		if l["resource"] == "" && (l["subresource"] == "/readyz" || l["subresource"] == "/livez" || l["subresource"] == "/healthz") {
			s.Probes += v
		}
	})
	s.Requests -= own
	for _, name := range []string{"apiserver_response_sizes", "apiserver_watch_events_sizes"} {
		each(name, func(m *dto.Metric, _ map[string]string) { s.Bytes += m.GetHistogram().GetSampleSum() })
	}
	each("apiserver_watch_list_duration_seconds", func(m *dto.Metric, _ map[string]string) {
		s.WatchLists += float64(m.GetHistogram().GetSampleCount())
	})
	each("process_cpu_seconds_total", func(m *dto.Metric, _ map[string]string) { s.CPU += m.GetCounter().GetValue() })
	each("process_resident_memory_bytes", func(m *dto.Metric, _ map[string]string) { s.RSS += m.GetGauge().GetValue() })
	each("apiserver_request_duration_seconds", func(m *dto.Metric, l map[string]string) {
		if l["verb"] == "WATCH" || l["verb"] == "CONNECT" || l["verb"] == "WATCHLIST" {
			return
		}
		// The buckets end with +Inf, as the text format has it.
		for _, b := range m.GetHistogram().GetBucket() {
			s.Latency[b.GetUpperBound()] += float64(b.GetCumulativeCount())
			if l["resource"] != "" {
				s.ResourceLatency[b.GetUpperBound()] += float64(b.GetCumulativeCount())
			}
		}
	})
	if fams["apiserver_request_total"] == nil || fams["process_cpu_seconds_total"] == nil {
		return s, fmt.Errorf("the apiserver's metrics lack apiserver_request_total or process_cpu_seconds_total")
	}
	return s, nil
}

// A window is what happened between two samples.
type window struct {
	Seconds                        float64
	Requests, Lists, Watches, Gone float64
	Probes, WatchLists, Reviews    float64
	Bytes, CPU                     float64
	// Watchers and RSS are the later sample's.
	Watchers, RSS float64
	// P99 is the 99th percentile of the requests' latency in the window
	// (linear within a bucket, as Prometheus' histogram_quantile), NaN
	// when there were none.
	P99 time.Duration
	// ResourceP99 is P99 of resource requests only (no health probes).
	ResourceP99 time.Duration
}

func between(a, b sample) window {
	return window{
		Seconds:  b.At.Sub(a.At).Seconds(),
		Requests: b.Requests - a.Requests, Lists: b.Lists - a.Lists, Watches: b.Watches - a.Watches, Gone: b.Gone - a.Gone,
		WatchLists: b.WatchLists - a.WatchLists, Probes: b.Probes - a.Probes, Reviews: b.Reviews - a.Reviews, RSS: b.RSS,
		Bytes: b.Bytes - a.Bytes, CPU: b.CPU - a.CPU, Watchers: b.Watchers,
		P99: quantile(0.99, a.Latency, b.Latency), ResourceP99: quantile(0.99, a.ResourceLatency, b.ResourceLatency),
	}
}

// quantile returns quantile q of the observations between two cumulative
// histograms, or -1 when there were none.
func quantile(q float64, before, after map[float64]float64) time.Duration {
	bounds := make([]float64, 0, len(after))
	for ub := range after {
		bounds = append(bounds, ub)
	}
	slices.Sort(bounds)
	total := after[math.Inf(1)] - before[math.Inf(1)]
	if total <= 0 {
		return -1
	}
	rank := q * total
	prevBound, prevCount := 0.0, 0.0
	for _, ub := range bounds {
		count := after[ub] - before[ub]
		if count >= rank {
			if math.IsInf(ub, 1) {
				// Beyond the last finite bucket: say its bound, as
				// histogram_quantile does.
				return seconds(prevBound)
			}
			if count == prevCount {
				return seconds(ub)
			}
			return seconds(prevBound + (ub-prevBound)*(rank-prevCount)/(count-prevCount))
		}
		prevBound, prevCount = ub, count
	}
	return seconds(prevBound)
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
