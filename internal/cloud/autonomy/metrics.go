package autonomy

import (
	"time"

	"github.com/outposthq/outpost/internal/cloud/csrapproval"
	"github.com/outposthq/outpost/internal/cloud/peerhealth"
	outpostmetrics "github.com/outposthq/outpost/internal/metrics"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/apimachinery/pkg/labels"
	corelisters "k8s.io/client-go/listers/core/v1"
)

// metrics are the controller's Prometheus metrics, in a registry of their
// own so that tests and several Runs in one process do not collide.
type metrics struct {
	registry *prometheus.Registry

	podPatches       *prometheus.CounterVec   // action, result
	reviews          *prometheus.CounterVec   // webhook, result
	reviewDuration   *prometheus.HistogramVec // webhook
	endpointsKept    prometheus.Counter
	csrDecisions     *prometheus.CounterVec // decision
	leader           prometheus.Gauge
	queueDepth       prometheus.GaugeFunc
	autonomousNodes  prometheus.GaugeFunc
	servingCertUntil prometheus.GaugeFunc
	peers            *peerhealth.Metrics
}

// Actions of the pod patch counter.
const (
	actionAutonomy = "autonomy" // tolerations set for an autonomous node
	actionRestore  = "restore"  // original tolerations restored
)

func newMetrics(nodes corelisters.NodeLister, queueLen func() int, certNotAfter func() time.Time) *metrics {
	const ns = "outpost_controller"
	m := &metrics{
		registry: prometheus.NewRegistry(),
		podPatches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Name: "pod_patches_total",
			Help: "Patches of pod tolerations, by action (autonomy, restore) and result (ok, error).",
		}, []string{"action", "result"}),
		reviews: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Name: "admission_reviews_total",
			Help: "Admission reviews answered, by webhook (pods, endpointslices) and result (patched, unchanged, error).",
		}, []string{"webhook", "result"}),
		reviewDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Name: "admission_review_duration_seconds",
			Help:    "Time to answer an admission review, by webhook.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"webhook"}),
		endpointsKept: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Name: "endpoints_kept_ready_total",
			Help: "EndpointSlice endpoints marked ready because their pod's autonomous node is unreachable.",
		}),
		csrDecisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Name: "csr_decisions_total",
			Help: "Outposts' serving CSRs for the in-cluster names of the apiserver decided, by decision (approved, denied).",
		}, []string{"decision"}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Name: "leader",
			Help: "1 while this replica holds the leader Lease and runs the toleration controller and the CSR approval.",
		}),
		queueDepth: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: ns, Name: "queue_depth",
			Help: "Pods waiting in the toleration controller's work queue.",
		}, func() float64 { return float64(queueLen()) }),
		autonomousNodes: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: ns, Name: "autonomous_nodes",
			Help: "Nodes whose annotations declare them autonomous.",
		}, func() float64 {
			list, err := nodes.List(labels.Everything())
			if err != nil {
				return 0
			}
			n := 0
			for _, node := range list {
				if p, _ := NodePolicy(node); p.Autonomous {
					n++
				}
			}
			return float64(n)
		}),
		servingCertUntil: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: ns, Name: "webhook_certificate_expiry_timestamp_seconds",
			Help: "Expiry of the webhook serving certificate, in seconds since the epoch; 0 before one is issued.",
		}, func() float64 {
			t := certNotAfter()
			if t.IsZero() {
				return 0
			}
			return float64(t.Unix())
		}),
	}
	m.registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.podPatches, m.reviews, m.reviewDuration, m.endpointsKept, m.csrDecisions, m.leader,
		m.queueDepth, m.autonomousNodes, m.servingCertUntil,
	)
	m.peers = peerhealth.NewMetrics(m.registry)
	return m
}

// observeReview returns the webhook.Handler.Observe hook of one webhook.
func (m *metrics) observeReview(name string) func(string, time.Duration) {
	return func(result string, d time.Duration) {
		m.reviews.WithLabelValues(name, result).Inc()
		m.reviewDuration.WithLabelValues(name).Observe(d.Seconds())
	}
}

// observeCSR is the csrapproval.Controller's decision hook.
func (m *metrics) observeCSR(v csrapproval.Verdict) {
	m.csrDecisions.WithLabelValues(v.String()).Inc()
}

// MetricNames are the names of every metric outpost-controller exports.
func MetricNames() []string {
	return outpostmetrics.DescribedNames(newMetrics(nil, nil, nil).registry)
}
