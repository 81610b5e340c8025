package proxy_test

import (
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestSlowProbesWhileAnswering: with etcd paused, the apiserver's /readyz
// hangs past outpost's probe timeout, while the apiserver still answers
// reads from its watch cache. As long as such answers keep arriving, the
// timed-out probes are excused and outpost stays online, proxying: a probe
// that only timed out proves a busy server, not a lost one. (A few seconds
// later the apiserver's own etcd check fails and /readyz answers 500 at
// once: that is a real failure, and it counts.)
func TestSlowProbesWhileAnswering(t *testing.T) {
	ctx := t.Context()
	o := cp.StartOutpostT(t, "edge-slowprobe", "--server="+cp.URL(0), "--probe-interval=200ms", "--probe-timeout=200ms")
	client := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", adminToken(t)))
	waitState(t, o, "online", 10*time.Second)

	// Served by the apiserver's watch cache, without etcd.
	fromWatchCache := metav1.ListOptions{ResourceVersion: "0"}
	if _, err := client.CoreV1().Namespaces().List(ctx, fromWatchCache); err != nil {
		t.Fatal(err)
	}
	probes := func(result string) float64 {
		return metric(t, o, "outpost_upstream_probes_total", `result="`+result+`"`)
	}
	servedFromCache := func() float64 { return metric(t, o, "outpost_requests_total", `served_by="cache"`) }
	failedBefore, fromCacheBefore := probes("failed"), servedFromCache()

	if err := cp.PauseEtcd(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cp.ResumeEtcd(); err != nil {
			t.Error(err)
		}
	})

	// Reads, 10 a second, for 4 s or until a probe fails outright.
	deadline := time.Now().Add(4 * time.Second)
	reads := 0
	fromCache := fromCacheBefore // as of the last read made before any failed probe
	for time.Now().Before(deadline) && probes("failed") == failedBefore {
		if _, err := client.CoreV1().Namespaces().List(ctx, fromWatchCache); err != nil {
			t.Fatalf("read %d with etcd paused: %v", reads, err)
		}
		if probes("failed") != failedBefore {
			// The failure may have come first: this read may rightly
			// have been answered from the cache. (A probe is counted
			// before it changes outpost's state.)
			break
		}
		fromCache = servedFromCache()
		reads++
		if s := o.State(ctx); s != "online" && probes("failed") == failedBefore {
			t.Fatalf("outpost turned %q after %d reads answered by the apiserver, with no probe failed outright: a probe that only timed out must not count while answers arrive", s, reads)
		}
		time.Sleep(100 * time.Millisecond)
	}
	excused := probes("excused")
	if excused < 2 {
		t.Fatalf("%v probes excused in %d reads with etcd paused; want several (did /readyz not hang?)", excused, reads)
	}
	if got := fromCache - fromCacheBefore; got != 0 {
		t.Fatalf("%v reads were served from outpost's cache; want all from the apiserver", got)
	}
	t.Logf("%d reads answered by the apiserver while %v probes timed out and were excused", reads, excused)
}

// waitState waits until outpost's /readyz says want.
func waitState(t *testing.T, o *framework.Outpost, want string, within time.Duration) {
	t.Helper()
	if _, err := o.WaitState(t.Context(), want, within); err != nil {
		t.Fatal(err)
	}
}

// metric reads one of outpost's metrics (see framework.Outpost.Metric).
func metric(t *testing.T, o *framework.Outpost, name string, labels ...string) float64 {
	t.Helper()
	v, err := o.Metric(name, labels...)
	if err != nil {
		t.Fatalf("reading %s: %v", name, err)
	}
	return v
}

// TestReadyOnlyOnceReached: outpost with no cache, whose only apiserver's
// link is black-holed from the start, is not ready, not even before its
// first probes have failed (every server counts as healthy until then);
// once the link passes, it is ready within seconds.
func TestReadyOnlyOnceReached(t *testing.T) {
	link, err := framework.StartFaultProxy(cp.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	defer link.Close()
	link.Blackhole()
	// Three failed probes of 500 ms before the server counts as down.
	o := cp.StartOutpostT(t, "edge-readiness", "--server="+link.URL(), "--failure-threshold=3")
	for deadline := time.Now().Add(2500 * time.Millisecond); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if s := o.State(t.Context()); s == "online" || s == "offline" {
			t.Fatalf("ready (%s) while no apiserver was ever reached and nothing is cached", s)
		}
	}
	link.Pass()
	waitState(t, o, "online", 10*time.Second)
}
