// Package share_test proves the node watch cache (outpost --watch-cache)
// end to end on a real kube-apiserver: many client-go informers on one node
// share one upstream watch, as the apiserver's own metrics show; each gets
// every event in order, with no gap or duplicate, across a broken upstream
// watch, an apiserver restart and a cut link; a too-old resourceVersion
// gets 410 Gone as directly; identities with different RBAC never see each
// other's objects from a shared stream, also after a revoke; and offline
// the cache answers as before.
package share_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	os.Exit(framework.Run(m, framework.Options{}, &cp))
}

// apiserverWatches is the number of watches on resource the apiserver
// serves now, from its own /metrics.
func apiserverWatches(t *testing.T, resource string) float64 {
	t.Helper()
	raw, err := cp.Client().CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(t.Context())
	if err != nil {
		t.Fatalf("reading the apiserver's metrics: %v", err)
	}
	n, err := framework.SumMetric(string(raw), "apiserver_longrunning_requests", "verb=WATCH", "resource="+resource)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// recorder keeps what one informer's handlers saw after its first sync.
type recorder struct {
	mu     sync.Mutex
	events []string // "ADDED name rv", in order
	synced bool
}

func (r *recorder) add(typ string, obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	cm, ok := obj.(*corev1.ConfigMap)
	if !ok {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.synced {
		r.events = append(r.events, typ+" "+cm.Name+" "+cm.Data["v"])
	}
}

func (r *recorder) log() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

// watcher is one informer through outpost and what it saw.
type watcher struct {
	informer cache.SharedIndexInformer
	rec      *recorder
}

// startInformers starts n ConfigMap informers on ns through the client
// config made by newClient, each on its own connection, and waits until
// all synced.
func startInformers(t *testing.T, n int, ns string, client func() kubernetes.Interface) []*watcher {
	t.Helper()
	var ws []*watcher
	for range n {
		rec := &recorder{}
		factory := informers.NewSharedInformerFactoryWithOptions(client(), 0, informers.WithNamespace(ns))
		inf := factory.Core().V1().ConfigMaps().Informer()
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(o any) { rec.add("ADDED", o) },
			UpdateFunc: func(_, o any) { rec.add("MODIFIED", o) },
			DeleteFunc: func(o any) { rec.add("DELETED", o) },
		}); err != nil {
			t.Fatal(err)
		}
		ctx, stop := context.WithCancel(context.Background())
		t.Cleanup(func() {
			stop()
			factory.Shutdown()
		})
		factory.Start(ctx.Done())
		ws = append(ws, &watcher{informer: inf, rec: rec})
	}
	for _, w := range ws {
		if !cache.WaitForCacheSync(t.Context().Done(), w.informer.HasSynced) {
			t.Fatal("informer never synced")
		}
		w.rec.mu.Lock()
		w.rec.synced = true
		w.rec.mu.Unlock()
	}
	return ws
}

func createNamespace(t *testing.T, ns string) {
	t.Helper()
	if _, err := cp.Client().CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// writes makes a burst of changes in ns, each ConfigMap's data "v" naming
// its version, and returns what every watcher must have seen of them.
func writes(t *testing.T, ns, round string) []string {
	t.Helper()
	ctx := t.Context()
	c := cp.Client().CoreV1().ConfigMaps(ns)
	var want []string
	for i := range 4 {
		name := fmt.Sprintf("%s-%d", round, i)
		if _, err := c.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name}, Data: map[string]string{"v": "1"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		want = append(want, "ADDED "+name+" 1")
	}
	for i := range 2 {
		name := fmt.Sprintf("%s-%d", round, i)
		if _, err := c.Update(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name}, Data: map[string]string{"v": "2"}}, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		want = append(want, "MODIFIED "+name+" 2")
	}
	name := round + "-3"
	if err := c.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	want = append(want, "DELETED "+name+" 1")
	return want
}

