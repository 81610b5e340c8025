package proxy_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestInformerSurvivesApiserverLoss: two apiservers behind outpost; the one
// outpost prefers is lost while an informer watches through outpost: it
// stops (and closes its connections), or its link black-holes (nothing
// closes: outpost must notice, and close its connections to it so that
// watches re-establish on the other). The informer keeps receiving events,
// within seconds, and reads keep succeeding, answered by an apiserver.
func TestInformerSurvivesApiserverLoss(t *testing.T) {
	for _, loss := range []string{"stopped", "black-holed"} {
		t.Run(loss, func(t *testing.T) { informerSurvives(t, loss) })
	}
}

func informerSurvives(t *testing.T, loss string) {
	ctx := t.Context()
	first, lose := cp.URL(0), func() {
		t.Cleanup(func() {
			if err := cp.StartAPIServer(0); err != nil {
				t.Errorf("restarting apiserver 0: %v", err)
			}
		})
		if err := cp.StopAPIServer(0); err != nil {
			t.Fatal(err)
		}
	}
	if loss == "black-holed" {
		link, err := framework.StartFaultProxy(cp.URL(0))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = link.Close() })
		first, lose = link.URL(), link.Blackhole
	}
	o := cp.StartOutpostT(t, "edge-failover-"+strings.ReplaceAll(loss, "-", ""), "--server="+first, "--server="+cp.URL(1), "--lb-mode=priority")
	token := adminToken(t)
	client := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", token))
	direct1cfg := cp.AdminConfig()
	direct1cfg.Host = cp.URL(1)
	direct1 := kubernetes.NewForConfigOrDie(direct1cfg)

	ns := "failover-" + loss
	createNamespace(t, ns)

	var mu sync.Mutex
	seen := map[string]bool{}
	factory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(ns))
	inf := factory.Core().V1().ConfigMaps().Informer()
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: func(obj any) {
		mu.Lock()
		seen[obj.(*corev1.ConfigMap).Name] = true
		mu.Unlock()
	}})
	ictx, stopInformer := context.WithCancel(ctx)
	defer stopInformer()
	factory.Start(ictx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		t.Fatal("informer through outpost never synced")
	}
	// Within 10 s: an HTTP/2 connection left open on a black-holed link
	// would only be found dead by its pings, after 20 s.
	waitSeen := func(name string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			mu.Lock()
			ok := seen[name]
			mu.Unlock()
			if ok {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("informer through outpost did not see configmap %s within 10s", name)
	}
	create := func(name string) {
		t.Helper()
		if _, err := direct1.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	create("before")
	waitSeen("before")

	// Reads keep flowing through outpost during the loss.
	var reads, failures atomic.Int32
	var slowest atomic.Int64
	var firstFailure atomic.Value
	rctx, stopReads := context.WithCancel(ctx)
	readsDone := make(chan struct{})
	go func() {
		defer close(readsDone)
		for rctx.Err() == nil {
			t0 := time.Now()
			_, err := client.CoreV1().Namespaces().Get(rctx, ns, metav1.GetOptions{})
			if d := int64(time.Since(t0)); d > slowest.Load() {
				slowest.Store(d)
			}
			if err != nil && rctx.Err() == nil {
				failures.Add(1)
				firstFailure.CompareAndSwap(nil, err.Error())
			}
			reads.Add(1)
			time.Sleep(20 * time.Millisecond)
		}
	}()

	fromCache := metric(t, o, "outpost_requests_total", "served_by=cache")
	lose()
	for i := range 3 {
		create(fmt.Sprintf("after-%d", i))
	}
	for i := range 3 {
		waitSeen(fmt.Sprintf("after-%d", i))
	}
	time.Sleep(2 * time.Second)
	stopReads()
	<-readsDone
	if n := failures.Load(); n > 0 {
		t.Errorf("%d of %d reads through outpost failed while an apiserver was lost; first: %v", n, reads.Load(), firstFailure.Load())
	}
	t.Logf("%d reads through outpost during the loss, %d failed, slowest %v", reads.Load(), failures.Load(), time.Duration(slowest.Load()))
	t.Logf("outpost log:\n%s", o.Log(30))

	// Outpost saw it: the lost server is reported unhealthy, and every
	// read was answered by the other apiserver, none from the cache.
	if v := metric(t, o, "outpost_upstream_healthy", "server="+first); v != 0 {
		t.Errorf("outpost_upstream_healthy{server=%q} = %v, want 0", first, v)
	}
	if n := metric(t, o, "outpost_requests_total", "served_by=cache") - fromCache; n != 0 {
		t.Errorf("%v answers came from the cache while an apiserver was up", n)
	}
}
