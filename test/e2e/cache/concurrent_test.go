package cache_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestConcurrentListsRecordedOnce: 32 clients listing the same 500
// ConfigMaps through outpost at once, after each of several writes that move
// the list's resourceVersion, get the apiserver's answers; outpost records
// each version of the list once, not once per client
// (outpost_cache_views_replaced_total grows by at most the number of
// distinct versions the clients saw).
func TestConcurrentListsRecordedOnce(t *testing.T) {
	ctx := t.Context()
	const ns, n, clients, rounds = "concurrent-lists", 500, 32, 5
	if err := framework.SeedConfigMaps(ctx, cp.Client(), ns, n, 512, 16); err != nil {
		t.Fatal(err)
	}
	token := cp.ServiceAccountToken(t, "default", "reader", framework.ReaderRole)
	o := cp.StartOutpostT(t, node)
	cfg := o.ClientConfig("", "", token)
	// Protobuf, gzipped by the apiserver (lists above 128 KiB): as
	// client-go's typed clients in kubelet and kube-proxy ask.
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	c := kubernetes.NewForConfigOrDie(cfg)
	replaced := func() float64 {
		v, err := o.Metric("outpost_cache_views_replaced_total")
		if err != nil {
			t.Fatal(err)
		}
		return v
	}

	before := replaced()
	versions := map[string]bool{}
	var mu sync.Mutex
	for round := range rounds {
		// Any write moves the resourceVersion of a quorum list.
		if _, err := cp.Client().CoreV1().ConfigMaps("default").Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("concurrent-lists-%d", round)}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for range clients {
			wg.Go(func() {
				l, err := c.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
				if err == nil && len(l.Items) != n {
					err = fmt.Errorf("listed %d ConfigMaps, want %d", len(l.Items), n)
				}
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				versions[l.ResourceVersion] = true
				mu.Unlock()
			})
		}
		wg.Wait()
	}
	if t.Failed() {
		return
	}
	// Each version's one recording is written within a batch delay.
	var got float64
	if _, err := framework.Poll(ctx, 50*time.Millisecond, 5*time.Second, func(context.Context) (bool, string) {
		got = replaced() - before
		return got >= float64(len(versions)), fmt.Sprintf("%v views replaced", got)
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // any further recording would be written by now
	got = replaced() - before
	t.Logf("%d lists at %d versions: the view was replaced %v times", clients*rounds, len(versions), got)
	if got > float64(len(versions)) {
		t.Fatalf("%d lists at %d versions replaced the view %v times, want at most once per version", clients*rounds, len(versions), got)
	}
}
