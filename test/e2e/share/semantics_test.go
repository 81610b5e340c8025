package share_test

import (
	"slices"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestAnswersAsDirect asks the same reads directly and through outpost's
// watch cache, in JSON and protobuf, and compares: LIST at
// resourceVersion 0 (whole, whatever the limit), LIST NotOlderThan a
// version, with a label selector, and a WatchList, whose initial events
// end with the initial-events-end bookmark.
func TestAnswersAsDirect(t *testing.T) {
	const ns = "semantics"
	createNamespace(t, ns)
	ctx := t.Context()
	token := cp.ServiceAccountToken(t, ns, "agent", framework.ReaderRole)
	for i, tier := range []string{"front", "back", "front", "back", "front"} {
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "cm-" + string(rune('a'+i)), Labels: map[string]string{"tier": tier}}, Data: map[string]string{"v": "1"}}
		if _, err := cp.Client().CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	o, _ := cp.StartOutpostWithLinkT(t, "edge-semantics", "--watch-cache")
	direct := cp.Client().CoreV1().ConfigMaps(ns)
	for _, contentType := range []string{"application/json", "application/vnd.kubernetes.protobuf"} {
		cfg := o.ClientConfig("", "", token)
		cfg.ContentType = contentType
		shared := kubernetes.NewForConfigOrDie(cfg).CoreV1().ConfigMaps(ns)
		listed := served(t, o, "list")
		for _, opts := range []metav1.ListOptions{
			{ResourceVersion: "0", Limit: 2},
			{ResourceVersion: "0", LabelSelector: "tier=front"},
			{ResourceVersion: "0", LabelSelector: "tier=back", Limit: 1},
		} {
			want, err := direct.List(ctx, opts)
			if err != nil {
				t.Fatal(err)
			}
			got, err := shared.List(ctx, opts)
			if err != nil {
				t.Fatalf("%s %+v: %v", contentType, opts, err)
			}
			if !slices.Equal(names(got), names(want)) || got.Continue != want.Continue {
				t.Fatalf("%s %+v: outpost listed %v (continue %q), directly %v (continue %q)", contentType, opts, names(got), got.Continue, names(want), want.Continue)
			}
			// NotOlderThan the version just listed directly.
			opts.ResourceVersion, opts.ResourceVersionMatch, opts.Limit = want.ResourceVersion, metav1.ResourceVersionMatchNotOlderThan, 0
			got, err = shared.List(ctx, opts)
			if err != nil {
				t.Fatalf("%s %+v: %v", contentType, opts, err)
			}
			if !slices.Equal(names(got), names(want)) {
				t.Fatalf("%s %+v: outpost listed %v, directly %v", contentType, opts, names(got), names(want))
			}
		}
		if n := served(t, o, "list"); n != listed+6 {
			t.Fatalf("%s: outpost served %v of 6 lists from the watch cache", contentType, n-listed)
		}
		// Label selectors are applied by outpost to one stream of the
		// namespace: the caller may list and watch all of it.
		if n, err := o.Metric("outpost_watchcache_streams"); err != nil || n != 1 {
			t.Fatalf("%s: outpost runs %v streams (err %v), want 1 for every selector", contentType, n, err)
		}
		watched := served(t, o, "watch")
		wantNames, wantEnd, _ := watchList(t, direct)
		gotNames, gotEnd, _ := watchList(t, shared)
		if !slices.Equal(gotNames, wantNames) || gotEnd == 0 || wantEnd == 0 {
			t.Fatalf("%s: WatchList through outpost sent %v (initial-events-end bookmark: %v), directly %v (%v)", contentType, gotNames, gotEnd, wantNames, wantEnd)
		}
		if n := served(t, o, "watch"); n != watched+1 {
			t.Fatalf("%s: the WatchList was not served from the watch cache", contentType)
		}
	}
}

// watchList makes a WatchList of c (resourceVersion "": consistent) and
// returns the names of its initial events, in order, the version of the
// initial-events-end bookmark that ended them, and how long they took.
func watchList(t *testing.T, c typedcorev1.ConfigMapInterface) (names []string, end uint64, took time.Duration) {
	t.Helper()
	yes := true
	start := time.Now()
	w, err := c.Watch(t.Context(), metav1.ListOptions{SendInitialEvents: &yes, AllowWatchBookmarks: true, ResourceVersionMatch: metav1.ResourceVersionMatchNotOlderThan})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				t.Fatalf("the WatchList ended after %v", names)
			}
			cm, isCM := ev.Object.(*corev1.ConfigMap)
			switch {
			case !isCM:
				t.Fatalf("WatchList sent %s %#v", ev.Type, ev.Object)
			case ev.Type == watch.Added:
				names = append(names, cm.Name)
			case ev.Type == watch.Bookmark && cm.Annotations["k8s.io/initial-events-end"] == "true":
				end, _ = strconv.ParseUint(cm.ResourceVersion, 10, 64)
				return names, end, time.Since(start)
			case ev.Type != watch.Bookmark:
				t.Fatalf("WatchList sent %s among its initial events", ev.Type)
			}
		case <-timeout:
			t.Fatalf("WatchList sent %v and no initial-events-end bookmark within 10 s", names)
		}
	}
}
