package share_test

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// served is how many answers outpost gave from shared streams, by verb.
func served(t *testing.T, o *framework.Outpost, verb string) float64 {
	t.Helper()
	n, err := o.Metric("outpost_watchcache_served_total", "verb="+verb)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func names(l *corev1.ConfigMapList) []string {
	var out []string
	for _, cm := range l.Items {
		out = append(out, cm.Namespace+"/"+cm.Name)
	}
	slices.Sort(out)
	return out
}

func createConfigMap(t *testing.T, ns, name string) {
	t.Helper()
	if _, err := cp.Client().CoreV1().ConfigMaps(ns).Create(t.Context(), &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name}, Data: map[string]string{"v": "1"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// nextEvent returns the next event of w that is not a bookmark, or fails.
func nextEvent(t *testing.T, w watch.Interface, within time.Duration) watch.Event {
	t.Helper()
	timer := time.NewTimer(within)
	defer timer.Stop()
	for {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				t.Fatal("the watch ended")
			}
			if ev.Type == watch.Bookmark {
				continue
			}
			return ev
		case <-timer.C:
			t.Fatalf("no event within %v", within)
		}
	}
}

// TestTooOldGone checks that a watch from a resourceVersion older than
// what the shared stream keeps gets 410 Gone as it does directly, while
// one from a version it keeps gets every change after it.
func TestTooOldGone(t *testing.T) {
	const ns = "gone"
	createNamespace(t, ns)
	token := cp.ServiceAccountToken(t, ns, "agent", framework.ReaderRole)
	createConfigMap(t, ns, "first")
	// A restarted apiserver's watch cache begins now: resourceVersion 1
	// is then too old for it, as it is for outpost's stream, which begins
	// later still. (A fresh apiserver's cache holds every version since
	// the cluster began.)
	if err := cp.StopAPIServer(0); err != nil {
		t.Fatal(err)
	}
	if err := cp.StartAPIServer(0); err != nil {
		t.Fatal(err)
	}
	o, _ := cp.StartOutpostWithLinkT(t, "edge-gone", "--watch-cache")
	c := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", token)).CoreV1().ConfigMaps(ns)
	ctx := t.Context()
	l, err := c.List(ctx, metav1.ListOptions{ResourceVersion: "0"})
	if err != nil {
		t.Fatal(err)
	}
	if n := served(t, o, "list"); n != 1 {
		t.Fatalf("outpost served %v lists from the watch cache, want 1", n)
	}

	for _, via := range []struct {
		name string
		c    interface {
			Watch(context.Context, metav1.ListOptions) (watch.Interface, error)
		}
	}{{"directly", cp.Client().CoreV1().ConfigMaps(ns)}, {"through outpost", c}} {
		w, err := via.c.Watch(ctx, metav1.ListOptions{ResourceVersion: "1"})
		if err != nil {
			t.Fatalf("%s: %v", via.name, err)
		}
		ev := nextEvent(t, w, 10*time.Second)
		w.Stop()
		st, ok := ev.Object.(*metav1.Status)
		if ev.Type != watch.Error || !ok || st.Code != http.StatusGone {
			t.Fatalf("%s: a watch from resourceVersion 1 got %s %#v, want ERROR 410", via.name, ev.Type, ev.Object)
		}
	}
	if n, err := o.Metric("outpost_watchcache_expired_total"); err != nil || n != 1 {
		t.Fatalf("outpost answered %v watches 410 from the watch cache (err %v), want 1", n, err)
	}

	// From the list's version: the next change, and nothing before it.
	w, err := c.Watch(ctx, metav1.ListOptions{ResourceVersion: l.ResourceVersion})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	createConfigMap(t, ns, "second")
	ev := nextEvent(t, w, 10*time.Second)
	if cm, ok := ev.Object.(*corev1.ConfigMap); ev.Type != watch.Added || !ok || cm.Name != "second" {
		t.Fatalf("watch from %s got %s %#v, want ADDED second", l.ResourceVersion, ev.Type, ev.Object)
	}
	if n := served(t, o, "watch"); n != 2 {
		t.Fatalf("outpost served %v watches from the watch cache, want 2", n)
	}
}

// TestIdentitiesKeptApart runs two service accounts through one outpost:
// "wide" may read ConfigMaps everywhere, "narrow" only in namespace b.
// Narrow's reads of b are served from wide's stream, filtered; nothing of
// namespace a ever reaches narrow; what narrow may not read is refused by
// the apiserver itself; after its binding is deleted, its shared watch
// ends within the recheck time and it is refused. Offline, and after
// outpost restarts offline, each is answered what it read online.
func TestIdentitiesKeptApart(t *testing.T) {
	ctx := t.Context()
	createNamespace(t, "a")
	createNamespace(t, "b")
	wideToken := cp.ServiceAccountToken(t, "a", "wide", framework.ReaderRole)
	narrowToken := cp.ServiceAccountToken(t, "b", "narrow", "")
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "cm-reader"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"get", "list", "watch"}}}}
	if _, err := cp.Client().RbacV1().Roles("b").Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "narrow"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "cm-reader"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "narrow", Namespace: "b"}}}
	if _, err := cp.Client().RbacV1().RoleBindings("b").Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"a", "b"} {
		createConfigMap(t, ns, "cm-"+ns)
	}
	o, link := cp.StartOutpostWithLinkT(t, "edge-rbac", "--watch-cache", "--watch-cache-recheck=3s", "--probe-interval=500ms")
	wide := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", wideToken)).CoreV1()
	narrow := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", narrowToken)).CoreV1()
	eventually(t, 20*time.Second, func() error {
		// The new binding counts once the authorizer has seen it.
		_, err := cp.Client().CoreV1().ConfigMaps("b").List(ctx, metav1.ListOptions{})
		return err
	})

	// Wide's stream of every namespace.
	all, err := wide.ConfigMaps("").List(ctx, metav1.ListOptions{ResourceVersion: "0"})
	if err != nil {
		t.Fatal(err)
	}
	if got := names(all); !slices.Contains(got, "a/cm-a") || !slices.Contains(got, "b/cm-b") {
		t.Fatalf("wide listed %v", got)
	}
	wideWatch, err := wide.ConfigMaps("").Watch(ctx, metav1.ListOptions{ResourceVersion: all.ResourceVersion})
	if err != nil {
		t.Fatal(err)
	}
	defer wideWatch.Stop()
	before := apiserverWatches(t, "configmaps")

	// Narrow, in b: from wide's stream, filtered.
	lists := served(t, o, "list")
	eventually(t, 20*time.Second, func() error {
		_, err := narrow.ConfigMaps("b").List(ctx, metav1.ListOptions{ResourceVersion: "0"})
		return err // its binding may take a moment to count
	})
	inB, err := narrow.ConfigMaps("b").List(ctx, metav1.ListOptions{ResourceVersion: "0"})
	if err != nil {
		t.Fatal(err)
	}
	if got := names(inB); !slices.Equal(got, []string{"b/cm-b"}) {
		t.Fatalf("narrow listed %v in b, want only b/cm-b", got)
	}
	if n := served(t, o, "list"); n < lists+2 {
		t.Fatalf("narrow's lists of b were not served from the watch cache (%v served, %v before)", n, lists)
	}
	narrowWatch, err := narrow.ConfigMaps("b").Watch(ctx, metav1.ListOptions{ResourceVersion: inB.ResourceVersion})
	if err != nil {
		t.Fatal(err)
	}
	defer narrowWatch.Stop()
	if n := apiserverWatches(t, "configmaps"); n != before {
		t.Fatalf("the apiserver serves %v configmap watches after narrow's, %v before: narrow's was not shared", n, before)
	}
	createConfigMap(t, "a", "secret-of-a")
	createConfigMap(t, "b", "news-of-b")
	ev := nextEvent(t, narrowWatch, 10*time.Second)
	if cm, ok := ev.Object.(*corev1.ConfigMap); !ok || cm.Namespace != "b" || cm.Name != "news-of-b" {
		t.Fatalf("narrow's watch of b got %s %#v, want ADDED b/news-of-b (and never a/secret-of-a)", ev.Type, ev.Object)
	}
	for _, want := range []string{"a/secret-of-a", "b/news-of-b"} {
		ev := nextEvent(t, wideWatch, 10*time.Second)
		if cm, ok := ev.Object.(*corev1.ConfigMap); !ok || cm.Namespace+"/"+cm.Name != want {
			t.Fatalf("wide's watch got %s %#v, want %s", ev.Type, ev.Object, want)
		}
	}

	// What narrow may not read, the apiserver refuses, as directly.
	if _, err := narrow.ConfigMaps("").List(ctx, metav1.ListOptions{ResourceVersion: "0"}); !apierrors.IsForbidden(err) {
		t.Fatalf("narrow's list of every namespace: %v, want 403", err)
	}
	if _, err := narrow.ConfigMaps("a").List(ctx, metav1.ListOptions{ResourceVersion: "0"}); !apierrors.IsForbidden(err) {
		t.Fatalf("narrow's list of a: %v, want 403", err)
	}
	if _, err := narrow.ConfigMaps("a").Watch(ctx, metav1.ListOptions{ResourceVersion: all.ResourceVersion}); !apierrors.IsForbidden(err) {
		t.Fatalf("narrow's watch of a: %v, want 403", err)
	}

	// Offline, each is answered what it read: narrow from wide's view,
	// still only b; and the same after outpost restarts offline.
	link.Blackhole()
	if _, err := o.WaitState(ctx, "offline", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	checkOffline := func(when string) {
		t.Helper()
		l, err := narrow.ConfigMaps("b").List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatalf("%s: narrow's list of b: %v", when, err)
		}
		if got := names(l); !slices.Equal(got, []string{"b/cm-b", "b/news-of-b"}) {
			t.Fatalf("%s: narrow's list of b: %v", when, got)
		}
		if _, err := narrow.ConfigMaps("").List(ctx, metav1.ListOptions{}); err == nil {
			t.Fatalf("%s: narrow listed every namespace from the cache", when)
		}
		if _, err := narrow.ConfigMaps("a").List(ctx, metav1.ListOptions{}); err == nil {
			t.Fatalf("%s: narrow listed namespace a from the cache", when)
		}
		l, err = wide.ConfigMaps("").List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatalf("%s: wide's list: %v", when, err)
		}
		if got := names(l); !slices.Contains(got, "a/secret-of-a") || !slices.Contains(got, "b/news-of-b") {
			t.Fatalf("%s: wide's list: %v", when, got)
		}
	}
	// Longer offline than the recheck time: reviews that cannot be made
	// take nothing back.
	time.Sleep(7 * time.Second)
	checkOffline("offline")
	o.Stop()
	if err := o.Start(ctx); err != nil {
		t.Fatal(err)
	}
	checkOffline("offline, after a restart")
	link.Pass()
	if _, err := o.WaitState(ctx, "online", 30*time.Second); err != nil {
		t.Fatal(err)
	}

	// Revoked: narrow's shared watch ends within the recheck time, and the
	// apiserver refuses it from then on.
	inB, err = narrow.ConfigMaps("b").List(ctx, metav1.ListOptions{ResourceVersion: "0"})
	if err != nil {
		t.Fatal(err)
	}
	narrowWatch, err = narrow.ConfigMaps("b").Watch(ctx, metav1.ListOptions{ResourceVersion: inB.ResourceVersion})
	if err != nil {
		t.Fatal(err)
	}
	defer narrowWatch.Stop()
	if err := cp.Client().RbacV1().RoleBindings("b").Delete(ctx, "narrow", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	for ended := false; !ended; {
		select {
		case ev, ok := <-narrowWatch.ResultChan():
			if !ok {
				ended = true
				break
			}
			if ev.Type != watch.Bookmark {
				t.Fatalf("narrow's watch got %s %#v after the revoke", ev.Type, ev.Object)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("narrow's shared watch still runs 30 s after its binding was deleted")
		}
	}
	t.Logf("narrow's shared watch ended %v after the revoke", time.Since(revoked).Round(100*time.Millisecond))
	eventually(t, 20*time.Second, func() error {
		if _, err := narrow.ConfigMaps("b").List(ctx, metav1.ListOptions{ResourceVersion: "0"}); !apierrors.IsForbidden(err) {
			return fmt.Errorf("narrow's list of b after the revoke: %v, want 403", err)
		}
		return nil
	})
	createConfigMap(t, "b", "after-revoke")
	if _, err := narrow.ConfigMaps("b").Watch(ctx, metav1.ListOptions{ResourceVersion: inB.ResourceVersion}); !apierrors.IsForbidden(err) {
		t.Fatalf("narrow's watch of b after the revoke: %v, want 403", err)
	}
}
