// Package edge proves outpost's promise at the edge end to end: with its
// link to the cloud cut, a node keeps working from outpost's cache — a real
// kubelet rebooted offline gets its pods back and keeps renewing its Lease,
// kwok's hundred pods stay listed — the edge keeps the state it had at the
// cut while the cloud changes, and once the link returns the edge converges
// to the cloud's truth.
//
// The link is cut with a framework.FaultProxy between outpost and the
// apiserver, which black-holes, resets or slows it at will, while the tests
// themselves keep talking to the apiserver directly to change the cloud and
// to see what reached it. Each test logs the figures it measures (FIGURE
// lines); TestMain prints them all at the end.
package edge

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	// No kube-controller-manager: nothing must evict, garbage-collect or
	// mark NotReady behind the tests' backs; EnsureNamespace does its part.
	code := framework.Run(m, framework.Options{}, &cp)
	printFigures()
	os.Exit(code)
}

// servedByHeader is how outpost marks an answer from its cache
// (internal/cache.ServedByHeader; the e2e tests see outpost as a black box).
const servedByHeader = "X-Outpost-Served-By"

// poll is how often the tests look again while waiting.
const poll = 100 * time.Millisecond

// An edge is outpost for one node, in front of a fault proxy to the
// apiserver.
type edge struct {
	node  string
	proxy *framework.FaultProxy
	o     *framework.Outpost
}

// startEdge starts a fault proxy to apiserver 0 and outpost for node
// behind it, logging at debug level, both stopped when the test ends (with
// outpost's log when the test failed), and waits until outpost is online.
func startEdge(t *testing.T, node string, args ...string) *edge {
	t.Helper()
	o, proxy := cp.StartOutpostWithLinkT(t, node, append([]string{"--log-level=debug"}, args...)...)
	return &edge{node: node, proxy: proxy, o: o}
}

// waitState waits until /readyz says want and returns how long that took.
func (e *edge) waitState(ctx context.Context, want string, timeout time.Duration) (time.Duration, error) {
	return e.o.WaitState(ctx, want, timeout)
}

// cut black-holes the link to the cloud, records how long until read
// through c was first answered from outpost's cache, and waits until
// outpost says it is offline. It returns when the link was cut.
func (e *edge) cut(t *testing.T, c *counted, read func(context.Context) error) time.Time {
	t.Helper()
	cutAt := time.Now()
	e.proxy.Blackhole()
	first, _ := firstCachedAnswer(t, c, cutAt, 15*time.Second, read)
	figure(t, "cut (black-hole) → first cached answer: %v", ms(first))
	if _, err := e.waitState(t.Context(), "offline", 15*time.Second); err != nil {
		t.Fatal(err)
	}
	return cutAt
}

