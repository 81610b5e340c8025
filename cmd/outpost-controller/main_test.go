package main

import (
	"bytes"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestRunExitCodes(t *testing.T) {
	tests := []struct {
		args       []string
		want       int
		wantOut    string // in stdout
		wantErrOut string // in stderr
	}{
		{args: nil, want: 2, wantErrOut: "Usage:"},
		{args: []string{"version"}, want: 0, wantOut: "outpost-controller "},
		{args: []string{"help"}, want: 0, wantOut: "outpost-controller run [flags]"},
		{args: []string{"--help"}, want: 0, wantOut: "Usage:"},
		{args: []string{"run", "--help"}, want: 0, wantOut: "-webhook-address"},
		{args: []string{"frobnicate"}, want: 2, wantErrOut: `unknown command "frobnicate"`},
		{args: []string{"run", "--bogus"}, want: 2, wantErrOut: "flag provided but not defined: -bogus"},
		{args: []string{"--workers=x"}, want: 2, wantErrOut: "invalid value"},
		{args: []string{"run", "--log-format=xml"}, want: 2, wantErrOut: "want text or json"},
		{args: []string{"run", "--webhook-address=9443"}, want: 2, wantErrOut: "webhook address"},
		{args: []string{"run", "--leader-elect-renew-deadline=20s"}, want: 2, wantErrOut: "renew deadline"},
		{args: []string{"run", "stray"}, want: 2, wantErrOut: "unexpected arguments"},
		{args: []string{"run", "--webhook-host=a,,b"}, want: 2, wantErrOut: "empty host"},
		{args: []string{"run", "--cluster-domain=Bad_Domain"}, want: 2, wantErrOut: `cluster domain "Bad_Domain"`},
		{args: []string{"run", "--approve-outpost-serving-csrs=maybe"}, want: 2, wantErrOut: "invalid boolean value"},
		{args: []string{"run", "--peer-site-label=bad label"}, want: 2, wantErrOut: `peer site label "bad label"`},
		{args: []string{"run", "--peer-namespace=Bad"}, want: 2, wantErrOut: `peer namespace "Bad"`},
		{args: []string{"run", "--peer-grace-period=-1s"}, want: 2, wantErrOut: "negative duration"},
		// Valid flags get as far as loading the client configuration.
		{args: []string{"run", "--kubeconfig=/nonexistent", "--metrics-address="}, want: 1, wantErrOut: "loading client configuration"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if got := run(tt.args, &stdout, &stderr); got != tt.want {
				t.Errorf("exit %d, want %d; stderr: %s", got, tt.want, stderr.String())
			}
			if !strings.Contains(stdout.String(), tt.wantOut) {
				t.Errorf("stdout %q lacks %q", stdout.String(), tt.wantOut)
			}
			if !strings.Contains(stderr.String(), tt.wantErrOut) {
				t.Errorf("stderr %q lacks %q", stderr.String(), tt.wantErrOut)
			}
		})
	}
}

func TestParseRun(t *testing.T) {
	o, err := parseRun([]string{
		"--kubeconfig=/k", "--namespace=edge", "--leader-elect=false", "--leader-elect-lease-duration=30s",
		"--webhook-host=a.example,10.0.0.1", "--webhook-host=b.example", "--kube-api-qps=5",
		"--log-level=debug", "--log-format=json", "--approve-outpost-serving-csrs=false", "--cluster-domain=edge.example",
		"--peer-verdicts=false", "--peer-site-label=example.com/site", "--peer-grace-period=30s",
	}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	c := o.Config
	if c.Kubeconfig != "/k" || c.Namespace != "edge" || !c.LeaderElection.Disabled || c.LeaderElection.LeaseDuration != 30*time.Second || c.QPS != 5 {
		t.Errorf("config %+v", c)
	}
	if !c.CSRApproval.Disabled || c.CSRApproval.ClusterDomain != "edge.example" {
		t.Errorf("CSR approval %+v", c.CSRApproval)
	}
	if o, err := parseRun(nil, io.Discard); err != nil || o.CSRApproval.Disabled || o.CSRApproval.ClusterDomain != "cluster.local" {
		t.Errorf("CSR approval by default: %+v, %v", o.CSRApproval, err)
	}
	if p := c.Peers; !p.Disabled || p.SiteLabel != "example.com/site" || p.GracePeriod != 30*time.Second || p.Namespace != "outpost-peers" {
		t.Errorf("peers %+v", p)
	}
	if o, _ := parseRun(nil, io.Discard); o.Peers.Disabled || o.Peers.GracePeriod != 5*time.Minute || o.Peers.SiteLabel != "topology.kubernetes.io/zone" {
		t.Errorf("peers by default: %+v", o.Peers)
	}
	if !slices.Equal(c.Webhook.Hosts, []string{"a.example", "10.0.0.1", "b.example"}) {
		t.Errorf("hosts %v", c.Webhook.Hosts)
	}
	if o.logLevel != slog.LevelDebug || !o.logJSON {
		t.Errorf("logging %v %v", o.logLevel, o.logJSON)
	}
}
