package share_test

import (
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestImpersonatedAsDirect: "boss" may read everything and impersonate
// "tenant", which may read nothing. Boss's reads as tenant are refused
// through outpost as directly, though boss's own stream of the scope runs.
func TestImpersonatedAsDirect(t *testing.T) {
	ctx := t.Context()
	const ns = "imp"
	createNamespace(t, ns)
	createConfigMap(t, ns, "cm-imp")
	bossToken := cp.ServiceAccountToken(t, ns, "boss", framework.ReaderRole)
	cp.ServiceAccountToken(t, ns, "tenant", "")
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "share-impersonate"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"serviceaccounts"}, Verbs: []string{"impersonate"}}}}
	if _, err := cp.Client().RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "share-impersonate"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role.Name},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "boss", Namespace: ns}}}
	if _, err := cp.Client().RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cp.Client().RbacV1().ClusterRoleBindings().Delete(ctx, binding.Name, metav1.DeleteOptions{})
		_ = cp.Client().RbacV1().ClusterRoles().Delete(ctx, role.Name, metav1.DeleteOptions{})
	})
	as := rest.ImpersonationConfig{UserName: "system:serviceaccount:" + ns + ":tenant"}
	rv0 := metav1.ListOptions{ResourceVersion: "0"}

	direct := rest.CopyConfig(cp.AdminConfig())
	direct.CertFile, direct.KeyFile, direct.CertData, direct.KeyData = "", "", nil, nil
	direct.BearerToken, direct.Impersonate = bossToken, as
	eventually(t, 20*time.Second, func() error {
		_, err := kubernetes.NewForConfigOrDie(direct).CoreV1().ConfigMaps(ns).List(ctx, rv0)
		if apierrors.IsForbidden(err) {
			return nil
		}
		return fmt.Errorf("directly, boss as tenant: %v, want 403", err)
	})

	o := cp.StartOutpostT(t, "edge-imp", "--watch-cache")
	boss := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", bossToken)).CoreV1()
	if _, err := boss.ConfigMaps(ns).List(ctx, rv0); err != nil {
		t.Fatal(err)
	}
	before := served(t, o, "list")
	if _, err := boss.ConfigMaps(ns).List(ctx, rv0); err != nil || served(t, o, "list") != before+1 {
		t.Fatalf("boss's own list was not served from the watch cache: %v", err)
	}
	cfg := o.ClientConfig("", "", bossToken)
	cfg.Impersonate = as
	tenant := kubernetes.NewForConfigOrDie(cfg).CoreV1()
	for _, opts := range []metav1.ListOptions{rv0, {}} {
		if l, err := tenant.ConfigMaps(ns).List(ctx, opts); !apierrors.IsForbidden(err) {
			t.Errorf("through outpost, boss as tenant, LIST %+v: %d items, %v; want 403 as directly", opts, len(l.Items), err)
		}
	}
	if w, err := tenant.ConfigMaps(ns).Watch(ctx, metav1.ListOptions{ResourceVersion: "0"}); !apierrors.IsForbidden(err) {
		if w != nil {
			w.Stop()
		}
		t.Errorf("through outpost, boss as tenant, WATCH: %v; want 403 as directly", err)
	}
}

// TestRefusedCallerLeavesScopeShared: a service account with no right to
// read ConfigMaps asks for a scope first; one allowed is still served
// from the watch cache.
func TestRefusedCallerLeavesScopeShared(t *testing.T) {
	ctx := t.Context()
	createNamespace(t, "rf")
	createConfigMap(t, "rf", "cm-rf")
	goodToken := cp.ServiceAccountToken(t, "rf", "good", framework.ReaderRole)
	nosyToken := cp.ServiceAccountToken(t, "rf", "nosy", "")
	o := cp.StartOutpostT(t, "edge-refused", "--watch-cache")
	nosy := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", nosyToken)).CoreV1()
	good := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", goodToken)).CoreV1()
	rv0 := metav1.ListOptions{ResourceVersion: "0"}
	if _, err := nosy.ConfigMaps("rf").List(ctx, rv0); !apierrors.IsForbidden(err) {
		t.Fatalf("nosy's list: %v, want 403", err)
	}
	// The first may start the stream; each later one is served from it.
	if _, err := good.ConfigMaps("rf").List(ctx, rv0); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := nosy.ConfigMaps("rf").List(ctx, rv0); !apierrors.IsForbidden(err) {
			t.Fatalf("nosy's list: %v, want 403", err)
		}
		before := served(t, o, "list")
		if _, err := good.ConfigMaps("rf").List(ctx, rv0); err != nil {
			t.Fatal(err)
		}
		if served(t, o, "list") != before+1 {
			t.Errorf("try %d: the allowed caller was not served from the watch cache after a refused one asked for its scope", i)
		}
	}
}

