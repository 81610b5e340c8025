package peer

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/internal/server"
)

// Site is this node's part in its site's peer checks: the probe endpoint,
// the probes of its peers, and its reports. Set the fields, then call Run
// once.
type Site struct {
	Config Config
	// Node is this node's name.
	Node string
	// Cert is this node's client certificate, presented both ways.
	Cert GetCertificate
	// CA is the cluster CA, which must have signed every peer's certificate.
	CA *x509.CertPool
	// Client reaches the cloud as this node.
	Client kubernetes.Interface
	// Online reports whether the cloud is reachable; nothing is written
	// while it is not.
	Online func() bool
	// Listener, if set, replaces the first listening on Config.Address
	// (tests).
	Listener net.Listener
	Metrics  *Metrics // may be nil
	Log      *slog.Logger

	// listen and retryFirst replace net.Listen on Config.Address and the
	// first delay before listening again (tests).
	listen     func() (net.Listener, error)
	retryFirst time.Duration
}

// Run serves probes, probes the peers and reports until ctx is done, and
// returns nil then: the peer checks are a side feature, and nothing in them
// stops the node's gateway. An address that cannot be bound (the site's
// interface not up yet at boot, the port taken) is retried with backoff;
// meanwhile the node reports no probe address, so that its peers do not
// probe it and say nothing about it rather than "unreachable".
func (s *Site) Run(ctx context.Context) error {
	cfg := s.Config.WithDefaults()
	p := &prober{cert: s.Cert, ca: s.CA, timeout: cfg.ProbeTimeout, fanout: cfg.Fanout, threshold: cfg.FailureThreshold}
	if s.Metrics != nil {
		p.observe = s.Metrics.probed
	}
	s.Log.Info("peer checks on", "address", cfg.Address, "siteLabel", cfg.SiteLabel, "namespace", cfg.Namespace,
		"probeInterval", cfg.ProbeInterval, "fanout", cfg.Fanout)

	var listening atomic.Bool
	var wg sync.WaitGroup
	wg.Go(func() { s.serve(ctx, cfg, &listening) })
	wg.Go(func() { every(ctx, cfg.ProbeInterval, func() { p.round(ctx) }) })
	wg.Go(func() {
		r := reporter{Site: s, cfg: cfg, p: p, listening: listening.Load}
		every(ctx, cfg.ReportInterval, func() { r.report(ctx) })
	})
	wg.Wait()
	return nil
}

// Backoff of listening on --peer-address again.
const (
	listenRetryFirst = time.Second
	listenRetryMax   = 30 * time.Second
)

// serve answers probes on cfg.Address until ctx is done, listening again
// with backoff whenever listening or serving fails. listening is true
// while probes are answered.
func (s *Site) serve(ctx context.Context, cfg Config, listening *atomic.Bool) {
	listen, retry := s.listen, s.retryFirst
	if listen == nil {
		listen = func() (net.Listener, error) { return net.Listen("tcp", cfg.Address) }
	}
	if retry <= 0 {
		retry = listenRetryFirst
	}
	backoff := retry
	problem := "" // the last problem logged, so that it is logged once
	for ctx.Err() == nil {
		ln, err := s.Listener, error(nil)
		s.Listener = nil // a given listener is used once
		if ln == nil {
			ln, err = listen()
		}
		if err == nil {
			if problem != "" {
				s.Log.Info("peer checks: listening on --peer-address again; peers may probe this node", "address", cfg.Address)
				problem = ""
			}
			srv := &server.Server{Name: "peer", Listener: ln, Handler: handler(s.Node), TLS: ServerTLS(s.Cert, s.CA),
				ShutdownTimeout: time.Second, Log: s.Log}
			listening.Store(true)
			s.Metrics.setListening(true)
			err = srv.Run(ctx)
			listening.Store(false)
			s.Metrics.setListening(false)
			if ctx.Err() != nil {
				return
			}
			if err == nil {
				err = errors.New("the probe server stopped")
			}
			backoff = retry
		}
		err = fmt.Errorf("listening on --peer-address %s: %w", cfg.Address, err)
		if msg := err.Error(); msg != problem {
			s.Log.Warn("peer checks: not answering probes; retrying with backoff (the node's report carries no probe address meanwhile, so its peers leave it out)", "err", err)
			problem = msg
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, listenRetryMax)
	}
}

