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
	// Every probe asks /readyz (no HTTP/2 PINGs between), which is what
	// hangs here.
	o := cp.StartOutpostT(t, "edge-slowprobe", "--server="+cp.URL(0), "--probe-interval=200ms", "--probe-timeout=200ms", "--probe-ready-interval=0")
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

// TestPingsBetweenReadyProbes: a healthy apiserver is probed with /readyz
// once per --probe-ready-interval and pinged (HTTP/2 PING) between: the
// apiserver counts only the /readyz requests, and a cut link is still
// noticed within a probe or two.
func TestPingsBetweenReadyProbes(t *testing.T) {
	ctx := t.Context()
	o, link := cp.StartOutpostWithLinkT(t, "edge-ping", "--probe-interval=100ms", "--probe-ready-interval=2s")
	readyz := func() float64 {
		raw, err := cp.Client().CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
		if err != nil {
			t.Fatal(err)
		}
		v, err := framework.SumMetric(string(raw), "apiserver_request_total", `subresource="/readyz"`)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	probesOK := func() float64 { return metric(t, o, "outpost_upstream_probes_total", `result="ok"`) }
	readyBefore, okBefore := readyz(), probesOK()
	time.Sleep(6 * time.Second)
	asked, ok := readyz()-readyBefore, probesOK()-okBefore
	t.Logf("in 6s: %v good probes by outpost, %v /readyz requests counted by the apiserver", ok, asked)
	if ok < 30 {
		t.Errorf("%v good probes in 6s at --probe-interval=100ms; want most of 60", ok)
	}
	if asked > 5 {
		t.Errorf("the apiserver counted %v /readyz requests in 6s at --probe-ready-interval=2s; want about 3", asked)
	}
	if asked < 1 {
		t.Errorf("no /readyz in 6s at --probe-ready-interval=2s: the readiness of the apiserver is no longer checked")
	}
	link.Blackhole()
	// Nothing is cached: outpost is then not ready rather than offline,
	// and says it with its online gauge.
	cut := time.Now()
	for metric(t, o, "outpost_online") != 0 {
		if time.Since(cut) > 10*time.Second {
			t.Fatal("still online 10s after the link was cut")
		}
		time.Sleep(20 * time.Millisecond)
	}
	took := time.Since(cut)
	t.Logf("link cut: offline after %v", took)
	if took > 3*time.Second {
		t.Errorf("a cut link was noticed after %v with pings every 100ms", took)
	}
	link.Pass()
	waitState(t, o, "online", 10*time.Second)
}
