package cache_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/internal/store"
	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestKillDuringRecording kills outpost with SIGKILL at random moments while
// it records a 10,000-object list and a watch's events, many times. After
// each kill the store opens, and the list's view is either absent (the old
// state) or complete, never partial.
func TestKillDuringRecording(t *testing.T) {
	if testing.Short() {
		t.Skip("long crash test")
	}
	ctx := t.Context()
	const ns, n = "crash", 10000
	c := cp.Client()
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for i := range n {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cm-%05d", i)}, Data: map[string]string{"v": strings.Repeat("x", 200)}}
			if _, err := c.CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	o := cp.StartOutpostT(t, "edge-crash")
	token := cp.ServiceAccountToken(t, "default", "reader", framework.ReaderRole)
	client := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", token))
	dbPath := filepath.Join(o.DataDir, "cache.db")

	complete := 0
	// The kill comes within window of the list's start. A cold outpost
	// (each round restarts it) on a loaded machine may need more than a
	// second to record the list: after a round that found nothing
	// recorded, the window grows, so that kills keep landing both before
	// and after the commit.
	window := time.Second
	for round := range 8 {
		rctx, cancel := context.WithCancel(ctx)
		// Load, as an informer makes it: the big list, then a watch from
		// its resourceVersion recording a writer's changes.
		go func() {
			l, err := client.CoreV1().ConfigMaps(ns).List(rctx, metav1.ListOptions{})
			if err != nil {
				return
			}
			w, err := client.CoreV1().ConfigMaps(ns).Watch(rctx, metav1.ListOptions{ResourceVersion: l.ResourceVersion})
			if err == nil {
				for range w.ResultChan() {
				}
			}
		}()
		go func() {
			for i := 0; rctx.Err() == nil; i++ {
				cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cm-%05d", i%50)}, Data: map[string]string{"v": fmt.Sprint(round, i)}}
				_, _ = c.CoreV1().ConfigMaps(ns).Update(rctx, cm, metav1.UpdateOptions{})
			}
		}()
		time.Sleep(100*time.Millisecond + rand.N(window-100*time.Millisecond))
		o.Kill()
		cancel()

		st, err := store.Open(dbPath, store.Options{})
		if err != nil {
			t.Fatalf("round %d: store does not open after kill -9: %v", round, err)
		}
		key := store.ViewKey{Identity: "system:serviceaccount:default:reader", Resource: "/v1/configmaps", Namespace: ns}
		members := 0
		if _, ok, err := st.View(key); err != nil {
			t.Fatalf("round %d: reading the view: %v", round, err)
		} else if ok {
			if err := st.List(key, "", 0, func(store.Object) error { members++; return nil }); err != nil {
				t.Fatalf("round %d: listing the view: %v", round, err)
			}
			if members != n {
				t.Fatalf("round %d: a partial view after kill -9: %d of %d members", round, members, n)
			}
			complete++
		} else {
			window = min(window+time.Second, 5*time.Second)
		}
		if err := st.Close(); err != nil {
			t.Fatal(err)
		}
		if err := o.Start(ctx); err != nil {
			t.Fatalf("round %d: outpost does not start again: %v\n%s", round, err, o.Log(20))
		}
	}
	t.Logf("8 kills: the view was complete after %d and absent (never recorded yet) after %d; never partial", complete, 8-complete)
	if complete == 0 {
		t.Fatal("the list was never recorded in 8 rounds: the test proved nothing")
	}
}
