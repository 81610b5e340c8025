package edge

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/internal/report"
	"github.com/outposthq/outpost/test/e2e/framework"
)

// outpostStatus runs `outpost status` against o's admin endpoint with args
// and returns its exit code, stdout and stderr.
func outpostStatus(t *testing.T, o *framework.Outpost, args ...string) (int, string, string) {
	t.Helper()
	return runOutpost(t, append([]string{"status", "--admin-address", o.AdminURL}, args...)...)
}

// runOutpost runs the outpost command with args and returns its exit code,
// stdout and stderr.
func runOutpost(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	bin, err := framework.OutpostBinary()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, stdout.String(), stderr.String()
	case errors.As(err, &exit):
		return exit.ExitCode(), stdout.String(), stderr.String()
	}
	t.Fatalf("running outpost %s: %v", strings.Join(args, " "), err)
	return 0, "", ""
}

// statusReport runs `outpost status -o json` and decodes what it printed.
func statusReport(t *testing.T, o *framework.Outpost) (int, report.Report) {
	t.Helper()
	code, out, errOut := outpostStatus(t, o, "-o", "json")
	var r report.Report
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("outpost status -o json (exit %d): %v\n%s\n%s", code, err, out, errOut)
	}
	return code, r
}

// TestStatusCommand runs `outpost status` as an operator would, against a
// real outpost:
//   - online: exit 0, and it counts exactly the views outpost holds (by
//     resource and by identity, as /debug/cache/views lists them) and the
//     certificates it serves and calls with;
//   - cut off: exit 3, OFFLINE, the apiserver unhealthy, the event the
//     node's kubelet posted waiting in the journal;
//   - link back: exit 0, and the reconnect reported (the event replayed,
//     views re-listed), the journal empty;
//   - outpost stopped: exit 1 and one line saying so.
func TestStatusCommand(t *testing.T) {
	const node, ns = "status-node", "status"
	ctx := t.Context()
	nodeNamespace(t, node, ns)
	createConfigMaps(t, ns, "cm", 3, "status", "v")
	e := startEdge(t, node, "--flap-window=1s")
	kubelet := e.nodeClient(t)
	reader := e.tokenClient(t, readerToken(t, "status-reader"))
	read := func(ctx context.Context) error {
		_, err := reader.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
		return err
	}
	if err := read(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := kubelet.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	}

	// Online: what it says is what outpost holds.
	var code int
	var r report.Report
	var views []storedView
	if _, err := framework.Poll(ctx, 100*time.Millisecond, 10*time.Second, func(ctx context.Context) (bool, string) {
		code, r = statusReport(t, e.o)
		var err error
		if views, err = e.views(ctx); err != nil {
			return false, err.Error()
		}
		return r.Store.Views == len(views) && len(views) >= 2, fmt.Sprintf("status says %d views, /debug/cache/views lists %d", r.Store.Views, len(views))
	}); err != nil {
		t.Fatal(err)
	}
	if code != report.ExitOnline || r.State != report.Online || !r.Ready || r.Node != node || r.Version == "" {
		t.Errorf("online: exit %d, %+v", code, r)
	}
	if len(r.Apiservers) != 1 || !r.Apiservers[0].Healthy || r.Apiservers[0].LastResult != "ok" || !strings.Contains(r.Apiservers[0].URL, e.proxy.Addr()) {
		t.Errorf("online apiservers: %+v (want %s, healthy, last probe ok)", r.Apiservers, e.proxy.Addr())
	}
	byResource, byIdentity := map[string]int{}, map[string]int{}
	for _, v := range views {
		byResource[v.Key.Resource]++
		byIdentity[v.Key.Identity]++
	}
	if fmt.Sprint(byResource) != fmt.Sprint(r.Store.ByResource) || fmt.Sprint(byIdentity) != fmt.Sprint(r.Store.ByIdentity) {
		t.Errorf("views by resource %v and identity %v; status says %v and %v", byResource, byIdentity, r.Store.ByResource, r.Store.ByIdentity)
	}
	if r.Store.ByIdentity["system:node:"+node] == 0 || r.Store.ByIdentity["system:serviceaccount:default:status-reader"] == 0 || r.Store.Bytes == 0 {
		t.Errorf("store: %+v", r.Store)
	}
	certs := map[string]report.Certificate{}
	for _, c := range r.Certificates {
		certs[c.Name] = c
	}
	if c := certs["node-client"]; !strings.Contains(c.Subject, "CN=system:node:"+node) || !c.NotAfter.After(time.Now()) {
		t.Errorf("node client certificate: %+v", r.Certificates)
	}
	if c := certs["serving"]; c.NotAfter.IsZero() {
		t.Errorf("serving certificate: %+v", r.Certificates)
	}
	// The same figures as gauges, for alerts.
	if got := e.metric(t, "outpost_cache_views"); got != float64(r.Store.Views) {
		t.Errorf("outpost_cache_views sums to %v; status says %d views", got, r.Store.Views)
	}
	if got := e.metric(t, "outpost_certificate_expiry_timestamp_seconds", "name=node-client"); got != float64(certs["node-client"].NotAfter.Unix()) {
		t.Errorf("outpost_certificate_expiry_timestamp_seconds{name=node-client} = %v; status says %v", got, certs["node-client"].NotAfter)
	}
	if r.LastReconnect != nil || r.Journal.Depth != 0 || r.Journal.Max != 1000 {
		t.Errorf("online at start: last reconnect %+v, journal %+v", r.LastReconnect, r.Journal)
	}

	// Cut off: the node's kubelet posts an event, which waits.
	cutAt := e.cut(t, reader, read)
	ev := &corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{Name: fmt.Sprintf("%s.status-%d", node, time.Now().UnixNano()), Namespace: "default"},
		InvolvedObject: corev1.ObjectReference{Kind: "Node", Name: node, UID: "status-node", APIVersion: "v1"},
		Reason:         "StatusOffline", Message: "posted while cut off", Type: corev1.EventTypeNormal,
		Source:         corev1.EventSource{Component: "kubelet", Host: node},
		FirstTimestamp: metav1.Now(), LastTimestamp: metav1.Now(), Count: 1,
	}
	if _, err := kubelet.CoreV1().Events("default").Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		t.Fatalf("offline event: %v", err)
	}
	code, r = statusReport(t, e.o)
	if code != report.ExitOffline || r.State != report.Offline || !r.Ready || r.Since.Before(cutAt) || r.Journal.Depth != 1 {
		t.Errorf("offline: exit %d, state %s (ready %v) since %v (cut at %v), journal %+v", code, r.State, r.Ready, r.Since, cutAt, r.Journal)
	}
	if len(r.Apiservers) != 1 || r.Apiservers[0].Healthy || r.Apiservers[0].LastError == "" {
		t.Errorf("offline apiservers: %+v (want unhealthy, saying why)", r.Apiservers)
	}
	if got := e.metric(t, "outpost_journal_depth"); got != 1 {
		t.Errorf("outpost_journal_depth = %v offline after one event; want 1", got)
	}
	code, out, _ := outpostStatus(t, e.o)
	if code != report.ExitOffline || !strings.Contains(out, "OFFLINE since") || !strings.Contains(out, "UNHEALTHY") || !strings.Contains(out, "1 of 1000 waiting") {
		t.Errorf("offline, for a person: exit %d\n%s", code, out)
	}
	time.Sleep(1500 * time.Millisecond) // past the flap window: views are re-listed on return

	// Link back: the reconnect is reported.
	e.restore(t)
	if _, err := framework.Poll(ctx, 100*time.Millisecond, 30*time.Second, func(context.Context) (bool, string) {
		code, r = statusReport(t, e.o)
		return r.LastReconnect != nil && !r.LastReconnect.Done.IsZero(), fmt.Sprintf("last reconnect %+v", r.LastReconnect)
	}); err != nil {
		t.Fatal(err)
	}
	if c := r.LastReconnect; code != report.ExitOnline || c.EventsReplayed != 1 || c.ViewsRelisted < 1 || c.Error != "" || c.Outage < time.Second || r.Journal.Depth != 0 {
		t.Errorf("after the link returned: exit %d, reconnect %+v, journal %+v", code, c, r.Journal)
	}

	// Outpost stopped: nothing to read.
	e.o.Stop()
	code, out, errOut := outpostStatus(t, e.o)
	if code != report.ExitUnreadable || out != "" || !strings.Contains(errOut, "cannot reach outpost's admin endpoint") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Errorf("outpost stopped: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
}

