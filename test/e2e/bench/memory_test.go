package bench

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// BenchmarkXMemoryBurst is issue 20's burst: fifty clients list the same
// 10,000 ConfigMaps of about 1.2 KB (12 MB as JSON) at once, and it
// reports the resident memory of the process in the middle: outpost online
// (proxying and recording), floorproxy (the bare proxy hop) and outpost
// offline (answering from its cache). For each: the peak (VmHWM, reset
// before the burst), the idle RSS before, the RSS 5 s after the burst ended
// and its ratio to idle, and the burst's time, directly too. A fresh
// outpost of its own keeps the other benchmarks' loads out of the figures.
// It cuts that outpost's link, so it must not share it.
func BenchmarkXMemoryBurst(b *testing.B) {
	setup(b)
	const (
		burstNS = "bench-burst"
		objects = 10000
		clients = 50
	)
	seedBurst.Do(func() { seedConfigMaps(b, burstNS, objects, 1024, 32) })
	o, link := cp.StartOutpostWithLinkT(b, "edge-burst", append([]string{"--log-level=warn"}, framework.LenientProbes...)...)
	burstOutpost = o
	path := "/api/v1/namespaces/" + burstNS + "/configmaps"
	hosts := map[string]struct {
		url  string
		ca   string
		pid  int
		auth bool
	}{
		"direct":  {cp.URL(0), cp.CAFile, 0, true},
		"floor":   {floorURL, hub.ServingCAFile, floor.Process.Pid, true},
		"outpost": {o.URL, o.ServingCAFile, o.PID(), true},
	}
	list := func(ctx context.Context, c *http.Client, url, accept string) ([]byte, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url+path, nil)
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Accept", accept)
		resp, err := c.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("%s: %.200s", resp.Status, body)
		}
		return body, err
	}
	// burst runs the fifty lists, each on a connection of its own as fifty
	// processes would, and checks each answer has every object. gzip says
	// whether they accept gzip, as client-go does (kubectl --raw and curl
	// do not).
	burst := func(b *testing.B, name, accept string, gzip bool) time.Duration {
		h := hosts[name]
		client := func() *http.Client {
			return &http.Client{Timeout: 5 * time.Minute, Transport: &http.Transport{ForceAttemptHTTP2: true, DisableCompression: !gzip,
				TLSClientConfig: &tls.Config{RootCAs: framework.CertPool(b, h.ca)}}}
		}
		c := client()
		defer c.CloseIdleConnections()
		ctx := context.Background()
		replaced := 0.0
		if name == "outpost" {
			replaced = metric(b, o, "outpost_cache_views_replaced_total")
		}
		first, err := list(ctx, c, h.url, accept)
		if err != nil {
			b.Fatalf("%s: %v", name, err)
		}
		if n := bytes.Count(first, []byte("cm-0")); n < objects {
			b.Fatalf("%s: the list names %d objects, want %d", name, n, objects)
		}
		if name == "outpost" && !recorded[accept] {
			// The first list's recording (a decode of 12 MB, 10,000
			// objects written) is not the burst's: it must end first.
			deadline := time.Now().Add(2 * time.Minute)
			for metric(b, o, "outpost_cache_views_replaced_total") <= replaced && time.Now().Before(deadline) {
				time.Sleep(100 * time.Millisecond)
			}
			recorded[accept] = true
		}
		time.Sleep(5 * time.Second) // memory returned
		if h.pid != 0 {
			b.ReportMetric(statusMB(b, h.pid, "VmRSS:"), name+"-idle-MB")
			if name != "floor" {
				b.ReportMetric(statusMB(b, h.pid, "RssAnon:"), name+"-idle-anon-MB")
			}
			if err := os.WriteFile("/proc/"+strconv.Itoa(h.pid)+"/clear_refs", []byte("5"), 0); err != nil {
				b.Fatal(err)
			}
		}
		fromCache := 0.0
		if name == "outpost" {
			fromCache = metric(b, o, "outpost_requests_total", `served_by="cache"`)
		}
		start := time.Now()
		stopSampling := sampleMemory(b, name, h.pid, name != "direct" && name != "floor")
		var wg sync.WaitGroup
		for range clients {
			c := client()
			wg.Go(func() {
				defer c.CloseIdleConnections()
				body, err := list(ctx, c, h.url, accept)
				if err == nil && len(body) != len(first) {
					err = fmt.Errorf("an answer of %d bytes, the first was %d", len(body), len(first))
				}
				if err != nil {
					b.Errorf("%s: %v", name, err)
				}
			})
		}
		if dir := os.Getenv("OUTPOST_BENCH_PROFILE"); dir != "" && name != "direct" && name != "floor" {
			// The heap in the thick of it.
			time.Sleep(took0(name) / 3)
			if err := savePprof(o.AdminURL+"/debug/pprof/heap", fmt.Sprintf("%s/burst-%s-%s.heap.pprof", dir, b.Name()[len("BenchmarkXMemoryBurst/"):], name)); err != nil {
				b.Error(err)
			}
		}
		wg.Wait()
		took := time.Since(start)
		stopSampling()
		tooks[name] = took
		if name == "outpost" {
			// Probes that time out on a loaded machine take outpost
			// offline, and then the cache answers: it must be 0 for the
			// figures to be the online path's.
			b.ReportMetric(metric(b, o, "outpost_requests_total", `served_by="cache"`)-fromCache, "outpost-from-cache")
		}
		b.ReportMetric(took.Seconds(), name+"-burst-s")
		if h.pid != 0 {
			b.ReportMetric(statusMB(b, h.pid, "VmHWM:"), name+"-peak-MB")
			time.Sleep(5 * time.Second)
			b.ReportMetric(statusMB(b, h.pid, "VmRSS:"), name+"-after5s-MB")
			if name != "floor" { // of which
				b.ReportMetric(statusMB(b, h.pid, "RssAnon:"), name+"-after5s-anon-MB")
				b.ReportMetric(metric(b, o, "go_memstats_heap_inuse_bytes")/(1<<20), name+"-after5s-heap-MB")
			}
		}
		return took
	}
	for _, enc := range []struct {
		name, accept string
		gzip         bool
	}{
		{"json", "application/json", false},
		{"json-gzip", "application/json", true},
		{"protobuf-gzip", "application/vnd.kubernetes.protobuf", true},
	} {
		b.Run(enc.name, func(b *testing.B) {
			for range b.N {
			}
			if link.Mode() != "pass" {
				link.Pass()
				if _, err := o.WaitState(context.Background(), "online", 30*time.Second); err != nil {
					b.Fatal(err)
				}
			}
			for _, name := range []string{"direct", "floor", "outpost"} {
				burst(b, name, enc.accept, enc.gzip)
			}
			link.Blackhole()
			if _, err := o.WaitState(context.Background(), "offline", 30*time.Second); err != nil {
				b.Fatal(err)
			}
			hosts["offline"] = hosts["outpost"]
			burst(b, "offline", enc.accept, enc.gzip)
		})
	}
}

