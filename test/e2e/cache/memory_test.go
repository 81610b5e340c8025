package cache_test

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

	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestConcurrentOfflineListsBounded: fifty clients listing the same large
// view at once from outpost's cache, JSON and protobuf, do not take
// outpost's memory past a bound (issue 20): answers that can stream go a
// page at a time, and those that cannot (protobuf converted from recorded
// JSON, say) are assembled a few at a time. Each answer is checked to be
// the cache's whole list, byte for byte the same for every client.
func TestConcurrentOfflineListsBounded(t *testing.T) {
	const (
		ns      = "memory"
		objects = 3000
		clients = 50
		// The bound on outpost's peak resident memory (VmHWM) while the
		// lists run: about 30 MB idle plus the store's mapped pages, one
		// assembled answer and a page per other client. Assembling every
		// answer (as before) takes fifty times the 4 MB list, several
		// times over.
		boundMB = 150
	)
	ctx := t.Context()
	cfg := cp.AdminConfig()
	cfg.QPS = -1
	if err := framework.SeedConfigMaps(ctx, kubernetes.NewForConfigOrDie(cfg), ns, objects, 1024, 16); err != nil {
		t.Fatal(err)
	}
	o, link := cp.StartOutpostWithLinkT(t, "memory-node", framework.LenientProbes...)
	token := cp.ServiceAccountToken(t, "default", "memory-reader", framework.ReaderRole)
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: framework.CertPool(t, o.ServingCAFile)}, MaxIdleConnsPerHost: clients}}
	list := func(ctx context.Context, accept string) ([]byte, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, o.URL+"/api/v1/namespaces/"+ns+"/configmaps", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Accept", accept)
		resp, err := client.Do(req)
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
	accepts := []string{"application/json", "application/vnd.kubernetes.protobuf"}
	for _, a := range accepts { // recorded online, in both encodings
		if _, err := list(ctx, a); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(time.Second) // the recorder writes in batches
	link.Blackhole()
	if _, err := o.WaitState(ctx, "offline", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{}
	for _, a := range accepts {
		body, err := list(ctx, a)
		if err != nil {
			t.Fatal(err)
		}
		want[a] = body
	}
	if len(want["application/json"]) < 3<<20 {
		t.Fatalf("the list is only %d bytes", len(want["application/json"]))
	}
	// Peak memory counts from here (clear_refs 5 resets VmHWM).
	if err := os.WriteFile("/proc/"+strconv.Itoa(o.PID())+"/clear_refs", []byte("5"), 0); err != nil {
		t.Fatal(err)
	}
	before, _ := framework.StatusMB(o.PID(), "VmHWM:")
	for _, a := range accepts {
		var wg sync.WaitGroup
		errs := make(chan error, clients)
		for range clients {
			wg.Go(func() {
				body, err := list(ctx, a)
				if err == nil && !bytes.Equal(body, want[a]) {
					err = fmt.Errorf("%s: an answer of %d bytes differs from the cache's list of %d", a, len(body), len(want[a]))
				}
				if err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	}
	peak, err := framework.StatusMB(o.PID(), "VmHWM:")
	if err != nil {
		t.Fatal(err)
	}
	anon, _ := framework.StatusMB(o.PID(), "RssAnon:")
	file, _ := framework.StatusMB(o.PID(), "RssFile:")
	heap, _ := o.Metric("go_memstats_heap_inuse_bytes")
	t.Logf("after the lists: RssAnon %.0f MB, RssFile %.0f MB, Go heap in use %.0f MB", anon, file, heap/(1<<20))
	t.Logf("FIGURE %d concurrent offline lists of %d objects (%.1f MB JSON, %.1f MB protobuf), each encoding: outpost's peak RSS %.0f MB (%.0f MB before)",
		clients, objects, float64(len(want["application/json"]))/(1<<20), float64(len(want["application/vnd.kubernetes.protobuf"]))/(1<<20), peak, before)
	if peak > boundMB {
		t.Errorf("outpost's peak RSS reached %.0f MB with %d concurrent offline lists; the bound is %d MB", peak, clients, boundMB)
	}
}