// TestCacheCommand runs `outpost cache` on a real outpost's cache, as an
// operator would: while outpost runs (through a copy), `ls` lists the views
// /debug/cache/views lists and `get` answers with the objects the caller
// read online; once outpost is stopped the same works on the file itself,
// and `verify` finds it sound.
func TestCacheCommand(t *testing.T) {
	const node, ns = "cache-node", "cache-cmd"
	ctx := t.Context()
	nodeNamespace(t, node, ns)
	createConfigMaps(t, ns, "cm", 4, "cache-cmd", "v-cache")
	e := startEdge(t, node)
	reader := e.tokenClient(t, readerToken(t, "cache-reader"))
	online, err := reader.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := configMapsState(online.Items)
	const user = "system:serviceaccount:default:cache-reader"

	check := func(phase string) {
		t.Helper()
		var views []storedView
		if _, err := framework.Poll(ctx, 100*time.Millisecond, 10*time.Second, func(ctx context.Context) (bool, string) {
			code, out, errOut := runOutpost(t, "cache", "ls", "--data-dir", e.o.DataDir, "-o", "json")
			if code != 0 {
				return false, fmt.Sprintf("exit %d: %s", code, errOut)
			}
			if err := json.Unmarshal([]byte(out), &views); err != nil {
				return false, err.Error()
			}
			for _, v := range views {
				if v.Key.Identity == user && v.Key.Namespace == ns {
					return true, ""
				}
			}
			return false, "no view of " + user + " yet:\n" + out
		}); err != nil {
			t.Fatalf("%s: outpost cache ls: %v", phase, err)
		}
		if strings.HasPrefix(phase, "running") {
			if listed, err := e.views(ctx); err != nil || len(listed) != len(views) {
				t.Errorf("%s: outpost cache ls lists %d views, /debug/cache/views %d (%v)", phase, len(views), len(listed), err)
			}
		}
		code, out, errOut := runOutpost(t, "cache", "get", "configmaps", "-n", ns, "--as", user, "--data-dir", e.o.DataDir)
		var got corev1.ConfigMapList
		if code != 0 || json.Unmarshal([]byte(out), &got) != nil {
			t.Fatalf("%s: outpost cache get: exit %d\n%s%s", phase, code, out, errOut)
		}
		if state := configMapsState(got.Items); state != want {
			t.Errorf("%s: outpost cache get differs from what the caller read online:%s", phase, diff(want, state))
		}
	}
	check("running")

	// diff, online: nothing differs yet; then the cloud changes one
	// ConfigMap, deletes one and adds one behind the caller's back, and
	// diff names each, changing nothing in the cache.
	diffOut := func(wantCode int) string {
		t.Helper()
		var out, errOut string
		var code int
		if _, err := framework.Poll(ctx, 200*time.Millisecond, 10*time.Second, func(context.Context) (bool, string) {
			code, out, errOut = runOutpost(t, "cache", "diff", "--data-dir", e.o.DataDir, "--identity", user, "--resource", "configmaps")
			return code == wantCode, fmt.Sprintf("exit %d, want %d:\n%s%s", code, wantCode, out, errOut)
		}); err != nil {
			t.Fatalf("outpost cache diff: %v", err)
		}
		return out
	}
	if out := diffOut(0); !strings.Contains(out, "0 of 1 views differ") {
		t.Errorf("outpost cache diff before any change:\n%s", out)
	}
	admin := cp.Client().CoreV1().ConfigMaps(ns)
	cm := online.Items[0].DeepCopy()
	cm.Data = map[string]string{"changed": "yes"}
	if _, err := admin.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := admin.Delete(ctx, online.Items[1].Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "cm-new"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	out := diffOut(6)
	for _, line := range []string{"changed: " + ns + "/" + cm.Name, "gone: " + ns + "/" + online.Items[1].Name, "missing: " + ns + "/cm-new", "1 of 1 views differ"} {
		if !strings.Contains(out, line) {
			t.Errorf("outpost cache diff does not say %q:\n%s", line, out)
		}
	}
	check("running, after the diff") // the cache still holds what the caller read

	e.o.Stop()
	if code, _, errOut := runOutpost(t, "cache", "diff", "--data-dir", e.o.DataDir); code != 1 || !strings.Contains(errOut, "no running outpost") {
		t.Errorf("outpost cache diff with outpost stopped: exit %d: %s", code, errOut)
	}
	check("stopped")
	code, out, errOut := runOutpost(t, "cache", "verify", "--data-dir", e.o.DataDir)
	if code != 0 || !strings.HasPrefix(out, "ok: ") {
		t.Errorf("outpost cache verify: exit %d\n%s%s", code, out, errOut)
	}
}
