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
		first, err := list(ctx, c, h.url, accept)
		if err != nil {
			b.Fatalf("%s: %v", name, err)
		}
		if n := bytes.Count(first, []byte("cm-0")); n < objects {
			b.Fatalf("%s: the list names %d objects, want %d", name, n, objects)
		}
		time.Sleep(2 * time.Second) // recorded, and memory returned
		if h.pid != 0 {
			b.ReportMetric(statusMB(b, h.pid, "VmRSS:"), name+"-idle-MB")
			if err := os.WriteFile("/proc/"+strconv.Itoa(h.pid)+"/clear_refs", []byte("5"), 0); err != nil {
				b.Fatal(err)
			}
		}
		start := time.Now()
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
		wg.Wait()
		took := time.Since(start)
		b.ReportMetric(took.Seconds(), name+"-burst-s")
		if h.pid != 0 {
			b.ReportMetric(statusMB(b, h.pid, "VmHWM:"), name+"-peak-MB")
			time.Sleep(5 * time.Second)
			b.ReportMetric(statusMB(b, h.pid, "VmRSS:"), name+"-after5s-MB")
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
