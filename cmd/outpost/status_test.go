package main

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/outposthq/outpost/internal/report"
)

// TestStatusCommand: `outpost status` prints what the admin endpoint says,
// for a person or as JSON, and exits 0 online, 3 offline serving from the
// cache, 4 not ready; an endpoint it cannot read is one line and exit 1, a
// bad command line exit 2. (The e2e edge suite runs it against a real
// outpost.)
func TestStatusCommand(t *testing.T) {
	now := time.Now()
	serving := func(r report.Report) string {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			if req.URL.Path != "/status" {
				http.NotFound(w, req)
				return
			}
			_ = json.NewEncoder(w).Encode(r)
		}))
		t.Cleanup(srv.Close)
		return strings.TrimPrefix(srv.URL, "http://")
	}
	online := report.Report{Version: "v9", Node: "edge-1", State: report.Online, Ready: true, Since: now.Add(-time.Minute),
		Apiservers:   []report.Apiserver{{URL: "https://10.0.0.1:6443", Healthy: true, LastProbe: now, LastResult: "ok"}},
		Store:        report.Store{Path: "/var/lib/outpost/cache.db", Bytes: 3 << 20, Objects: 120, Views: 7, StaleViews: 1, ByResource: map[string]int{"/v1/pods": 5, "/v1/nodes": 2}, ByIdentity: map[string]int{"system:node:edge-1": 7}},
		Journal:      report.Journal{Depth: 2, Max: 1000, Dropped: 0},
		Certificates: []report.Certificate{{Name: "node-client", Subject: "CN=system:node:edge-1,O=system:nodes", NotAfter: now.Add(24 * time.Hour)}},
		Unrecorded:   []report.Unrecorded{{Resource: "/v1/limitranges", Reason: "undecodable", Error: "content type \"application/yaml\"", Count: 3, Last: now}}}
	offline := online
	offline.State = report.Offline
	offline.Apiservers = []report.Apiserver{{URL: "https://10.0.0.1:6443", Healthy: false, LastProbe: now, LastResult: "failed", LastError: "dial tcp: i/o timeout"}}
	offline.LastReconnect = &report.Reconnect{At: now.Add(-time.Hour), Outage: 90 * time.Second, StatusesSent: 1, EventsReplayed: 4, ViewsRelisted: 7, Done: now.Add(-time.Hour)}
	starting := online
	starting.State, starting.Ready = report.Starting, false
	unused := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		return addr
	}()

	for _, c := range []struct {
		name     string
		args     []string
		code     int
		out, err []string
	}{
		{name: "online", args: []string{"status", "--admin-address", serving(online)}, code: 0,
			out: []string{"outpost v9 on node edge-1", "ONLINE since", "ready", "healthy, last probe ok", "none since start",
				"3.0 MiB, 120 objects in 7 views (1 stale)", "/v1/pods 5, /v1/nodes 2", "2 of 1000 waiting", "node-client", "CN=system:node:edge-1",
				"/v1/limitranges", "undecodable ×3"}},
		{name: "offline", args: []string{"status", "--admin-address", serving(offline)}, code: 3,
			out: []string{"OFFLINE since", "UNHEALTHY, last probe failed", "dial tcp: i/o timeout", "after 1m30s offline: 1 statuses sent, 4 events replayed, 7 views re-listed"}},
		{name: "starting", args: []string{"status", "--admin-address", serving(starting)}, code: 4, out: []string{"STARTING", "NOT READY"}},
		{name: "json", args: []string{"status", "-o", "json", "--admin-address", "http://" + serving(offline)}, code: 3, out: []string{`"state":"offline"`, `"eventsReplayed":4`}},
		{name: "unreachable", args: []string{"status", "--admin-address", unused}, code: 1, err: []string{"cannot reach outpost's admin endpoint at " + unused}},
		{name: "bad flag", args: []string{"status", "--bogus"}, code: 2, err: []string{"-bogus"}},
		{name: "bad output", args: []string{"status", "-o", "yaml"}, code: 2, err: []string{"-o takes json"}},
		{name: "help", args: []string{"status", "--help"}, code: 0, out: []string{"Exit codes", "-admin-address"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(c.args, &stdout, &stderr); code != c.code {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, c.code, &stdout, &stderr)
			}
			for _, s := range c.out {
				if !strings.Contains(stdout.String(), s) {
					t.Errorf("stdout lacks %q:\n%s", s, &stdout)
				}
			}
			for _, s := range c.err {
				if !strings.Contains(stderr.String(), s) {
					t.Errorf("stderr lacks %q:\n%s", s, &stderr)
				}
			}
			if len(c.err) > 0 && strings.Count(strings.TrimSpace(stderr.String()), "\n") > 1 {
				t.Errorf("stderr should be a line or two:\n%s", &stderr)
			}
			if c.code == 1 && stdout.Len() != 0 {
				t.Errorf("stdout %q, want nothing when the endpoint cannot be read", &stdout)
			}
		})
	}
}