// waitSeen waits until every watcher's log ends with want after what it
// held before (from), and fails on anything else: a missing event (gap),
// one seen twice, or out of order.
func waitSeen(t *testing.T, ws []*watcher, from []int, want []string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for i, w := range ws {
		for {
			got := w.rec.log()[from[i]:]
			if len(got) >= len(want) {
				if !slices.Equal(got, want) {
					t.Fatalf("informer %d saw\n  %s\nwant\n  %s", i, strings.Join(got, "\n  "), strings.Join(want, "\n  "))
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("informer %d saw only\n  %s\nwant\n  %s", i, strings.Join(got, "\n  "), strings.Join(want, "\n  "))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// eventually polls cond until it returns nil, failing t with its last
// error after timeout.
func eventually(t *testing.T, timeout time.Duration, cond func() error) {
	t.Helper()
	if _, err := framework.Poll(t.Context(), 200*time.Millisecond, timeout, func(context.Context) (bool, string) {
		if err := cond(); err != nil {
			return false, err.Error()
		}
		return true, ""
	}); err != nil {
		t.Fatal(err)
	}
}

// waitConverged waits until every watcher holds exactly what the
// apiserver holds in ns, and checks that none saw an event twice after
// from and that all saw the same events. It is what an apiserver restart
// allows: the restarted apiserver no longer has the versions the stream
// watched from (410 Gone), so outpost lists once and sends each watch the
// differences, where intermediate versions are folded, as direct
// informers see after their own re-list.
func waitConverged(t *testing.T, ws []*watcher, from []int, ns string) {
	t.Helper()
	list, err := cp.Client().CoreV1().ConfigMaps(ns).List(t.Context(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, cm := range list.Items {
		want = append(want, cm.Name+" "+cm.Data["v"])
	}
	slices.Sort(want)
	eventually(t, 60*time.Second, func() error {
		for i, w := range ws {
			var got []string
			for _, o := range w.informer.GetStore().List() {
				cm := o.(*corev1.ConfigMap)
				got = append(got, cm.Name+" "+cm.Data["v"])
			}
			slices.Sort(got)
			if !slices.Equal(got, want) {
				return fmt.Errorf("informer %d holds %v, the apiserver %v", i, got, want)
			}
		}
		return nil
	})
	first := ws[0].rec.log()[from[0]:]
	for i, w := range ws {
		got := w.rec.log()[from[i]:]
		seen := map[string]bool{}
		for _, e := range got {
			if seen[e] {
				t.Errorf("informer %d saw %q twice", i, e)
			}
			seen[e] = true
		}
		if !slices.Equal(got, first) {
			t.Errorf("informer %d saw\n  %s\ninformer 0\n  %s", i, strings.Join(got, "\n  "), strings.Join(first, "\n  "))
		}
	}
}

func marks(ws []*watcher) []int {
	var m []int
	for _, w := range ws {
		m = append(m, len(w.rec.log()))
	}
	return m
}

// TestInformersShareOneWatch starts eight informers of one service account
// through outpost and checks that the apiserver serves one watch for all
// of them, and that each sees every change in order, with no gap or
// duplicate, across a broken upstream connection, an apiserver restart and
// a cut link, without listing again.
func TestInformersShareOneWatch(t *testing.T) {
	const ns = "shared"
	createNamespace(t, ns)
	token := cp.ServiceAccountToken(t, ns, "agent", framework.ReaderRole)
	for i := range 5 {
		if _, err := cp.Client().CoreV1().ConfigMaps(ns).Create(t.Context(), &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("seed-%d", i)}, Data: map[string]string{"v": "0"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	before := apiserverWatches(t, "configmaps")
	o, link := cp.StartOutpostWithLinkT(t, "edge-share", "--watch-cache", "--probe-interval=500ms")
	ws := startInformers(t, 8, ns, func() kubernetes.Interface {
		return kubernetes.NewForConfigOrDie(o.ClientConfig("", "", token))
	})
	if got, err := o.Metric("outpost_watchcache_watchers"); err != nil || got != 8 {
		t.Fatalf("outpost serves %v shared watches (err %v), want 8", got, err)
	}
	eventually(t, 10*time.Second, func() error {
		if n := apiserverWatches(t, "configmaps") - before; n != 1 {
			return fmt.Errorf("the apiserver serves %v configmap watches for 8 informers, want 1", n)
		}
		return nil
	})
	served := func() float64 {
		n, err := o.Metric("outpost_watchcache_served_total", "verb=watch")
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	watchesServed := served()

	m := marks(ws)
	waitSeen(t, ws, m, writes(t, ns, "steady"))

	// The upstream connection breaks (as a load balancer resets it).
	link.Reset()
	link.Pass()
	m = marks(ws)
	waitSeen(t, ws, m, writes(t, ns, "reset"))

	// The apiserver restarts.
	if err := cp.StopAPIServer(0); err != nil {
		t.Fatal(err)
	}
	if err := cp.StartAPIServer(0); err != nil {
		t.Fatal(err)
	}
	m = marks(ws)
	writes(t, ns, "restart")
	waitConverged(t, ws, m, ns)

	// The link is cut long enough for outpost to go offline, with changes
	// made meanwhile, then comes back.
	link.Blackhole()
	if _, err := o.WaitState(t.Context(), "offline", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	m = marks(ws)
	want := writes(t, ns, "cut")
	link.Pass()
	if _, err := o.WaitState(t.Context(), "online", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	waitSeen(t, ws, m, want)

	if n := served(); n != watchesServed {
		t.Errorf("outpost served %v watches from shared streams after the faults, %v before: informers watched again", n, watchesServed)
	}
	eventually(t, 10*time.Second, func() error {
		if n := apiserverWatches(t, "configmaps") - before; n != 1 {
			return fmt.Errorf("after the faults the apiserver serves %v configmap watches for 8 informers, want 1", n)
		}
		return nil
	})
}