// TestRecordedCallerKeptOffline: with --record-identities naming only
// namespace rb's accounts, one of them was served from an unrecorded
// account's stream, which nothing recorded: offline it got nothing.
func TestRecordedCallerKeptOffline(t *testing.T) {
	ctx := t.Context()
	createNamespace(t, "ra")
	createNamespace(t, "rb")
	createConfigMap(t, "rb", "cm-rb")
	wideToken := cp.ServiceAccountToken(t, "ra", "wide", framework.ReaderRole)
	narrowToken := cp.ServiceAccountToken(t, "rb", "narrow", framework.ReaderRole)
	o, link := cp.StartOutpostWithLinkT(t, "edge-recid", "--watch-cache", "--probe-interval=500ms", "--record-identities=system:serviceaccount:rb:*")
	wide := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", wideToken)).CoreV1()
	narrow := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", narrowToken)).CoreV1()
	if _, err := wide.ConfigMaps("").List(ctx, metav1.ListOptions{ResourceVersion: "0"}); err != nil {
		t.Fatal(err)
	}
	if l, err := narrow.ConfigMaps("rb").List(ctx, metav1.ListOptions{ResourceVersion: "0"}); err != nil || len(l.Items) != 1 {
		t.Fatalf("narrow's list online: %v %v", l, err)
	}
	link.Blackhole()
	if _, err := o.WaitState(ctx, "offline", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if l, err := narrow.ConfigMaps("rb").List(ctx, metav1.ListOptions{}); err != nil || len(names(l)) != 1 || names(l)[0] != "rb/cm-rb" {
		t.Errorf("offline, narrow (an identity recorded) got %v, %v; want cm-rb", l, err)
	}
}

// TestGrantPinnedAtLossOfAccess: the node reads its pod's ConfigMap by
// name, served from another account's stream. The pod is deleted, so the
// Node authorizer no longer lets the node read it, and the ConfigMap
// changes. Offline, the node was answered the new content.
func TestGrantPinnedAtLossOfAccess(t *testing.T) {
	ctx := t.Context()
	const ns, node = "grantns", "edge-grant"
	createNamespace(t, ns)
	if _, err := cp.Client().CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "pod-config"}, Data: map[string]string{"password": "v1"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wideToken := cp.ServiceAccountToken(t, ns, "wide", framework.ReaderRole)
	// A short recheck: stored grants are reviewed 1–2 s after a reconnect.
	o, link := cp.StartOutpostWithLinkT(t, node, "--watch-cache", "--probe-interval=500ms", "--watch-cache-recheck=4s")
	wide := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", wideToken)).CoreV1()
	// Wide's stream of the namespace, kept open by its watch.
	l, err := wide.ConfigMaps(ns).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
	if err != nil {
		t.Fatal(err)
	}
	ww, err := wide.ConfigMaps(ns).Watch(ctx, metav1.ListOptions{ResourceVersion: l.ResourceVersion})
	if err != nil {
		t.Fatal(err)
	}
	defer ww.Stop()

	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "user"}, Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: "wide",
		Containers: []corev1.Container{{Name: "c", Image: "none"}},
		Volumes:    []corev1.Volume{{Name: "cfg", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "pod-config"}}}}}}}
	if _, err := cp.Client().CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	crt, key, err := cp.NodeCredentials(node)
	if err != nil {
		t.Fatal(err)
	}
	nodeDirect := rest.CopyConfig(cp.AdminConfig())
	nodeDirect.CertData, nodeDirect.KeyData, nodeDirect.BearerToken = nil, nil, ""
	nodeDirect.CertFile, nodeDirect.KeyFile = crt, key
	byName := metav1.ListOptions{FieldSelector: "metadata.name=pod-config", ResourceVersion: "0"}
	eventually(t, 20*time.Second, func() error {
		_, err := kubernetes.NewForConfigOrDie(nodeDirect).CoreV1().ConfigMaps(ns).List(ctx, byName)
		return err
	})
	kubelet := kubernetes.NewForConfigOrDie(o.ClientConfig(crt, key, "")).CoreV1()
	before := served(t, o, "list")
	got, err := kubelet.ConfigMaps(ns).List(ctx, byName)
	if err != nil || len(got.Items) != 1 {
		t.Fatalf("the node's list by name: %v %v", got, err)
	}
	if served(t, o, "list") != before+1 {
		t.Fatal("the node's list by name was not served from the watch cache")
	}

	// The pod goes: the node may no longer read the ConfigMap, which changes.
	if err := cp.Client().CoreV1().Pods(ns).Delete(ctx, "user", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, func() error {
		_, err := kubernetes.NewForConfigOrDie(nodeDirect).CoreV1().ConfigMaps(ns).List(ctx, byName)
		if apierrors.IsForbidden(err) {
			return nil
		}
		return fmt.Errorf("directly, the node still reads it: %v", err)
	})
	cm, err := cp.Client().CoreV1().ConfigMaps(ns).Get(ctx, "pod-config", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm.Data["password"] = "v2-rotated"
	if _, err := cp.Client().CoreV1().ConfigMaps(ns).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	nextEvent(t, ww, 10*time.Second) // the stream has it, and so does wide's view
	eventually(t, 10*time.Second, func() error {
		l, err := wide.ConfigMaps(ns).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
		if err != nil || len(l.Items) != 1 || l.Items[0].Data["password"] != "v2-rotated" {
			return fmt.Errorf("wide's list: %v %v", l, err)
		}
		return nil
	})
	link.Blackhole()
	if _, err := o.WaitState(ctx, "offline", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	// Wide itself is answered the new content offline; the node, never
	// what changed after it lost the right to read it. The store keeps
	// only the new content, so its grant cannot answer as of what it was
	// served: it answers nothing (a list without the ConfigMap, which
	// exists, would be a partial one).
	if l, err := wide.ConfigMaps(ns).List(ctx, metav1.ListOptions{}); err != nil || len(l.Items) != 1 || l.Items[0].Data["password"] != "v2-rotated" {
		t.Errorf("offline, wide's list: %v %v", l, err)
	}
	off, err := kubelet.ConfigMaps(ns).List(ctx, metav1.ListOptions{FieldSelector: "metadata.name=pod-config"})
	switch {
	case err == nil:
		t.Errorf("offline, the node was answered %d items from a grant whose object changed after its pin: %v", len(off.Items), off.Items)
	case !apierrors.IsServiceUnavailable(err):
		t.Errorf("offline, the node's list by name: %v; want 503", err)
	}

	// Back online, the stored grant is reviewed again with the node's
	// credentials, the apiserver says no, and it goes: offline again, the
	// node is answered nothing from it.
	link.Pass()
	if _, err := o.WaitState(ctx, "online", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(4 * time.Second)
	link.Blackhole()
	if _, err := o.WaitState(ctx, "offline", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if l, err := kubelet.ConfigMaps(ns).List(ctx, metav1.ListOptions{FieldSelector: "metadata.name=pod-config"}); err == nil {
		t.Errorf("offline after a reconnect, the node was still answered from a grant the apiserver no longer allows: %d items", len(l.Items))
	}
	if l, err := wide.ConfigMaps(ns).List(ctx, metav1.ListOptions{}); err != nil || len(l.Items) != 1 {
		t.Errorf("offline after a reconnect, wide's own list: %v %v", l, err)
	}
}

// TestOwnerOfflineListsWhole: the owner of a namespace's stream lists with
// a label selector, once upstream (consistent) and then from its own
// stream; ConfigMaps it selects then change while it does not watch them
// with that selector. Offline, its list with the selector holds every one
// of them, as the chaos soak's reader must: it was once answered from a
// grant on its own view, pinned to what it was last served, which left out
// everything patched since.
func TestOwnerOfflineListsWhole(t *testing.T) {
	ctx := t.Context()
	const ns, n = "ownerns", 10
	createNamespace(t, ns)
	for i := range n {
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cm-%d", i), Labels: map[string]string{"set": "a"}}, Data: map[string]string{"v": "0"}}
		if _, err := cp.Client().CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	token := cp.ServiceAccountToken(t, ns, "owner", framework.ReaderRole)
	o, link := cp.StartOutpostWithLinkT(t, "edge-owner", "--watch-cache", "--probe-interval=500ms")
	owner := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", token)).CoreV1()
	sel := metav1.ListOptions{LabelSelector: "set=a"}
	if _, err := owner.ConfigMaps(ns).List(ctx, sel); err != nil { // upstream, recorded
		t.Fatal(err)
	}
	// Its stream of the namespace, kept open by its watch.
	l, err := owner.ConfigMaps(ns).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
	if err != nil {
		t.Fatal(err)
	}
	w, err := owner.ConfigMaps(ns).Watch(ctx, metav1.ListOptions{ResourceVersion: l.ResourceVersion})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	patch := func(i int, v string) {
		t.Helper()
		if _, err := cp.Client().CoreV1().ConfigMaps(ns).Patch(ctx, fmt.Sprintf("cm-%d", i), types.MergePatchType, fmt.Appendf(nil, `{"data":{"v":%q}}`, v), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		nextEvent(t, w, 10*time.Second)
	}
	// A change after the recorded list: the stream is then newer than it.
	patch(n-1, "x")
	before := served(t, o, "list")
	if _, err := owner.ConfigMaps(ns).List(ctx, metav1.ListOptions{LabelSelector: "set=a", ResourceVersion: "0"}); err != nil {
		t.Fatal(err)
	}
	if served(t, o, "list") != before+1 {
		t.Fatal("the owner's list with a selector was not served from its stream")
	}
	for i := range n / 2 {
		patch(i, fmt.Sprint(i+1))
	}
	time.Sleep(time.Second) // the recorder writes in batches
	link.Blackhole()
	if _, err := o.WaitState(ctx, "offline", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	off, err := owner.ConfigMaps(ns).List(ctx, sel)
	if err != nil || len(off.Items) != n {
		t.Fatalf("offline, the owner's list with a selector: %d of %d ConfigMaps, %v", len(off.Items), n, err)
	}
}
