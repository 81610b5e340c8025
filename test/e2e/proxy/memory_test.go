package proxy_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestMemoryReturnedAfterBurst: a burst of 32 clients listing 200
// ConfigMaps of 8 KB through outpost grows its heap by tens of MB. Once the
// burst ends, outpost returns that memory to the system within seconds
// (outpost_memory_releases_total{reason="quiet"}), instead of the minutes
// the Go runtime would keep it: its anonymous memory falls back by at
// least half of what the burst added. (On a loaded machine the runtime's
// own scavenger sometimes returns it before the quiet second has passed;
// the release then finds nothing to return and is not counted, and the
// memory is back all the same, which is what this test is about.)
func TestMemoryReturnedAfterBurst(t *testing.T) {
	ctx := t.Context()
	o := cp.StartOutpostT(t, "edge-memory", framework.LenientProbes...)
	client := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", adminToken(t)))
	const ns, n = "memory-burst", 200
	if err := framework.SeedConfigMaps(ctx, cp.Client(), ns, n, 8192, 16); err != nil {
		t.Fatal(err)
	}

	anon := func() float64 { return anonMB(t, o.PID()) }
	time.Sleep(2 * time.Second) // quiet after start-up
	base := anon()
	before := metric(t, o, "outpost_memory_releases_total", "reason=quiet")

	list := func(ctx context.Context) error {
		l, err := client.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
		if err == nil && len(l.Items) != n {
			err = fmt.Errorf("listed %d ConfigMaps, want %d", len(l.Items), n)
		}
		return err
	}
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for range 6 {
				if err := list(ctx); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	peak := anon()
	grown := peak - base
	if grown < 8 {
		t.Fatalf("the burst grew outpost's anonymous memory by only %.1f MB (%.1f → %.1f): the test proves nothing", grown, base, peak)
	}

	deadline := time.Now().Add(10 * time.Second)
	for {
		now := anon()
		released := metric(t, o, "outpost_memory_releases_total", "reason=quiet") - before
		if now < base+grown/2 {
			t.Logf("anonymous memory %.1f MB before the burst, %.1f MB after it, %.1f MB once quiet (%v releases)", base, peak, now, released)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("10 s after the burst: anonymous memory %.1f MB (%.1f before, %.1f after the burst), %v releases; want it back under %.1f MB",
				now, base, peak, released, base+grown/2)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// anonMB is the anonymous resident memory of process pid, in MB.
func anonMB(t *testing.T, pid int) float64 {
	t.Helper()
	v, err := framework.StatusMB(pid, "RssAnon:")
	if err != nil {
		t.Fatal(err)
	}
	return v
}