var seedBurst sync.Once

// recorded says, by the encoding asked for, whether the burst's view was
// recorded in it.
var recorded = map[string]bool{}

// sampleMemory samples the resident memory of process pid, anonymous and
// file-backed, every 20 ms, and with goMetrics outpost's Go heap and
// stacks every 250 ms, until the returned func is called, which reports
// the peak of each: where a peak of RSS comes from.
func sampleMemory(b *testing.B, name string, pid int, goMetrics bool) (stop func()) {
	if pid == 0 {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	peaks := map[string]float64{}
	var mu sync.Mutex
	peak := func(k string, v float64) {
		mu.Lock()
		peaks[k] = max(peaks[k], v)
		mu.Unlock()
	}
	wg.Go(func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for n := 0; ; n++ {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			if v, err := framework.StatusMB(pid, "RssAnon:"); err == nil {
				peak("anon", v)
			}
			if v, err := framework.StatusMB(pid, "RssFile:"); err == nil {
				peak("file", v)
			}
			if goMetrics && n%12 == 0 {
				for k, m := range map[string]string{"heap": "go_memstats_heap_inuse_bytes", "stack": "go_memstats_stack_inuse_bytes"} {
					if v, err := burstOutpost.Metric(m); err == nil {
						peak(k, v/(1<<20))
					}
				}
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
		for k, v := range peaks {
			b.ReportMetric(v, name+"-peak-"+k+"-MB")
		}
	}
}

// burstOutpost is BenchmarkXMemoryBurst's outpost.
var burstOutpost *framework.Outpost

// tooks are the last burst's times, by path, to time the heap profile.
var tooks = map[string]time.Duration{}

func took0(name string) time.Duration {
	if d, ok := tooks[name]; ok {
		return d
	}
	return 3 * time.Second
}
