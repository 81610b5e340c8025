package edge

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
)

// TestFrozenThenConverged changes the cloud while the edge is cut off: the
// edge keeps answering with the state at the cut. When the link returns,
// reads and watches through outpost match the apiserver exactly, the event
// journaled offline reaches the cloud, and the store itself converges even
// for callers that stay quiet — which a second cut then proves, by serving
// the new state from the cache, without the objects deleted meanwhile.
func TestFrozenThenConverged(t *testing.T) {
	const (
		node = "frozen-node"
		ns   = "frozen"
		sel  = "set=frozen"
	)
	ctx := t.Context()
	admin := cp.Client()
	nodeNamespace(t, node, ns)
	createConfigMaps(t, ns, "cm", 8, "frozen", "at-start")
	// Pods bound to the node (no kubelet runs them), each mounting a
	// ConfigMap, so that the Node authorizer lets the node read it.
	for i := range 6 {
		if _, err := admin.CoreV1().Pods(ns).Create(ctx, boundPod(fmt.Sprintf("p-%d", i), node, fmt.Sprintf("cm-%d", i)), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// Outages shorter than the flap window resume without re-listing;
	// this cut lasts longer than this one.
	const flapWindow = 3 * time.Second
	e := startEdge(t, node, "--flap-window="+flapWindow.String())
	kubelet := e.nodeClient(t)
	reader := e.tokenClient(t, readerToken(t, "frozen-reader"))
	quiet := e.tokenClient(t, readerToken(t, "frozen-quiet"))
	nodePods := metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String()}
	selected := metav1.ListOptions{LabelSelector: sel}

	// Online, through outpost: what each caller reads is recorded.
	//   - the node, as its kubelet does: its pods, its Node, its ConfigMaps;
	//   - a quiet caller that reads once and then never again;
	//   - a reader with an informer (a watch) that stays open throughout.
	mustList := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("online %s through outpost: %v", what, err)
		}
	}
	_, err := kubelet.CoreV1().Pods("").List(ctx, nodePods)
	mustList("node lists its pods", err)
	_, err = kubelet.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	mustList("node gets its Node", err)
	for i := range 6 {
		_, err = kubelet.CoreV1().ConfigMaps(ns).Get(ctx, fmt.Sprintf("cm-%d", i), metav1.GetOptions{})
		mustList("node gets a ConfigMap of its pods", err)
	}
	_, err = quiet.CoreV1().ConfigMaps(ns).List(ctx, selected)
	mustList("quiet caller lists", err)
	for _, name := range []string{"cm-1", "cm-2"} {
		_, err = quiet.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
		mustList("quiet caller gets", err)
	}
	_, err = reader.CoreV1().ConfigMaps(ns).List(ctx, selected)
	mustList("reader lists", err)
	informerState := configMapInformer(t, reader, ns, sel)
	cloudConfigMaps, cloudPods := listedConfigMaps(admin, ns, sel), listedPods(admin, nodePods)
	// cloudState is what the apiserver holds now: the selected ConfigMaps
	// and the node's pods.
	cloudState := func() (configMaps, pods string) {
		t.Helper()
		configMaps, err := cloudConfigMaps(ctx)
		if err != nil {
			t.Fatal(err)
		}
		pods, err = cloudPods(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return configMaps, pods
	}
	time.Sleep(time.Second) // the recorder writes in batches

	cmsAtCut, podsAtCut := cloudState()
	cm1AtCut, err := admin.CoreV1().ConfigMaps(ns).Get(ctx, "cm-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm2AtCut, err := admin.CoreV1().ConfigMaps(ns).Get(ctx, "cm-2", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := waitFor(t, 10*time.Second, "informer through outpost holds the cloud's state before the cut", func(context.Context) (bool, string) {
		got := informerState()
		return got == cmsAtCut, diff(cmsAtCut, got)
	}); !ok {
		t.FailNow()
	}

	// The cut.
	cutAt := e.cut(t, reader, func(ctx context.Context) error {
		_, err := reader.CoreV1().ConfigMaps(ns).List(ctx, selected)
		return err
	})

	// The cloud changes meanwhile.
	cm1 := cm1AtCut.DeepCopy()
	cm1.Data["v"] = "changed-during-cut"
	if _, err := admin.CoreV1().ConfigMaps(ns).Update(ctx, cm1, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := admin.CoreV1().ConfigMaps(ns).Delete(ctx, "cm-2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	cmNew := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "cm-new", Labels: map[string]string{"set": "frozen"}}, Data: map[string]string{"v": "born-during-cut"}}
	if _, err := admin.CoreV1().ConfigMaps(ns).Create(ctx, cmNew, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	relabel := []byte(`{"metadata":{"labels":{"set":"other"}}}`)
	if _, err := admin.CoreV1().ConfigMaps(ns).Patch(ctx, "cm-3", "application/merge-patch+json", relabel, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := admin.CoreV1().Pods(ns).Delete(ctx, "p-2", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Pods(ns).Create(ctx, boundPod("p-new", node, "cm-0"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Pods(ns).Patch(ctx, "p-1", "application/merge-patch+json", []byte(`{"metadata":{"labels":{"changed":"during-cut"}}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	// And the node posts an event, as its kubelet would: journaled.
	message := fmt.Sprintf("journaled while cut off at %s", time.Now().Format(time.RFC3339Nano))
	p0, err := admin.CoreV1().Pods(ns).Get(ctx, "p-0", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ev := &corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{Name: fmt.Sprintf("p-0.offline-%d", time.Now().UnixNano()), Namespace: ns},
		InvolvedObject: corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: "p-0", UID: p0.UID, APIVersion: "v1"},
		Reason:         "EdgeOffline", Message: message, Type: corev1.EventTypeNormal,
		Source:         corev1.EventSource{Component: "kubelet", Host: node},
		FirstTimestamp: metav1.Now(), LastTimestamp: metav1.Now(), Count: 1,
	}
	if got, err := kubelet.CoreV1().Events(ns).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		t.Errorf("offline event through outpost: %v; want it journaled (201)", err)
	} else if got.UID == "" || got.ResourceVersion == "" {
		t.Errorf("offline event answered without uid or resourceVersion: %+v", got.ObjectMeta)
	}
	time.Sleep(2 * time.Second) // anything leaking through would show by now

	// Frozen: every caller sees the state at the cut.
	frozen := func(what, want string, read func(context.Context) (string, error)) {
		t.Helper()
		got, err := read(ctx)
		if err != nil {
			t.Errorf("offline %s: %v", what, err)
		} else if got != want {
			t.Errorf("offline %s is not the state at the cut:\n%s", what, diff(want, got))
		}
	}
	listConfigMaps := func(c *counted) func(context.Context) (string, error) { return listedConfigMaps(c, ns, sel) }
	listNodePods := listedPods(kubelet, nodePods)
	getConfigMap := func(c *counted, name string) func(context.Context) (string, error) {
		return func(ctx context.Context) (string, error) {
			cm, err := c.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return "", err
			}
			return configMapLine(cm), nil
		}
	}
	frozen("reader list", cmsAtCut, listConfigMaps(reader))
	frozen("quiet caller list", cmsAtCut, listConfigMaps(quiet))
	frozen("quiet caller get of cm-2 (deleted in the cloud)", configMapLine(cm2AtCut), getConfigMap(quiet, "cm-2"))
	frozen("node list of its pods", podsAtCut, listNodePods)
	frozen("node get of cm-1 (changed in the cloud)", configMapLine(cm1AtCut), getConfigMap(kubelet, "cm-1"))
	if got := informerState(); got != cmsAtCut {
		t.Errorf("offline, the informer through outpost left the state at the cut:\n%s", diff(cmsAtCut, got))
	}
	if l, err := admin.CoreV1().Events(ns).List(ctx, metav1.ListOptions{}); err == nil {
		for _, ev := range l.Items {
			if ev.Message == message {
				t.Errorf("the offline event reached the cloud while the link was cut")
			}
		}
	}

	// The link returns, after an outage longer than the flap window.
	time.Sleep(time.Until(cutAt.Add(flapWindow + 2*time.Second)))
	restoreAt := e.restore(t)

	cmsNow, podsNow := cloudState()
	if cmsNow == cmsAtCut || podsNow == podsAtCut {
		t.Fatal("the cloud did not change during the cut")
	}
	converged := func(what string, want func(context.Context) (string, error), read func(context.Context) (string, error)) {
		t.Helper()
		_, ok := waitFor(t, 30*time.Second, what+" matches the apiserver", func(ctx context.Context) (bool, string) {
			w, err := want(ctx)
			if err != nil {
				return false, err.Error()
			}
			got, err := read(ctx)
			if err != nil {
				return false, err.Error()
			}
			return got == w, diff(w, got)
		})
		if ok {
			figure(t, "link back → %s converged: %v", what, ms(time.Since(restoreAt)))
		}
	}
	converged("reader list", cloudConfigMaps, listConfigMaps(reader))
	converged("node list of its pods", cloudPods, listNodePods)
	converged("informer (watch through outpost)", cloudConfigMaps, func(context.Context) (string, error) { return informerState(), nil })

	// A new watch through outpost follows the cloud.
	checkWatch(t, reader, ns, sel)

	// The event journaled offline reaches the cloud.
	if _, ok := waitFor(t, 30*time.Second, "the offline event replayed to the apiserver", func(ctx context.Context) (bool, string) {
		l, err := admin.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		for _, ev := range l.Items {
			if ev.Message == message {
				return true, ""
			}
		}
		return false, fmt.Sprintf("no event with message %q among %d", message, len(l.Items))
	}); ok {
		figure(t, "link back → offline event in the apiserver: %v", ms(time.Since(restoreAt)))
	}

	// Quiet callers: the node's views are re-listed in the background. A
	// view is marked updated when the re-list changed it, so wait for the
	// views whose objects changed in the cloud, then for the views to settle.
	if _, ok := waitFor(t, 30*time.Second, "the node's views of objects changed in the cloud re-listed after the reconnect", func(ctx context.Context) (bool, string) {
		views, err := e.views(ctx)
		if err != nil {
			return false, err.Error()
		}
		var waiting []string
		for _, v := range views {
			changed := v.Key.Resource == "/v1/pods" || v.Key.Resource == "/v1/configmaps" && v.Key.Name == "cm-1"
			if v.Key.Identity == "system:node:"+node && changed && !v.Updated.After(restoreAt) {
				waiting = append(waiting, v.String())
			}
		}
		return len(waiting) == 0, "not re-listed: " + strings.Join(waiting, "; ")
	}); ok {
		figure(t, "link back → quiet node views re-listed: %v", ms(time.Since(restoreAt)))
	}
	e.waitViewsSettled(t, 2*time.Second, 15*time.Second)

	// A second cut proves what the store now holds: the new state, for
	// quiet callers too, and no trace of the objects deleted meanwhile.
	cmsNow, podsNow = cloudState()
	cm1Now, err := admin.CoreV1().ConfigMaps(ns).Get(ctx, "cm-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	recut := time.Now()
	e.proxy.Blackhole()
	defer e.proxy.Pass()
	if _, err := e.waitState(ctx, "offline", 15*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("second cut %v after the link returned", ms(recut.Sub(restoreAt)))
	stored := func(what, want string, read func(context.Context) (string, error)) {
		t.Helper()
		got, err := read(ctx)
		if err != nil {
			t.Errorf("after the reconnect, offline %s: %v", what, err)
		} else if got != want {
			t.Errorf("after the reconnect, offline %s is not the cloud's state:\n%s", what, diff(want, got))
		}
	}
	stored("node list of its pods (re-listed in the background)", podsNow, listNodePods)
	stored("node get of cm-1 (re-listed in the background)", configMapLine(cm1Now), getConfigMap(kubelet, "cm-1"))
	stored("reader list (its informer re-listed)", cmsNow, listConfigMaps(reader))
	// cm-2 is gone, and so is p-2 that gave the node the right to read it:
	// online the node now gets 403; offline it must not get the old object.
	if cm, err := kubelet.CoreV1().ConfigMaps(ns).Get(ctx, "cm-2", metav1.GetOptions{}); err == nil {
		t.Errorf("after the reconnect, offline node get of cm-2 (deleted in the cloud, and its pod too) still answers the object (rv %s); want it gone from the store", cm.ResourceVersion)
	} else if !apierrors.IsNotFound(err) && !apierrors.IsServiceUnavailable(err) && !apierrors.IsForbidden(err) {
		t.Errorf("after the reconnect, offline node get of cm-2 (deleted in the cloud): %v; want 404, 403 or 503 (not cached)", err)
	}
	// The contract: every view is re-listed, so even a caller that never
	// comes back online is served the cloud's state, not a deleted object.
	stored("quiet caller list (never read again online)", cmsNow, listConfigMaps(quiet))
	if cm, err := quiet.CoreV1().ConfigMaps(ns).Get(ctx, "cm-2", metav1.GetOptions{}); err == nil {
		t.Errorf("after the reconnect, offline quiet caller get of cm-2 (deleted in the cloud) still answers it (rv %s); want it gone from the store", cm.ResourceVersion)
	}
}

// checkWatch opens a watch through outpost from the current list and
// checks that an object created in the cloud arrives on it.
func checkWatch(t *testing.T, c *counted, ns, sel string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	l, err := c.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
	if err != nil {
		t.Errorf("list through outpost after the reconnect: %v", err)
		return
	}
	w, err := c.CoreV1().ConfigMaps(ns).Watch(ctx, metav1.ListOptions{LabelSelector: sel, ResourceVersion: l.ResourceVersion})
	if err != nil {
		t.Errorf("watch through outpost after the reconnect: %v", err)
		return
	}
	defer w.Stop()
	name := fmt.Sprintf("cm-late-%d", time.Now().UnixNano())
	created, err := cp.Client().CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"set": strings.TrimPrefix(sel, "set=")}},
		Data:       map[string]string{"v": "after"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				t.Errorf("watch through outpost ended before %s arrived", name)
				return
			}
			if cm, isCM := ev.Object.(*corev1.ConfigMap); isCM && ev.Type == watch.Added && cm.Name == name {
				if cm.ResourceVersion != created.ResourceVersion {
					t.Errorf("watch event for %s: rv %s, the apiserver created rv %s", name, cm.ResourceVersion, created.ResourceVersion)
				}
				// Leave the cloud as the test's other checks expect it.
				_ = cp.Client().CoreV1().ConfigMaps(ns).Delete(ctx, name, metav1.DeleteOptions{})
				return
			}
		case <-ctx.Done():
			t.Errorf("watch through outpost: %s created in the cloud never arrived", name)
			return
		}
	}
}

// boundPod is a pod bound to node that no kubelet runs, mounting configMap.
func boundPod(name, node, configMap string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": "frozen"}},
		Spec: corev1.PodSpec{
			NodeName:                     node,
			AutomountServiceAccountToken: new(false),
			Containers:                   []corev1.Container{{Name: "c", Image: "example.invalid/none:1"}},
			Volumes: []corev1.Volume{{Name: "cfg", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
				LocalObjectReference: corev1.LocalObjectReference{Name: configMap},
			}}}},
		},
	}
}

// storedView is what outpost's /debug/cache/views says of one view.
type storedView struct {
	Key struct {
		Identity, Resource, Namespace, Name, LabelSelector, FieldSelector string
	}
	ResourceVersion string
	Updated         time.Time
	Stale           bool
}

func (v storedView) String() string {
	s := v.Key.Identity + " " + v.Key.Resource
	for _, part := range []string{v.Key.Namespace, v.Key.Name, v.Key.LabelSelector, v.Key.FieldSelector} {
		if part != "" {
			s += " " + part
		}
	}
	return s + fmt.Sprintf(" (rv %s, updated %s)", v.ResourceVersion, v.Updated.Format("15:04:05.000"))
}

// waitViewsSettled waits until outpost's views have not changed for quiet,
// so that a background re-list has finished.
func (e *edge) waitViewsSettled(t *testing.T, quiet, timeout time.Duration) {
	t.Helper()
	var last string
	since := time.Now()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		views, err := e.views(t.Context())
		if err != nil {
			t.Errorf("reading outpost's views: %v", err)
			return
		}
		var lines []string
		for _, v := range views {
			lines = append(lines, v.String())
		}
		now := strings.Join(lines, "\n")
		if now != last {
			last, since = now, time.Now()
		} else if time.Since(since) >= quiet {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("outpost's views still changing after %v", timeout)
}

func (e *edge) views(ctx context.Context) ([]storedView, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.o.AdminURL+"/debug/cache/views", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("/debug/cache/views: %s", resp.Status)
	}
	var views []storedView
	err = json.NewDecoder(resp.Body).Decode(&views)
	return views, err
}