// restore lets the link pass again, waits until outpost says it is online
// and records how long that took. It returns when the link was restored.
func (e *edge) restore(t *testing.T) time.Time {
	t.Helper()
	restoreAt := time.Now()
	e.proxy.Pass()
	online, err := e.waitState(t.Context(), "online", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	figure(t, "link back → outpost online: %v", ms(online))
	return restoreAt
}

// metric sums the samples of a counter or gauge on outpost's /metrics whose
// labels match every one of match (name=value, or name!=value).
func (e *edge) metric(t *testing.T, name string, match ...string) float64 {
	t.Helper()
	v, err := e.o.Metric(name, match...)
	if err != nil {
		t.Error(err)
	}
	return v
}

// localWrites counts writes of resource (e.g. "leases", "pods/status")
// that outpost answered itself with a 2xx: offline, the local answers to
// Lease, status and event writes.
func (e *edge) localWrites(t *testing.T, resource string) float64 {
	t.Helper()
	var n float64
	for _, verb := range []string{"create", "update", "patch"} {
		for _, code := range []string{"200", "201"} {
			n += e.metric(t, "outpost_requests_total", "resource="+resource, "verb="+verb, "served_by!=upstream", "code="+code)
		}
	}
	return n
}

// A counted client is a clientset through outpost that counts the answers
// outpost served from its cache.
type counted struct {
	kubernetes.Interface
	cached atomic.Int64
}

type countingTransport struct {
	rt http.RoundTripper
	c  *counted
}

func (t countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(r)
	if err == nil && resp.Header.Get(servedByHeader) == "cache" {
		t.c.cached.Add(1)
	}
	return resp, err
}

// WrappedRoundTripper lets client-go reach the transport below, to cancel
// requests.
func (t countingTransport) WrappedRoundTripper() http.RoundTripper { return t.rt }

func (e *edge) client(t *testing.T, certFile, keyFile, token string) *counted {
	t.Helper()
	c := &counted{}
	cfg := e.o.ClientConfig(certFile, keyFile, token)
	// Reads must answer quickly: a read that needs longer than this has
	// failed in all but name.
	cfg.Timeout = 10 * time.Second
	cfg.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { return countingTransport{rt: rt, c: c} }
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.Interface = cs
	return c
}

// nodeClient acts as the node's kubelet does, with its client certificate.
func (e *edge) nodeClient(t *testing.T) *counted {
	return e.client(t, e.o.NodeCertFile, e.o.NodeKeyFile, "")
}

// tokenClient acts as a service account whose token outpost forwards.
func (e *edge) tokenClient(t *testing.T, token string) *counted {
	return e.client(t, "", "", token)
}

// readerToken returns a token of service account default/name, which may
// read everything (framework.ReaderRole).
func readerToken(t *testing.T, name string) string {
	t.Helper()
	return cp.ServiceAccountToken(t, "default", name, framework.ReaderRole)
}

// nodeNamespace creates namespace ns, ready for pods, and a Node object
// called node that no kubelet runs (see framework.ControlPlane.CreateNode).
func nodeNamespace(t *testing.T, node, ns string) {
	t.Helper()
	if err := cp.EnsureNamespace(t.Context(), ns); err != nil {
		t.Fatal(err)
	}
	cp.CreateNode(t, node, nil)
}

// createConfigMaps creates the ConfigMaps prefix-0, ..., prefix-(n-1) in
// ns, labelled set=set, each with data v=v.
func createConfigMaps(t *testing.T, ns, prefix string, n int, set, v string) {
	t.Helper()
	for i := range n {
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s-%d", prefix, i), Labels: map[string]string{"set": set}},
			Data: map[string]string{"v": v}}
		if _, err := cp.Client().CoreV1().ConfigMaps(ns).Create(t.Context(), cm, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

// configMapInformer starts an informer through c on the ConfigMaps of ns
// that match the label selector sel, stopped when the test ends, waits
// until it has synced, and returns the state of what it holds, as
// configMapsState writes it, at each call.
func configMapInformer(t *testing.T, c kubernetes.Interface, ns, sel string) func() string {
	t.Helper()
	informer := framework.StartConfigMapInformer(t, c, ns, sel)
	return func() string {
		var cms []corev1.ConfigMap
		for _, o := range informer.GetStore().List() {
			cms = append(cms, *o.(*corev1.ConfigMap))
		}
		return configMapsState(cms)
	}
}

// listedConfigMaps is a read of the state of the ConfigMaps of ns that
// match the label selector sel, as c lists them.
func listedConfigMaps(c kubernetes.Interface, ns, sel string) func(context.Context) (string, error) {
	return func(ctx context.Context) (string, error) {
		l, err := c.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
		if err != nil {
			return "", err
		}
		return configMapsState(l.Items), nil
	}
}

// listedPods is a read of the state of the pods in all namespaces that
// match opts, as c lists them.
func listedPods(c kubernetes.Interface, opts metav1.ListOptions) func(context.Context) (string, error) {
	return func(ctx context.Context) (string, error) {
		l, err := c.CoreV1().Pods("").List(ctx, opts)
		if err != nil {
			return "", err
		}
		return podsState(l.Items), nil
	}
}

// firstCachedAnswer repeats read until outpost answers it from its cache
// and returns how long that took from start. A read that fails counts
// against the cache: it is reported, and the loop goes on.
func firstCachedAnswer(t *testing.T, c *counted, start time.Time, timeout time.Duration, read func(context.Context) error) (time.Duration, bool) {
	t.Helper()
	var failures []string
	defer func() {
		if len(failures) > 0 {
			t.Errorf("%d reads failed after the cut, before the first cached answer: %s", len(failures), strings.Join(failures, "; "))
		}
	}()
	for time.Since(start) < timeout {
		before := c.cached.Load()
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		err := read(ctx)
		cancel()
		if err != nil {
			failures = append(failures, fmt.Sprintf("at %v: %v", time.Since(start).Round(time.Millisecond), err))
			continue
		}
		if c.cached.Load() > before {
			return time.Since(start), true
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("no read was answered from outpost's cache within %v of the cut", timeout)
	return 0, false
}

// waitFor polls cond until it reports true and returns how long that took;
// at the deadline it fails the test with cond's last explanation.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func(ctx context.Context) (bool, string)) (time.Duration, bool) {
	t.Helper()
	d, err := framework.Poll(t.Context(), poll, timeout, cond)
	if err != nil {
		t.Errorf("%s: %v", what, err)
		return 0, false
	}
	return d, true
}

// objectState is the canonical text of a set of objects, one line per
// object "namespace/name rv=… <payload>", sorted, for exact comparisons.
func objectState[T any](items []T, line func(T) string) string {
	lines := make([]string, 0, len(items))
	for _, it := range items {
		lines = append(lines, line(it))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func configMapLine(c *corev1.ConfigMap) string {
	return fmt.Sprintf("%s/%s rv=%s labels=%v data=%v", c.Namespace, c.Name, c.ResourceVersion, c.Labels, c.Data)
}

func configMapsState(items []corev1.ConfigMap) string {
	return objectState(items, func(c corev1.ConfigMap) string { return configMapLine(&c) })
}

func podLine(p *corev1.Pod) string {
	return fmt.Sprintf("%s/%s uid=%s rv=%s labels=%v", p.Namespace, p.Name, p.UID, p.ResourceVersion, p.Labels)
}

func podsState(items []corev1.Pod) string {
	return objectState(items, func(p corev1.Pod) string { return podLine(&p) })
}

// diff describes how two canonical states differ, line by line.
func diff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var out []string
	for _, l := range w {
		if !slices.Contains(g, l) {
			out = append(out, "  missing: "+l)
		}
	}
	for _, l := range g {
		if !slices.Contains(w, l) {
			out = append(out, "  extra:   "+l)
		}
	}
	if len(out) == 0 {
		return "  (same lines, different order)"
	}
	return strings.Join(out, "\n")
}

// figures are the measurements of every test, printed at the end.
var figures struct {
	mu    sync.Mutex // guards lines
	lines []string
}

// figure logs a measured figure and keeps it for the summary.
func figure(t *testing.T, format string, args ...any) {
	t.Helper()
	line := t.Name() + ": " + fmt.Sprintf(format, args...)
	t.Log("FIGURE " + line)
	figures.mu.Lock()
	figures.lines = append(figures.lines, line)
	figures.mu.Unlock()
}

func printFigures() {
	figures.mu.Lock()
	defer figures.mu.Unlock()
	if len(figures.lines) == 0 {
		return
	}
	fmt.Fprintln(os.Stderr, "\n=== edge figures")
	for _, l := range figures.lines {
		fmt.Fprintln(os.Stderr, "  "+l)
	}
}

func ms(d time.Duration) time.Duration { return d.Round(time.Millisecond) }

// A milestone is a condition that must come to hold once.
type milestone struct {
	name string
	cond func(ctx context.Context) (bool, string)
}

// reach polls every milestone until each has held once, or until timeout,
// and returns when each first held, measured from since; each one missed
// fails the test with its last explanation. Polling them together keeps one
// slow milestone from inflating the figures of the others.
func reach(t *testing.T, since time.Time, timeout time.Duration, ms ...milestone) map[string]time.Duration {
	t.Helper()
	got := map[string]time.Duration{}
	last := map[string]string{}
	deadline := time.Now().Add(timeout)
	for len(got) < len(ms) {
		for _, m := range ms {
			if _, done := got[m.name]; done {
				continue
			}
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			ok, why := m.cond(ctx)
			cancel()
			if ok {
				got[m.name] = time.Since(since)
			}
			last[m.name] = why
		}
		if time.Now().After(deadline) || t.Context().Err() != nil {
			break
		}
		time.Sleep(poll)
	}
	for _, m := range ms {
		if _, done := got[m.name]; !done {
			t.Errorf("%s: not within %v: %s", m.name, timeout, last[m.name])
		}
	}
	return got
}
