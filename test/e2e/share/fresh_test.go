package share_test

import (
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestConsistentWatchListIsFresh checks that a WatchList with
// resourceVersion "" (consistent: every informer's first sync) through the
// watch cache is as fresh as the apiserver's: a ConfigMap written directly
// just before is in it though the link delays the stream's event, and a
// quiet scope's answer, after writes elsewhere, ends at a version not
// older than those writes, still from the watch cache.
func TestConsistentWatchListIsFresh(t *testing.T) {
	const ns = "fresh"
	createNamespace(t, ns)
	createNamespace(t, ns+"-elsewhere")
	token := cp.ServiceAccountToken(t, ns, "agent", framework.ReaderRole)
	for _, n := range []string{"a", "b"} {
		createConfigMap(t, ns, n)
	}
	o, link := cp.StartOutpostWithLinkT(t, "edge-fresh", "--watch-cache")
	shared := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", token)).CoreV1().ConfigMaps(ns)
	if _, err := shared.List(t.Context(), metav1.ListOptions{ResourceVersion: "0"}); err != nil {
		t.Fatal(err) // starts the stream
	}
	if got := served(t, o, "list"); got != 1 {
		t.Fatalf("the list was not served from the watch cache (%v)", got)
	}

	// Written directly while the link delays what the stream hears.
	link.Latency(200 * time.Millisecond)
	createConfigMap(t, ns, "c")
	names, _, took := watchList(t, shared)
	link.Pass()
	if len(names) != 3 || names[2] != "c" {
		t.Fatalf("a consistent WatchList just after a write listed %v (in %v), want a, b and c", names, took)
	}
	t.Logf("a consistent WatchList just after a write, with 200 ms of link latency: %v in %v", names, took.Round(time.Millisecond))

	// Quiet: the stream hears of newer versions only from the apiserver's
	// bookmarks, about once a minute. Written elsewhere: ConfigMaps of
	// another namespace, and Secrets.
	for i := range 4 {
		before := served(t, o, "watch")
		name := metav1.ObjectMeta{Name: "x" + strconv.Itoa(i)}
		var rv string
		if i%2 == 0 {
			cm, err := cp.Client().CoreV1().ConfigMaps(ns+"-elsewhere").Create(t.Context(), &corev1.ConfigMap{ObjectMeta: name}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			rv = cm.ResourceVersion
		} else {
			s, err := cp.Client().CoreV1().Secrets(ns+"-elsewhere").Create(t.Context(), &corev1.Secret{ObjectMeta: name}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			rv = s.ResourceVersion
		}
		written, _ := strconv.ParseUint(rv, 10, 64)
		names, end, took := watchList(t, shared)
		if len(names) != 3 || end < written {
			t.Fatalf("a consistent WatchList of a quiet scope listed %v up to version %d, older than a write before it (%d)", names, end, written)
		}
		if served(t, o, "watch") != before+1 {
			t.Fatalf("a consistent WatchList of a quiet scope was not served from the watch cache (in %v)", took)
		}
		t.Logf("a quiet scope's consistent WatchList, after a write elsewhere at %d: at %d in %v", written, end, took.Round(time.Millisecond))
	}
}
