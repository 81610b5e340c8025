package cache_test

import (
	"context"
	"sort"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/outposthq/outpost/test/e2e/framework"
)

func syncedNames(t *testing.T, ctx context.Context, c kubernetes.Interface, ns string) []string {
	t.Helper()
	factory := informers.NewSharedInformerFactoryWithOptions(c, 0, informers.WithNamespace(ns))
	inf := factory.Core().V1().ConfigMaps().Informer()
	ictx, cancel := context.WithCancel(ctx)
	defer func() { cancel(); factory.Shutdown() }()
	factory.Start(ictx.Done())
	sctx, scancel := context.WithTimeout(ctx, 20*time.Second)
	defer scancel()
	if !cache.WaitForCacheSync(sctx.Done(), inf.HasSynced) {
		t.Fatal("informer did not sync within 20s")
	}
	var names []string
	for _, o := range inf.GetStore().List() {
		names = append(names, o.(*corev1.ConfigMap).Name)
	}
	sort.Strings(names)
	return names
}

// TestInformerRestartOffline: an informer that synced through outpost
// online syncs again, with the same objects, when it restarts while the
// cloud is unreachable (WatchList, as client-go does by default); a plain
// list+watch gets bookmarks; the watch ends when the cloud returns.
func TestInformerRestartOffline(t *testing.T) {
	ctx := t.Context()
	const ns = "informers"
	if _, err := cp.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"one", "two", "three"} {
		if _, err := cp.Client().CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	o := cp.StartOutpostT(t, "edge-informer")
	token := cp.ServiceAccountToken(t, "default", "reader", framework.ReaderRole)
	c := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", token))

	online := syncedNames(t, ctx, c, ns)
	if len(online) != 3 {
		t.Fatalf("online informer: %v", online)
	}
	list, err := c.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{}) // the legacy path's list
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)

	if err := cp.StopAPIServer(0); err != nil {
		t.Fatal(err)
	}
	restarted := false
	defer func() {
		if !restarted {
			_ = cp.StartAPIServer(0)
		}
	}()
	offline := syncedNames(t, ctx, c, ns)
	if len(offline) != 3 || offline[0] != online[0] || offline[2] != online[2] {
		t.Fatalf("offline informer synced %v, online %v", offline, online)
	}

	// Without WatchList: list, then watch from the list's resourceVersion.
	offList, err := c.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
	if err != nil || len(offList.Items) != 3 || offList.ResourceVersion != list.ResourceVersion {
		t.Fatalf("offline list: %v items at %q (online %q), %v", len(offList.Items), offList.ResourceVersion, list.ResourceVersion, err)
	}
	w, err := c.CoreV1().ConfigMaps(ns).Watch(ctx, metav1.ListOptions{ResourceVersion: offList.ResourceVersion, AllowWatchBookmarks: true})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	select {
	case ev := <-w.ResultChan():
		if ev.Type != watch.Bookmark {
			t.Fatalf("offline watch sent %s, want a BOOKMARK", ev.Type)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("no bookmark on the offline watch within 15s")
	}

	// The cloud returns: the offline watch ends, so the client re-watches upstream.
	if err := cp.StartAPIServer(0); err != nil {
		t.Fatal(err)
	}
	restarted = true
	deadline := time.After(20 * time.Second)
	for {
		select {
		case _, ok := <-w.ResultChan():
			if !ok {
				return
			}
		case <-deadline:
			t.Fatal("the offline watch did not end within 20s of the cloud returning")
		}
	}
}
