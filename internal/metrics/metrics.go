// Package metrics defines outpost's Prometheus metrics in one place, so every
// name, label and bucket is visible together. All names start with outpost_.
package metrics

import (
	"regexp"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are the collectors of one outpost process.
type Metrics struct {
	// Requests counts finished requests by verb, resource, code and who
	// served them (upstream, cache, local).
	Requests *prometheus.CounterVec
	// ClientRequests counts finished requests by client (this node, each
	// service account, other users together) and what served them: proof
	// that in-cluster clients come through outpost and are answered from
	// the cache offline. Service accounts on one node are few.
	ClientRequests *prometheus.CounterVec
	// Duration observes request latency up to the end of the response for
	// ordinary requests and up to the response headers for long-running ones.
	Duration *prometheus.HistogramVec
	// InFlight counts requests being served, long-running ones by themselves.
	InFlight *prometheus.GaugeVec
	// ResponseBytes counts body bytes written to clients.
	ResponseBytes *prometheus.CounterVec
	// UpstreamHealthy is 1 for each apiserver currently judged healthy.
	UpstreamHealthy *prometheus.GaugeVec
	// UpstreamTransitions counts health state changes per apiserver.
	UpstreamTransitions *prometheus.CounterVec
	// UpstreamProbes counts health probes per apiserver by result (ok,
	// failed, or excused: timed out while the server answered requests).
	UpstreamProbes *prometheus.CounterVec
	// Online is 1 while at least one apiserver is healthy.
	Online prometheus.Gauge
	// AuthFailures counts rejected callers by reason.
	AuthFailures *prometheus.CounterVec

	// CacheLists counts views replaced by a recorded list (or object).
	CacheLists prometheus.Counter
	// CacheEvents counts recorded watch events written to the store.
	CacheEvents prometheus.Counter
	// CacheDropped counts recordings dropped, by reason; their views are
	// marked stale.
	CacheDropped *prometheus.CounterVec
	// CacheUnrecorded counts the same by the resource the answer was of
	// (group, version, resource), so an operator learns which reads will
	// not be served offline before the link drops.
	CacheUnrecorded *prometheus.CounterVec
	// CacheSkipped counts answers not copied for recording past their
	// start: the view held them already, or another copy at the same
	// resourceVersion was being recorded.
	CacheSkipped prometheus.Counter
	// RecordingBytes is what tees hold now, copying answers to record,
	// and RecordingBudget its bound (Recorder.MaxBuffered).
	RecordingBytes, RecordingBudget prometheus.Gauge
	// CacheErrors counts failed store writes.
	CacheErrors prometheus.Counter
	// MemoryReleases counts returns of free heap to the system, by reason
	// (see memory.Releaser).
	MemoryReleases *prometheus.CounterVec
	// CertRotations counts certificates renewed by CSR, by pair.
	CertRotations *prometheus.CounterVec
	// JournalEvents counts events journaled offline; JournalDropped those
	// dropped because the journal was full; JournalReplayed those delivered
	// after reconnect; JournalRejected those the apiserver refused (4xx) on
	// replay, dropped.
	JournalEvents, JournalDropped, JournalReplayed, JournalRejected prometheus.Counter

	// The node watch cache (package share): streams running, watches
	// served from them, the bytes they hold and their bound, answers
	// served by verb, the streams' own upstream requests by verb and code,
	// access reviews by result, and watches answered 410 Gone.
	WatchCacheStreams, WatchCacheWatchers, WatchCacheBytes, WatchCacheBudget prometheus.Gauge
	WatchCacheServed                                                         *prometheus.CounterVec
	WatchCacheUpstream                                                       *prometheus.CounterVec
	WatchCacheReviews                                                        *prometheus.CounterVec
	WatchCacheExpired                                                        prometheus.Counter
}

// New creates the collectors and registers them, with the Go and process
// collectors, on reg.
func New(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_requests_total",
			Help: "Requests served, by verb, resource, HTTP code and what served them.",
		}, []string{"verb", "resource", "code", "served_by"}),
		ClientRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_client_requests_total",
			Help: `Requests answered, counted as the answer begins (a watch may last for hours), by client ("node", "serviceaccount:<namespace>/<name>", "user" for other users, "anonymous") and what answered them.`,
		}, []string{"client", "served_by"}),
		Duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "outpost_request_duration_seconds",
			Help:    "Request latency (to the end of the body, or to the headers for watches and upgrades).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"verb", "resource", "served_by"}),
		InFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "outpost_inflight_requests",
			Help: "Requests being served, by kind (short or long-running).",
		}, []string{"kind"}),
		ResponseBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_response_bytes_total",
			Help: "Response body bytes written to clients, by what served them.",
		}, []string{"served_by"}),
		UpstreamHealthy: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "outpost_upstream_healthy",
			Help: "1 when the apiserver is judged healthy, else 0.",
		}, []string{"server"}),
		UpstreamTransitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_upstream_transitions_total",
			Help: "Health state changes of each apiserver, by the state entered.",
		}, []string{"server", "state"}),
		UpstreamProbes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_upstream_probes_total",
			Help: "Health probes of each apiserver, by result: ok, failed, or excused (timed out while the apiserver answered requests, so not counted).",
		}, []string{"server", "result"}),
		Online: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "outpost_online",
			Help: "1 while at least one apiserver is healthy.",
		}),
		AuthFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_authentication_failures_total",
			Help: "Callers rejected before proxying, by reason.",
		}, []string{"reason"}),
		CacheLists: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_cache_views_replaced_total",
			Help: "Views replaced by a recorded list or object.",
		}),
		CacheEvents: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_cache_watch_events_total",
			Help: "Recorded watch events written to the store.",
		}),
		CacheDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_cache_dropped_total",
			Help: "Recordings dropped (the view is marked stale), by reason.",
		}, []string{"reason"}),
		CacheUnrecorded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_cache_unrecorded_total",
			Help: "Answers of a resource that could not be recorded (their view is marked stale), by group, version, resource and reason.",
		}, []string{"group", "version", "resource", "reason"}),
		CacheSkipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_cache_answers_skipped_total",
			Help: "Answers not copied for recording past their start: the view held them already, or another copy at the same resourceVersion was being recorded.",
		}),
		RecordingBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "outpost_cache_recording_bytes",
			Help: "Bytes of answers held now while they are copied for recording.",
		}),
		RecordingBudget: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "outpost_cache_recording_budget_bytes",
			Help: "The bound on outpost_cache_recording_bytes (--recording-budget); past it copies are dropped and their views marked stale.",
		}),
		CacheErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_cache_write_errors_total",
			Help: "Failed writes to the store.",
		}),
	}
	m.MemoryReleases = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "outpost_memory_releases_total",
		Help: "Free heap returned to the system once quiet, by reason: quiet (after a burst of requests) or large (after a large answer).",
	}, []string{"reason"})
	m.CertRotations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "outpost_certificate_rotations_total",
		Help: "Certificates outpost renewed by CSR, by pair (node-client, node-serving).",
	}, []string{"name"})
	m.JournalEvents = prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_journal_events_total", Help: "Events journaled while offline."})
	m.JournalDropped = prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_journal_dropped_total", Help: "Journaled events dropped because the journal was full."})
	m.JournalReplayed = prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_journal_replayed_total", Help: "Journaled events delivered to the apiserver after reconnect."})
	m.JournalRejected = prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_journal_rejected_total", Help: "Journaled events the apiserver refused (4xx) on replay, dropped."})
	m.WatchCacheStreams = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_watchcache_streams", Help: "Shared upstream list+watch streams of the node watch cache."})
	m.WatchCacheWatchers = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_watchcache_watchers", Help: "Local watches served from shared streams."})
	m.WatchCacheBytes = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_watchcache_bytes", Help: "Bytes of objects and events the shared streams hold in memory."})
	m.WatchCacheBudget = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_watchcache_budget_bytes", Help: "Bound of outpost_watchcache_bytes (--watch-cache-size)."})
	m.WatchCacheServed = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_watchcache_served_total", Help: "Answers served from shared streams, by verb (list, watch)."}, []string{"verb"})
	m.WatchCacheUpstream = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_watchcache_upstream_requests_total", Help: "The shared streams' own requests to the apiserver, by verb (watchlist: the scope's objects then its changes; list; watch; current: the consistent read that gives a consistent WatchList the version to reach; catchup: a metadata-only WatchList that brings a quiet stream to it) and HTTP code."}, []string{"verb", "code"})
	m.WatchCacheReviews = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_watchcache_reviews_total", Help: "Access reviews made with callers' own credentials before serving them from shared streams, by result (allowed, denied, error)."}, []string{"result"})
	m.WatchCacheExpired = prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_watchcache_expired_total", Help: "Watches answered 410 Gone: their resourceVersion was older than what the shared stream keeps."})
	reg.MustRegister(m.WatchCacheStreams, m.WatchCacheWatchers, m.WatchCacheBytes, m.WatchCacheBudget, m.WatchCacheServed, m.WatchCacheUpstream, m.WatchCacheReviews, m.WatchCacheExpired)
	reg.MustRegister(m.MemoryReleases, m.CertRotations, m.JournalEvents, m.JournalDropped, m.JournalReplayed, m.JournalRejected, m.CacheLists, m.CacheEvents, m.CacheDropped, m.CacheUnrecorded, m.CacheErrors,
		m.CacheSkipped, m.RecordingBytes, m.RecordingBudget,
		m.Requests, m.ClientRequests, m.Duration, m.InFlight, m.ResponseBytes, m.UpstreamHealthy,
		m.UpstreamTransitions, m.UpstreamProbes, m.Online, m.AuthFailures,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// DescribedNames returns the names of the metrics c describes: what a
// scrape of it can show (a histogram adds _bucket, _sum and _count).
func DescribedNames(c prometheus.Collector) []string {
	ch := make(chan *prometheus.Desc)
	go func() {
		c.Describe(ch)
		close(ch)
	}()
	seen := map[string]bool{}
	for d := range ch {
		// A Desc says its name only in its String: Desc{fqName: "…", …}.
		if m := fqName.FindStringSubmatch(d.String()); m != nil {
			seen[m[1]] = true
		}
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

var fqName = regexp.MustCompile(`fqName: "([^"]+)"`)
