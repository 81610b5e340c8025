package hub

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outposthq/outpost/internal/converge"
	"github.com/outposthq/outpost/internal/health"
	"github.com/outposthq/outpost/internal/local"
	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/peer"
	"github.com/outposthq/outpost/internal/recorder"
	"github.com/outposthq/outpost/internal/report"
	"github.com/outposthq/outpost/internal/version"
)

// probeLog keeps each apiserver's last probe, and why it last turned
// unhealthy, for /status.
type probeLog struct {
	mu   sync.Mutex // guards last
	last []report.Apiserver
}

func (p *probeLog) init(names []string) {
	p.last = make([]report.Apiserver, len(names))
	for i, n := range names {
		p.last[i].URL = n
	}
}

func (p *probeLog) probed(i int, result health.ProbeResult) {
	p.mu.Lock()
	p.last[i].LastProbe, p.last[i].LastResult = time.Now(), string(result)
	p.mu.Unlock()
}

func (p *probeLog) changed(i int, healthy bool, err error) {
	if healthy || err == nil {
		return
	}
	p.mu.Lock()
	p.last[i].LastError = err.Error()
	p.mu.Unlock()
}

func (p *probeLog) snapshot() []report.Apiserver {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]report.Apiserver(nil), p.last...)
}

// readiness is what /readyz and /status say: the state, whether outpost
// can serve (online, or offline with a cache), and the views it holds.
func (h *Hub) readiness() (state string, ready bool, views int) {
	_, views, err := h.store.Stats()
	if err != nil {
		views = 0
	}
	switch {
	case h.monitor.Online() && h.monitor.Reached():
		return report.Online, true, views
	case h.monitor.Online():
		return report.Starting, views > 0, views
	}
	return report.Offline, views > 0, views
}

// report assembles /status.
func (h *Hub) report(conv *converge.Converger, writes *local.Writer, rec *recorder.Recorder) report.Report {
	state, ready, _ := h.readiness()
	since, last := conv.Status()
	r := report.Report{Version: version.Version, Node: h.cfg.NodeName, State: state, Since: since, Ready: ready, LastReconnect: last,
		Apiservers: h.probes.snapshot(), Certificates: h.certificates(), Unrecorded: []report.Unrecorded{}}
	for i := range r.Apiservers {
		r.Apiservers[i].Healthy = h.monitor.Healthy(i)
	}
	s := &r.Store
	s.Path = h.store.Path()
	if fi, err := os.Stat(s.Path); err == nil {
		s.Bytes = fi.Size()
	}
	s.Objects, s.Views, _ = h.store.Stats()
	s.ByResource, s.ByIdentity = map[string]int{}, map[string]int{}
	if views, err := h.store.AllViews(); err == nil {
		for _, v := range views {
			s.ByResource[v.Key.Resource]++
			s.ByIdentity[v.Key.Identity]++
			if v.Stale {
				s.StaleViews++
			}
		}
	}
	r.Journal.Depth, r.Journal.Max, r.Journal.Dropped = writes.Journal()
	for _, u := range rec.Unrecorded() {
		r.Unrecorded = append(r.Unrecorded, report.Unrecorded{Resource: u.Resource, Reason: u.Reason, Error: u.Error, Count: u.Count, Last: u.Last})
	}
	return r
}

// certificates are the node client certificate outpost uses upstream and
// the serving certificate local clients verify, those it holds now.
func (h *Hub) certificates() []report.Certificate {
	var out []report.Certificate
	add := func(name string, c *x509.Certificate) {
		if c != nil {
			out = append(out, report.Certificate{Name: name, Subject: c.Subject.String(), NotAfter: c.NotAfter})
		}
	}
	switch {
	case h.nodeCert != nil:
		add(nodeClientName, leaf(h.nodeCert.Current()))
	case len(h.restCfg.CertData) > 0:
		add(nodeClientName, firstCertificate(h.restCfg.CertData))
	case h.restCfg.CertFile != "":
		if data, err := os.ReadFile(h.restCfg.CertFile); err == nil {
			add(nodeClientName, firstCertificate(data))
		}
	}
	switch {
	case h.serving != nil && h.serving.Current() != nil:
		add("serving", leaf(h.serving.Current()))
	case h.tls != nil && len(h.tls.Certificates) > 0:
		add("serving", leaf(&h.tls.Certificates[0]))
	}
	return out
}

func leaf(c *tls.Certificate) *x509.Certificate {
	if c == nil {
		return nil
	}
	if c.Leaf != nil {
		return c.Leaf
	}
	if len(c.Certificate) == 0 {
		return nil
	}
	l, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		return nil
	}
	return l
}

// firstCertificate parses the first certificate of a PEM bundle.
func firstCertificate(data []byte) *x509.Certificate {
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			return nil
		}
		if strings.Contains(b.Type, "CERTIFICATE") {
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil
			}
			return c
		}
	}
}

// statusCollector exports, at each scrape, the gauges of what /status
// reports that no counter says: the cache's size, objects, views and stale
// views, the journal's depth, and when each certificate expires. Alerts
// (deploy/monitoring) read them.
type statusCollector struct {
	h      *Hub
	writes *local.Writer
}

var (
	descCacheObjects = prometheus.NewDesc("outpost_cache_objects", "Objects in the cache.", nil, nil)
	descCacheViews   = prometheus.NewDesc("outpost_cache_views", "Views in the cache, by state (fresh, stale: a recorded answer was dropped, or only a watch filled it).", []string{"state"}, nil)
	descCacheBytes   = prometheus.NewDesc("outpost_cache_size_bytes", "Size of the cache file.", nil, nil)
	descJournal      = prometheus.NewDesc("outpost_journal_depth", "Events journaled offline and not yet replayed.", nil, nil)
	descCertExpiry   = prometheus.NewDesc("outpost_certificate_expiry_timestamp_seconds", "When a certificate outpost holds expires, by name (node-client, serving).", []string{"name"}, nil)
)

func (c statusCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCacheObjects, descCacheViews, descCacheBytes, descJournal, descCertExpiry} {
		ch <- d
	}
}

func (c statusCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.h.store
	if objects, _, err := st.Stats(); err == nil {
		ch <- prometheus.MustNewConstMetric(descCacheObjects, prometheus.GaugeValue, float64(objects))
	}
	if views, err := st.AllViews(); err == nil {
		stale := 0
		for _, v := range views {
			if v.Stale {
				stale++
			}
		}
		ch <- prometheus.MustNewConstMetric(descCacheViews, prometheus.GaugeValue, float64(len(views)-stale), "fresh")
		ch <- prometheus.MustNewConstMetric(descCacheViews, prometheus.GaugeValue, float64(stale), "stale")
	}
	if fi, err := os.Stat(st.Path()); err == nil {
		ch <- prometheus.MustNewConstMetric(descCacheBytes, prometheus.GaugeValue, float64(fi.Size()))
	}
	depth, _, _ := c.writes.Journal()
	ch <- prometheus.MustNewConstMetric(descJournal, prometheus.GaugeValue, float64(depth))
	for _, cert := range c.h.certificates() {
		ch <- prometheus.MustNewConstMetric(descCertExpiry, prometheus.GaugeValue, float64(cert.NotAfter.Unix()), cert.Name)
	}
}

// MetricNames are the names of every metric outpost exports.
func MetricNames() []string {
	reg := prometheus.NewRegistry()
	metrics.New(reg)
	peer.NewMetrics(reg)
	reg.MustRegister(statusCollector{})
	return metrics.DescribedNames(reg)
}
