package chaos

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// servedByHeader marks an answer from outpost's cache; localWriteHeader one
// that outpost's local write policy gave (the e2e tests see outpost as a
// black box, so the names are repeated here).
const (
	servedByHeader   = "X-Outpost-Served-By"
	localWriteHeader = "X-Outpost-Local-Write"
)

// A client is a clientset through outpost that remembers how outpost
// answered its last request. Each client is used by one goroutine at a
// time, so "last" is that goroutine's last request.
type client struct {
	kubernetes.Interface
	last atomic.Pointer[string] // "cache", "local:<policy>" or "upstream"
}

type servedBy struct {
	rt http.RoundTripper
	c  *client
}

func (t servedBy) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(r)
	by := "upstream"
	if err != nil {
		by = ""
	} else if h := resp.Header.Get(servedByHeader); h != "" {
		by = h
	} else if h := resp.Header.Get(localWriteHeader); h != "" {
		by = "local:" + h
	}
	t.c.last.Store(&by)
	return resp, err
}

// WrappedRoundTripper lets client-go reach the transport below, to cancel
// requests.
func (t servedBy) WrappedRoundTripper() http.RoundTripper { return t.rt }

func newClient(t *testing.T, o *framework.Outpost, certFile, keyFile, token string) *client {
	t.Helper()
	c := &client{}
	cfg := o.ClientConfig(certFile, keyFile, token)
	// A read that needs longer than this has failed in all but name; a 2 s
	// latency fault costs 4 s a round trip.
	cfg.Timeout = 15 * time.Second
	cfg.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { return servedBy{rt: rt, c: c} }
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.Interface = cs
	return c
}

func (c *client) servedBy() string {
	if p := c.last.Load(); p != nil {
		return *p
	}
	return ""
}

// reads counts every read the clients made, by how it ended.
type reads struct {
	kubeconfig string // kubectl's, through outpost with the reader's token

	mu         sync.Mutex // guards the fields below
	total      int
	down       int // made while outpost was not running: not counted against it
	cached     int // answered from outpost's cache
	kubectl    int
	failures   []string  // each failed read: when, phase, what, error
	partial    []string  // offline lists that lacked a stable ConfigMap
	upstream   int       // answered by the apiserver through outpost
	rounds     int       // complete rounds of the reader
	roundStart time.Time // when the last complete round began
	lastDone   time.Time
	diskFull   struct{ reads, cached, failed int }
}

// read is the reader: a token client lists and gets ConfigMaps, the node
// lists its pods and gets itself, without pause, each read classified by
// the phase it ran in and by who answered it.
func (s *soak) read(ctx context.Context) {
	nodePods := metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String()}
	ops := []struct {
		name string
		c    *client
		do   func(ctx context.Context) error
	}{
		{"list configmaps", s.reader, func(ctx context.Context) error {
			l, err := s.reader.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
			if err == nil && s.reader.servedBy() == "cache" {
				s.checkComplete(l.Items)
			}
			return err
		}},
		{"get configmap", s.reader, func(ctx context.Context) error {
			_, err := s.reader.CoreV1().ConfigMaps(ns).Get(ctx, "stable-00", metav1.GetOptions{})
			return err
		}},
		{"list node's pods", s.lister, func(ctx context.Context) error {
			_, err := s.lister.CoreV1().Pods("").List(ctx, nodePods)
			return err
		}},
		{"get node", s.lister, func(ctx context.Context) error {
			_, err := s.lister.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
			return err
		}},
	}
	for ctx.Err() == nil {
		begun := time.Now()
		for _, op := range ops {
			before := s.phase.Load()
			start := time.Now()
			err := op.do(ctx)
			if ctx.Err() != nil {
				return
			}
			s.reads.record(s, op.name, before, s.phase.Load(), start, op.c.servedBy(), err)
		}
		s.reads.mu.Lock()
		s.reads.rounds++
		s.reads.roundStart, s.reads.lastDone = begun, time.Now()
		s.reads.mu.Unlock()
		sleep(ctx, 200*time.Millisecond)
	}
}

