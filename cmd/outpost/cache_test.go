package main

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/outposthq/outpost/internal/hub"
	"github.com/outposthq/outpost/internal/store"
)

// seedCache writes a cache in dataDir as outpost would: two ConfigMaps a
// service account listed in namespace ns, and a node's view of one of them.
func seedCache(t *testing.T, dataDir string) *store.Store {
	t.Helper()
	st, err := store.Open(filepath.Join(dataDir, "cache.db"), store.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	cm := func(name, rv string) store.Object {
		return store.Object{Namespace: "ns", Name: name, ResourceVersion: rv,
			Fields: map[string]string{"metadata.name": name, "metadata.namespace": "ns"},
			Data:   fmt.Appendf(nil, `{"metadata":{"name":%q,"namespace":"ns","resourceVersion":%q},"data":{"v":"value-of-%s"}}`, name, rv, name)}
	}
	if err := st.ReplaceView(store.View{Key: store.ViewKey{Identity: "system:serviceaccount:ns:reader", Resource: "/v1/configmaps", Namespace: "ns"},
		ResourceVersion: "20", Kind: "ConfigMapList", APIVersion: "v1"}, []store.Object{cm("a", "11"), cm("b", "12")}); err != nil {
		t.Fatal(err)
	}
	if err := st.ReplaceView(store.View{Key: store.ViewKey{Identity: "system:node:edge-1", Resource: "/v1/configmaps", Namespace: "ns", Name: "a"},
		ResourceVersion: "11", Kind: "ConfigMapList", APIVersion: "v1"}, []store.Object{cm("a", "11")}); err != nil {
		t.Fatal(err)
	}
	return st
}

func runCache(args ...string) (int, string, string) {
	var stdout, stderr bytes.Buffer
	code := run(append([]string{"cache"}, args...), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

// TestCacheCommand: `outpost cache` lists views, answers as the offline
// reader would for an identity, and verifies the file, on a stopped
// outpost's file and on a running one's copy through its inspection
// socket; a missing, corrupt or unreachable cache, or bad usage, is one
// line and a distinct exit code.
func TestCacheCommand(t *testing.T) {
	dir := t.TempDir()
	st := seedCache(t, dir)
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	checkAll := func(t *testing.T, dataDir string) {
		code, out, errOut := runCache("ls", "--data-dir", dataDir)
		if code != 0 || !strings.Contains(out, "system:serviceaccount:ns:reader") || !strings.Contains(out, "system:node:edge-1") ||
			!strings.Contains(out, "/v1/configmaps") || !strings.Contains(out, "IDENTITY") {
			t.Errorf("ls: exit %d\n%s%s", code, out, errOut)
		}
		code, out, _ = runCache("ls", "--data-dir", dataDir, "--identity", "system:node:edge-1", "-o", "json")
		if code != 0 || strings.Contains(out, "serviceaccount") || !strings.Contains(out, `"objects": 1`) {
			t.Errorf("ls --identity -o json: exit %d\n%s", code, out)
		}
		code, out, errOut = runCache("get", "configmaps", "-n", "ns", "--data-dir", dataDir, "--as", "system:serviceaccount:ns:reader")
		if code != 0 || !strings.Contains(out, `"kind": "ConfigMapList"`) || !strings.Contains(out, "value-of-a") || !strings.Contains(out, "value-of-b") {
			t.Errorf("get list: exit %d\n%s%s", code, out, errOut)
		}
		code, out, errOut = runCache("get", "configmaps", "a", "-n", "ns", "--data-dir", dataDir, "--as", "system:node:edge-1", "-o", "yaml")
		if code != 0 || !strings.Contains(out, "kind: ConfigMap\n") || !strings.Contains(out, "v: value-of-a") {
			t.Errorf("get one as yaml: exit %d\n%s%s", code, out, errOut)
		}
		// The node never read b: offline it would not be answered.
		code, _, errOut = runCache("get", "configmaps", "b", "-n", "ns", "--data-dir", dataDir, "--as", "system:node:edge-1")
		if code != cacheNotCached || !strings.Contains(errOut, "would answer") || !strings.Contains(errOut, "503") {
			t.Errorf("get of what the node never read: exit %d %s", code, errOut)
		}
		code, _, errOut = runCache("get", "configmaps", "-n", "ns", "--data-dir", dataDir)
		if code != cacheUsage || !strings.Contains(errOut, "--as") {
			t.Errorf("get read by two users without --as: exit %d %s", code, errOut)
		}
		code, out, errOut = runCache("verify", "--data-dir", dataDir)
		if code != 0 || !strings.Contains(out, "ok: 2 objects in 2 views") {
			t.Errorf("verify: exit %d\n%s%s", code, out, errOut)
		}
	}
	t.Run("stopped", func(t *testing.T) {
		before, _ := os.ReadFile(filepath.Join(dir, "cache.db"))
		checkAll(t, dir)
		if after, _ := os.ReadFile(filepath.Join(dir, "cache.db")); !bytes.Equal(before, after) {
			t.Error("reading the cache changed the file")
		}
	})

	t.Run("running", func(t *testing.T) {
		// Held open as a running outpost holds it: without its socket,
		// one line and exit 1; with it, the same answers from a copy.
		running := t.TempDir()
		held := seedCache(t, running)
		defer held.Close()
		code, _, errOut := runCache("ls", "--data-dir", running)
		if code != cacheUnreadable || !strings.Contains(errOut, "held by a running outpost") {
			t.Errorf("held, no socket: exit %d %s", code, errOut)
		}
		ln, err := net.Listen("unix", filepath.Join(running, hub.InspectSocket))
		if err != nil {
			t.Skipf("unix socket in %s: %v", running, err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = held.Snapshot(w) })}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
		checkAll(t, running)
	})

	t.Run("bad", func(t *testing.T) {
		code, _, errOut := runCache("ls", "--data-dir", filepath.Join(dir, "nowhere"))
		if code != cacheMissing || !strings.Contains(errOut, "no cache at") {
			t.Errorf("missing: exit %d %s", code, errOut)
		}
		corrupt := t.TempDir()
		if err := os.WriteFile(filepath.Join(corrupt, "cache.db"), bytes.Repeat([]byte("junk"), 5000), 0o600); err != nil {
			t.Fatal(err)
		}
		code, _, errOut = runCache("verify", "--data-dir", corrupt)
		if code != cacheDamaged || !strings.Contains(errOut, "corrupt") {
			t.Errorf("corrupt: exit %d %s", code, errOut)
		}
		for _, args := range [][]string{nil, {"frob"}, {"get"}, {"ls", "extra"}, {"verify", "-o", "yaml"}, {"ls", "--bogus"}} {
			if code, _, errOut := runCache(args...); code != cacheUsage || strings.Count(strings.TrimSpace(errOut), "\n") != 1 {
				t.Errorf("%q: exit %d, stderr %q; want 2 and two lines", args, code, errOut)
			}
		}
		if code, out, _ := runCache("--help"); code != 0 || !strings.Contains(out, "outpost cache get RESOURCE") {
			t.Errorf("--help: exit %d\n%s", code, out)
		}
	})
}
