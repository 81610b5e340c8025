package peer

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// The reporter writes nothing while offline; online it writes its report
// Lease and learns its site's peers (not another site's, not itself) from
// theirs.
func TestReporterWritesOnlineAndLearnsPeers(t *testing.T) {
	node := func(name, zone string) *corev1.Node {
		return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{DefaultSiteLabel: zone}}}
	}
	report := func(name, site, addr string) *coordinationv1.Lease {
		l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: DefaultNamespace}}
		Report{Observer: name, Site: site, Address: addr, Renewed: time.Now(), Valid: time.Minute}.Apply(l)
		return l
	}
	client := fake.NewClientset(node("a", "s1"), report("b", "s1", "10.0.0.2:10269"), report("c", "s1", ""), report("d", "s2", "10.0.1.4:10269"))
	online := false
	cfg := Config{Address: "10.0.0.1:10269"}.WithDefaults()
	p := &prober{fanout: 3, threshold: 2}
	r := &reporter{Site: &Site{Node: "a", Client: client, Online: func() bool { return online }, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}, cfg: cfg, p: p}

	r.report(t.Context())
	if _, err := client.CoordinationV1().Leases(DefaultNamespace).Get(t.Context(), "a", metav1.GetOptions{}); err == nil {
		t.Fatal("a report was written while offline")
	}
	// b was reached lately, x failed twice: both reported once online.
	p.setPeers(map[string]string{"b": "10.0.0.2:10269", "x": "10.0.0.9:10269"})
	now := time.Now()
	p.record("b", "10.0.0.2:10269", true, now)
	p.record("x", "10.0.0.9:10269", false, now)
	p.record("x", "10.0.0.9:10269", false, now)
	online = true
	r.report(t.Context())
	if r.problem != "" {
		t.Fatalf("report failed: %s", r.problem)
	}
	l, err := client.CoordinationV1().Leases(DefaultNamespace).Get(t.Context(), "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseReport(l)
	if err != nil {
		t.Fatal(err)
	}
	if got.Site != "s1" || got.Address != cfg.Address || len(got.Reachable) != 1 || got.Reachable[0] != "b" ||
		len(got.Unreachable) != 1 || got.Unreachable[0] != "x" || got.Valid != 3*cfg.ReportInterval || !got.Fresh(time.Now()) {
		t.Errorf("report %+v", got)
	}
	// Peers now: b only (c has no address, d is at s2; x has no report).
	if _, _, all := p.seen(time.Time{}); all != 1 || p.peers["b"] == nil {
		t.Errorf("peers after the report: %v", p.peers)
	}
	// Written again: an update of the same Lease.
	r.report(t.Context())
	if r.problem != "" {
		t.Fatalf("second report failed: %s", r.problem)
	}
}

func TestReporterWithoutSiteLabel(t *testing.T) {
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "a"}})
	r := &reporter{Site: &Site{Node: "a", Client: client, Online: func() bool { return true }, Log: slog.New(slog.NewTextHandler(io.Discard, nil))},
		cfg: Config{Address: "10.0.0.1:1"}.WithDefaults(), p: &prober{}}
	r.report(t.Context())
	if r.problem == "" {
		t.Fatal("no problem reported for a node without a site label")
	}
	if _, err := client.CoordinationV1().Leases(DefaultNamespace).Get(t.Context(), "a", metav1.GetOptions{}); err == nil {
		t.Error("a report was written without a site")
	}
}

// An address that cannot be bound does not end Run (which would take the
// node's gateway down with it): Run listens again with backoff, reports no
// probe address meanwhile, answers probes once it can listen, and returns
// only when ctx is done.
func TestSiteRetriesListening(t *testing.T) {
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "a", Labels: map[string]string{DefaultSiteLabel: "s1"}}})
	var mu sync.Mutex
	failures := 2
	var bound net.Listener
	listened := make(chan struct{})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	s := &Site{
		Config: Config{Address: "10.0.0.1:10269", ReportInterval: 20 * time.Millisecond, ProbeInterval: time.Hour},
		Node:   "a", Client: client, Online: func() bool { return true },
		Metrics: NewMetrics(prometheus.NewRegistry()),
		Log:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		listen: func() (net.Listener, error) {
			mu.Lock()
			defer mu.Unlock()
			if failures > 0 {
				failures--
				return nil, errors.New("listen tcp 10.0.0.1:10269: bind: cannot assign requested address")
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err == nil {
				bound = ln
				close(listened)
			}
			return ln, err
		},
		retryFirst: 50 * time.Millisecond,
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()

	address := func() string {
		l, err := client.CoordinationV1().Leases(DefaultNamespace).Get(t.Context(), "a", metav1.GetOptions{})
		if err != nil {
			return "<none>"
		}
		return l.Annotations[AnnotationAddress]
	}
	// While it cannot listen, its report carries no address.
	deadline := time.After(10 * time.Second)
	for address() != "" {
		select {
		case err := <-done:
			t.Fatalf("Run returned %v while the address could not be bound", err)
		case <-deadline:
			t.Fatal("no report without an address while not listening")
		case <-time.After(10 * time.Millisecond):
		}
	}
	select {
	case err := <-done:
		t.Fatalf("Run returned %v while the address could not be bound", err)
	case <-listened:
	case <-time.After(10 * time.Second):
		t.Fatal("never listened again")
	}
	mu.Lock()
	addr := bound.Addr().String()
	mu.Unlock()
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatalf("not answering once listening: %v", err)
	}
	conn.Close()
	for address() != s.Config.Address {
		select {
		case <-deadline:
			t.Fatalf("report address %q once listening, want %q", address(), s.Config.Address)
		case <-time.After(10 * time.Millisecond):
		}
	}
	var m dto.Metric
	if err := s.Metrics.serving.Write(&m); err != nil || m.GetGauge().GetValue() != 1 {
		t.Errorf("outpost_peer_listening = %v (%v) while listening", m.GetGauge().GetValue(), err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after ctx was done")
	}
}