// checkComplete fails the soak when an offline list lacks a stable
// ConfigMap: those are never deleted, so every list must hold all of them.
func (s *soak) checkComplete(items []corev1.ConfigMap) {
	have := map[string]bool{}
	for _, cm := range items {
		have[cm.Name] = true
	}
	var missing []string
	for i := range stables {
		if n := fmt.Sprintf("stable-%02d", i); !have[n] {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		s.reads.mu.Lock()
		s.reads.partial = append(s.reads.partial, fmt.Sprintf("%v (%s): cached list of %d lacks %s",
			s.at(time.Now()).Round(time.Millisecond), s.phase.Load().name, len(items), strings.Join(missing, ",")))
		s.reads.mu.Unlock()
	}
}

func (r *reads) record(s *soak, op string, before, after *phase, start time.Time, by string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.total++
	if before.down || after.down {
		r.down++
		return
	}
	full := s.disk != nil && s.disk.isFull()
	if full {
		r.diskFull.reads++
	}
	if err != nil {
		if full {
			r.diskFull.failed++
		}
		r.failures = append(r.failures, fmt.Sprintf("%v (%s): %s after %v: %s", s.at(start).Round(time.Millisecond),
			after.name, op, time.Since(start).Round(time.Millisecond), explain(err)))
		return
	}
	if by == "cache" {
		r.cached++
		if full {
			r.diskFull.cached++
		}
	} else {
		r.upstream++
	}
}

// waitRound waits until the reader completes a round begun after since,
// and reports whether it did within timeout.
func (r *reads) waitRound(ctx context.Context, since time.Time, timeout time.Duration) bool {
	for end := time.Now().Add(timeout); ctx.Err() == nil && time.Now().Before(end); {
		r.mu.Lock()
		started := r.roundStart
		done := r.lastDone
		r.mu.Unlock()
		if started.After(since) && done.After(started) {
			return true
		}
		sleep(ctx, 100*time.Millisecond)
	}
	return false
}

// explain is an error's code and message, on one line.
func explain(err error) string {
	var st apierrors.APIStatus
	if errors.As(err, &st) {
		s := st.Status()
		return fmt.Sprintf("%d %s: %s", s.Code, s.Reason, s.Message)
	}
	return strings.ReplaceAll(err.Error(), "\n", " ")
}

// kubectl lists ConfigMaps through outpost with kubectl every few seconds.
func (s *soak) kubectl(ctx context.Context) {
	for ctx.Err() == nil {
		before := s.phase.Load()
		start := time.Now()
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := cp.Kubectl(rctx, s.reads.kubeconfig, "get", "configmaps", "-n", ns, "-l", sel, "-o", "name", "--request-timeout=15s")
		cancel()
		if ctx.Err() != nil {
			return
		}
		s.reads.mu.Lock()
		s.reads.kubectl++
		s.reads.mu.Unlock()
		// kubectl cannot say who answered; it counts as an upstream read.
		s.reads.record(s, "kubectl get configmaps", before, s.phase.Load(), start, "kubectl", err)
		sleep(ctx, 3*time.Second)
	}
}

// writes are what the node wrote through outpost, as kubelet does: events,
// numbered Node and pod statuses, Lease renewals.
type writes struct {
	mu       sync.Mutex // guards the fields below
	events   []string   // names of the events outpost accepted (2xx)
	local    int        // of them, journaled by outpost
	nodeSeq  int        // the last Node status sequence outpost accepted
	podSeq   int        // the same for the pod's status
	leases   int
	accepted map[string]int // by kind and who answered ("event upstream", "node status local:…")
	failures map[string]int // by kind, phase and error, counted
}

// write is the node: every second an event, a Node status and a pod status
// numbered in sequence, and a Lease renewal.
func (s *soak) write(ctx context.Context) {
	w := &s.writes
	w.accepted, w.failures = map[string]int{}, map[string]int{}
	c := s.writer
	var lease *coordinationv1.Lease
	for seq := 1; ctx.Err() == nil; seq++ {
		ev := &corev1.Event{
			ObjectMeta:     metav1.ObjectMeta{Name: fmt.Sprintf("ev-%06d", seq)},
			InvolvedObject: corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: statusPod, APIVersion: "v1"},
			Reason:         "Chaos", Message: fmt.Sprintf("event %d", seq), Type: corev1.EventTypeNormal,
			Source: corev1.EventSource{Component: "kubelet", Host: node}, Count: 1,
			FirstTimestamp: metav1.Now(), LastTimestamp: metav1.Now(),
		}
		_, err := c.CoreV1().Events(ns).Create(ctx, ev, metav1.CreateOptions{})
		s.wrote(ctx, "event", err, func() { w.events = append(w.events, ev.Name) })

		patch := statusPatch("ChaosSeq", seq)
		_, err = c.CoreV1().Nodes().PatchStatus(ctx, node, patch)
		s.wrote(ctx, "node status", err, func() { w.nodeSeq = seq })

		_, err = c.CoreV1().Pods(ns).Patch(ctx, statusPod, types.StrategicMergePatchType, statusPatch("chaos.outpost.io/seq", seq), metav1.PatchOptions{}, "status")
		s.wrote(ctx, "pod status", err, func() { w.podSeq = seq })

		// As kubelet's lease controller: update the Lease it holds, and
		// read it again only when that fails.
		leases := c.CoordinationV1().Leases(corev1.NamespaceNodeLease)
		if lease == nil {
			lease, err = leases.Get(ctx, node, metav1.GetOptions{})
			s.wrote(ctx, "lease get", err, nil)
			if err != nil {
				lease = nil
			}
		}
		if lease != nil {
			lease.Spec.RenewTime = &metav1.MicroTime{Time: time.Now()}
			updated, err := leases.Update(ctx, lease, metav1.UpdateOptions{})
			s.wrote(ctx, "lease update", err, func() { w.leases++ })
			lease = updated
			if err != nil {
				lease = nil
			}
		}
		sleep(ctx, time.Second)
	}
}