// every calls f at once and then every d until ctx is done.
func every(ctx context.Context, d time.Duration, f func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		f()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// reporter writes this node's report and learns its peers from theirs.
type reporter struct {
	*Site
	cfg Config
	p   *prober
	// listening reports whether this node answers probes; nil means yes.
	listening func() bool
	problem   string // the last problem logged, so that it is logged once
}

func (r *reporter) report(ctx context.Context) {
	if !r.Online() {
		r.Metrics.reported("offline")
		return
	}
	err := r.exchange(ctx)
	if err != nil && ctx.Err() != nil {
		return // shutting down: says nothing about the cloud
	}
	if err != nil {
		r.Metrics.reported("error")
		if msg := err.Error(); msg != r.problem {
			r.Log.Warn("peer report not written; will retry", "err", err)
			r.problem = msg
		}
		return
	}
	if r.problem != "" {
		r.Log.Info("peer report written again")
		r.problem = ""
	}
	r.Metrics.reported("written")
}

// errNoSite: this node's Node has no site label.
var errNoSite = errors.New("this node has no site label")

// exchange writes this node's report and reads its peers' addresses,
// within one report interval.
func (r *reporter) exchange(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.ReportInterval)
	defer cancel()
	node, err := r.Client.CoreV1().Nodes().Get(ctx, r.Node, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("reading this node's site: %w", err)
	}
	site := node.Labels[r.cfg.SiteLabel]
	if site == "" {
		return fmt.Errorf("%w %s: no peers to check", errNoSite, r.cfg.SiteLabel)
	}
	now := time.Now()
	valid := 3 * r.cfg.ReportInterval
	// An observation counts while the report holds, or for two full turns
	// through the peers when a large site takes longer than that.
	window := max(valid, 2*time.Duration(r.p.rounds())*r.cfg.ProbeInterval)
	reachable, unreachable, all := r.p.seen(now.Add(-window))
	r.Metrics.peers(all, len(reachable), len(unreachable))
	// Not answering probes: no address, so that the peers stop probing
	// this node and report nothing about it, rather than "unreachable".
	addr := r.cfg.Address
	if r.listening != nil && !r.listening() {
		addr = ""
	}
	rep := Report{Observer: r.Node, Site: site, Address: addr, Reachable: reachable, Unreachable: unreachable,
		Renewed: now, Valid: valid}
	if err := r.write(ctx, rep); err != nil {
		return err
	}

	list, err := r.Client.CoordinationV1().Leases(r.cfg.Namespace).List(ctx, metav1.ListOptions{
		LabelSelector: labels.SelectorFromSet(labels.Set{LabelSite: site}).String(),
	})
	if err != nil {
		return fmt.Errorf("listing the reports of site %s: %w", site, err)
	}
	addrs := map[string]string{}
	for i := range list.Items {
		other, err := ParseReport(&list.Items[i])
		if err != nil || other.Observer == r.Node || other.Address == "" {
			continue
		}
		addrs[other.Observer] = other.Address
	}
	r.p.setPeers(addrs)
	return nil
}

func (r *reporter) write(ctx context.Context, rep Report) error {
	leases := r.Client.CoordinationV1().Leases(r.cfg.Namespace)
	lease, err := leases.Get(ctx, r.Node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		lease = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: r.Node, Namespace: r.cfg.Namespace}}
		rep.Apply(lease)
		_, err = leases.Create(ctx, lease, metav1.CreateOptions{FieldManager: "outpost"})
	} else if err == nil {
		rep.Apply(lease)
		_, err = leases.Update(ctx, lease, metav1.UpdateOptions{FieldManager: "outpost"})
	}
	switch {
	case apierrors.IsForbidden(err) || apierrors.IsNotFound(err):
		// Not this node's doing: the cluster lacks what deploy/ installs.
		return fmt.Errorf("writing report %s/%s: %w (is deploy/ applied: namespace.yaml, rbac.yaml, peer-reports.yaml?)", r.cfg.Namespace, r.Node, err)
	case err != nil:
		return fmt.Errorf("writing report %s/%s: %w", r.cfg.Namespace, r.Node, err)
	}
	return nil
}

// Metrics are the peer checks' Prometheus metrics.
type Metrics struct {
	probes  *prometheus.CounterVec
	reports *prometheus.CounterVec
	known   *prometheus.GaugeVec
	serving prometheus.Gauge
}

// NewMetrics registers the peer checks' metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		probes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_peer_probes_total",
			Help: "Probes of peers at this node's site, by result (reached, failed).",
		}, []string{"result"}),
		reports: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_peer_reports_total",
			Help: "Reports of what this node sees of its peers, by result (written, offline: not written while the cloud is unreachable, error).",
		}, []string{"result"}),
		known: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "outpost_peer_peers",
			Help: "Peers at this node's site as of the last report, by state (reachable, unreachable, unknown: not probed lately or not failed often enough yet).",
		}, []string{"state"}),
	}
	m.serving = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "outpost_peer_listening",
		Help: "1 while this node answers its peers' probes on --peer-address; 0 while it cannot listen there and retries (its report then carries no address, so its peers leave it out).",
	})
	reg.MustRegister(m.probes, m.reports, m.known, m.serving)
	for _, r := range []string{"reached", "failed"} {
		m.probes.WithLabelValues(r)
	}
	for _, r := range []string{"written", "offline", "error"} {
		m.reports.WithLabelValues(r)
	}
	return m
}

func (m *Metrics) probed(reached bool) {
	switch {
	case m == nil:
	case reached:
		m.probes.WithLabelValues("reached").Inc()
	default:
		m.probes.WithLabelValues("failed").Inc()
	}
}

func (m *Metrics) setListening(on bool) {
	switch {
	case m == nil:
	case on:
		m.serving.Set(1)
	default:
		m.serving.Set(0)
	}
}

func (m *Metrics) reported(result string) {
	if m != nil {
		m.reports.WithLabelValues(result).Inc()
	}
}

func (m *Metrics) peers(all, reachable, unreachable int) {
	if m == nil {
		return
	}
	m.known.WithLabelValues("reachable").Set(float64(reachable))
	m.known.WithLabelValues("unreachable").Set(float64(unreachable))
	m.known.WithLabelValues("unknown").Set(float64(all - reachable - unreachable))
}
