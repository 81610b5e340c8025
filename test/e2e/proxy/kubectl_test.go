package proxy_test

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestKubectlSameAsDirect runs the same kubectl commands directly and
// through outpost, with the same bearer token, and compares what they show.
func TestKubectlSameAsDirect(t *testing.T) {
	ctx := t.Context()
	o := cp.StartOutpostT(t, "edge-kubectl", "--server="+cp.URL(0), "--server="+cp.URL(1))
	token := adminToken(t)
	via, direct := tokenKubeconfig(t, o, token), directTokenKubeconfig(t, token)

	run := func(kubeconfig string, args ...string) string {
		t.Helper()
		out, err := cp.Kubectl(ctx, kubeconfig, args...)
		if err != nil {
			t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	both := func(args ...string) string {
		t.Helper()
		a, b := run(direct, args...), run(via, args...)
		if a != b {
			t.Fatalf("kubectl %s differs\ndirect:\n%s\nthrough outpost:\n%s", strings.Join(args, " "), a, b)
		}
		return b
	}

	// Writes through outpost.
	run(via, "create", "namespace", "kubectl-e2e")
	for _, name := range []string{"alpha", "beta", "gamma"} {
		tier := "front"
		if name == "gamma" {
			tier = "back"
		}
		run(via, "-n", "kubectl-e2e", "create", "configmap", name, "--from-literal=k="+name)
		run(via, "-n", "kubectl-e2e", "label", "configmap", name, "tier="+tier)
	}
	manifest := filepath.Join(t.TempDir(), "cm.yaml")
	if err := os.WriteFile(manifest, []byte("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: kubectl-e2e\n  labels: {tier: back}\ndata: {k: v1}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	run(via, "apply", "-f", manifest)
	run(via, "-n", "kubectl-e2e", "patch", "configmap", "applied", "--type=merge", "-p", `{"data":{"k":"patched"}}`)

	// Reads compared with direct access.
	if got := both("-n", "kubectl-e2e", "get", "configmap", "applied", "-o", "jsonpath={.data.k}"); got != "patched" {
		t.Fatalf("applied+patched configmap has k=%q", got)
	}
	if got := both("-n", "kubectl-e2e", "get", "configmaps", "-l", "tier=front", "-o", "name"); got != "configmap/alpha\nconfigmap/beta\n" {
		t.Fatalf("label selector: %q", got)
	}
	if got := both("-n", "kubectl-e2e", "get", "configmaps", "--field-selector", "metadata.name=gamma", "-o", "name"); got != "configmap/gamma\n" {
		t.Fatalf("field selector: %q", got)
	}
	// Server-side printing (Table), compared without the AGE column that
	// moves with the clock.
	a, b := run(direct, "-n", "kubectl-e2e", "get", "configmaps"), run(via, "-n", "kubectl-e2e", "get", "configmaps")
	if dropLastColumn(a) != dropLastColumn(b) || !strings.Contains(b, "DATA") {
		t.Fatalf("Table differs:\n%s\nvs\n%s", a, b)
	}
	both("-n", "kubectl-e2e", "get", "configmaps", "--chunk-size=1", "-o", "name")
	both("get", "--raw", "/version")
	both("get", "--raw", "/api")
	both("api-resources", "-o", "name")
	var apis struct {
		Groups []struct{ Name string } `json:"groups"`
	}
	if err := json.Unmarshal([]byte(both("get", "--raw", "/apis")), &apis); err != nil || len(apis.Groups) < 10 {
		t.Fatalf("/apis through outpost: %d groups, %v", len(apis.Groups), err)
	}
	for _, path := range []string{"/openapi/v2", "/openapi/v3", "/openapi/v3/api/v1"} {
		var doc map[string]any
		if err := json.Unmarshal([]byte(run(via, "get", "--raw", path)), &doc); err != nil || len(doc) == 0 {
			t.Fatalf("%s through outpost: %v", path, err)
		}
	}
	if got := both("explain", "configmap.data"); !strings.Contains(got, "FIELD: data") {
		t.Fatalf("explain (OpenAPI v3) through outpost: %q", got)
	}

	// A watch through outpost sees a change made directly.
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	kubectl, _ := framework.Binary("kubectl")
	cmd := exec.CommandContext(wctx, kubectl, "--kubeconfig", via, "-n", "kubectl-e2e", "get", "configmaps", "--watch-only", "-o", "name")
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); _ = cmd.Wait() }()
	lines := make(chan string, 10)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	time.Sleep(time.Second) // let the watch open before the change
	run(direct, "-n", "kubectl-e2e", "create", "configmap", "watched")
	select {
	case l := <-lines:
		if l != "configmap/watched" {
			t.Fatalf("watch through outpost saw %q, want configmap/watched", l)
		}
	case <-wctx.Done():
		t.Fatal("watch through outpost saw no event within 30s")
	}

	run(via, "-n", "kubectl-e2e", "delete", "configmap", "alpha")
	if got := both("-n", "kubectl-e2e", "get", "configmaps", "-l", "tier=front", "-o", "name"); got != "configmap/beta\n" {
		t.Fatalf("after delete: %q", got)
	}
	// An apiserver error passes through unchanged.
	out, err := cp.Kubectl(ctx, via, "-n", "kubectl-e2e", "get", "configmap", "missing")
	if err == nil || !strings.Contains(string(out), `configmaps "missing" not found`) {
		t.Fatalf("missing object through outpost: %v %s", err, out)
	}
}

func dropLastColumn(table string) string {
	var out []string
	for _, l := range strings.Split(table, "\n") {
		f := strings.Fields(l)
		if len(f) > 0 {
			f = f[:len(f)-1]
		}
		out = append(out, strings.Join(f, " "))
	}
	return strings.Join(out, "\n")
}