// statusPatch sets a condition of type typ whose message is seq.
func statusPatch(typ string, seq int) []byte {
	return fmt.Appendf(nil, `{"status":{"conditions":[{"type":%q,"status":"True","reason":"Chaos","message":"%d","lastTransitionTime":%q}]}}`,
		typ, seq, time.Now().UTC().Format(time.RFC3339))
}

// wrote records a write's outcome; ok runs under the lock when it was
// accepted.
func (s *soak) wrote(ctx context.Context, kind string, err error, ok func()) {
	if ctx.Err() != nil {
		return
	}
	w := &s.writes
	by := s.writer.servedBy()
	ph := s.phase.Load()
	w.mu.Lock()
	defer w.mu.Unlock()
	if err != nil {
		phase := ph.name
		if ph.down {
			phase = "outpost down"
		}
		w.failures[fmt.Sprintf("%s | %s | %s", kind, phase, shorten(explain(err)))]++

		return
	}
	w.accepted[kind+" "+by]++
	if kind == "event" && strings.HasPrefix(by, "local:") {
		w.local++
	}
	if ok != nil {
		ok()
	}
}

// shorten keeps an error's kind, not the details that differ each time.
func shorten(s string) string {
	s = eventName.ReplaceAllString(s, "ev-N")
	s = faultNumber.ReplaceAllString(s, "#N")
	for _, cut := range []string{"(Client.Timeout", "dial tcp", "read tcp", "write tcp", "http2:"} {
		if i := strings.Index(s, cut); i >= 0 {
			s = s[:i+len(cut)] + "…"
			break
		}
	}
	if len(s) > 160 {
		s = s[:160] + "…"
	}
	return s
}

var (
	eventName   = regexp.MustCompile(`ev-[0-9]+`)
	faultNumber = regexp.MustCompile(`#[0-9]+`)
)

// mutate is the cloud changing all along, straight at the apiserver:
// stable ConfigMaps patched, churn created and deleted. It holds still
// while convergence is being checked (paused).
func (s *soak) mutate(ctx context.Context) {
	rng := rand.New(rand.NewPCG(s.cfg.seed, 1))
	var churn []string
	for i := 0; ctx.Err() == nil; i++ {
		sleep(ctx, 300*time.Millisecond)
		if s.paused.Load() {
			continue
		}
		cms := s.admin.CoreV1().ConfigMaps(ns)
		switch op := rng.IntN(4); {
		case op < 2:
			name := fmt.Sprintf("stable-%02d", rng.IntN(stables))
			_, _ = cms.Patch(ctx, name, types.MergePatchType, fmt.Appendf(nil, `{"data":{"v":"%d"}}`, i), metav1.PatchOptions{})
		case op == 2 || len(churn) == 0:
			name := fmt.Sprintf("churn-%d", i)
			cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"set": "chaos"}}, Data: map[string]string{"v": strconv.Itoa(i)}}
			if _, err := cms.Create(ctx, cm, metav1.CreateOptions{}); err == nil {
				churn = append(churn, name)
			}
		default:
			j := rng.IntN(len(churn))
			if err := cms.Delete(ctx, churn[j], metav1.DeleteOptions{}); err == nil || apierrors.IsNotFound(err) {
				churn = append(churn[:j], churn[j+1:]...)
			}
		}
	}
}

// configMapInformer is an informer through outpost on the soak's
// ConfigMaps, as an operator on the node would run.
type configMapInformer struct {
	informer cache.SharedIndexInformer
}

func startInformer(t *testing.T, c *client) *configMapInformer {
	t.Helper()
	return &configMapInformer{informer: framework.StartConfigMapInformer(t, c, ns, sel)}
}

// state is the informer's objects as configMapsState writes them.
func (i *configMapInformer) state() string {
	var cms []corev1.ConfigMap
	for _, o := range i.informer.GetStore().List() {
		cms = append(cms, *o.(*corev1.ConfigMap))
	}
	return configMapsState(cms)
}

// configMapsState is the canonical text of ConfigMaps, one sorted line each
// with name, resourceVersion and data, for exact comparisons.
func configMapsState(items []corev1.ConfigMap) string {
	lines := make([]string, 0, len(items))
	for _, c := range items {
		lines = append(lines, fmt.Sprintf("%s rv=%s data=%v", c.Name, c.ResourceVersion, c.Data))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
