package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCommandLine: what users of a node daemon expect from its command
// line: version and help on stdout with exit 0; a bad flag, value or file
// is reported once, on stderr, with exit 2.
func TestCommandLine(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name       string
		args       []string
		code       int
		out, err   string // substrings of stdout and stderr
		errOnceOf  string // appears exactly once on stderr
		emptyError bool
	}{
		{name: "version", args: []string{"version"}, code: 0, out: "outpost ", emptyError: true},
		{name: "help", args: []string{"--help"}, code: 0, out: "outpost run", emptyError: true},
		{name: "run help", args: []string{"run", "--help"}, code: 0, out: "-kubeconfig", emptyError: true},
		{name: "no command", args: nil, code: 2, err: "outpost run"},
		{name: "unknown command", args: []string{"serve"}, code: 2, err: `unknown command "serve"`},
		{name: "unknown flag", args: []string{"run", "--bogus"}, code: 2, errOnceOf: "-bogus"},
		{name: "bad value", args: []string{"run", "--lb-mode=random", "--kubeconfig=x"}, code: 2, errOnceOf: "round-robin or priority"},
		{name: "bad peer address", args: []string{"run", "--kubeconfig=x", "--peer-address=0.0.0.0:10269"}, code: 2, errOnceOf: `--peer-address "0.0.0.0:10269"`},
		{name: "negative peer interval", args: []string{"run", "--kubeconfig=x", "--peer-address=127.0.0.2:10269", "--peer-probe-interval=-1s"}, code: 2, errOnceOf: "--peer-probe-interval"},
		{name: "bad recording budget", args: []string{"run", "--kubeconfig=x", "--recording-budget=12k"}, code: 2, errOnceOf: "at least 1Mi"},
		{name: "bad watch cache size", args: []string{"run", "--kubeconfig=x", "--watch-cache-size=lots"}, code: 2, errOnceOf: "want a size such as 128Mi"},
		{name: "negative probe ready interval", args: []string{"run", "--kubeconfig=x", "--probe-ready-interval=-1s"}, code: 2, errOnceOf: "--probe-ready-interval must not be negative"},
		{name: "negative watch cache recheck", args: []string{"run", "--kubeconfig=x", "--watch-cache-recheck=-1s"}, code: 2, errOnceOf: "--watch-cache-recheck must not be negative"},
		{name: "sub-second watch cache recheck", args: []string{"run", "--kubeconfig=x", "--watch-cache-recheck=1ns"}, code: 2, errOnceOf: "--watch-cache-recheck 1ns: want at least 1s"},
		{name: "bad memory limit", args: []string{"run", "--kubeconfig=x", "--memory-limit=lots"}, code: 2, errOnceOf: "want a size such as 128Mi"},
		{name: "missing kubeconfig file", args: []string{"run", "--kubeconfig=" + filepath.Join(dir, "none"), "--data-dir=" + filepath.Join(dir, "data"),
			"--secure-address=127.0.0.1:0", "--admin-address="}, code: 2, err: "none"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(c.args, &stdout, &stderr)
			if code != c.code {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, c.code, &stdout, &stderr)
			}
			if !strings.Contains(stdout.String(), c.out) {
				t.Errorf("stdout %q lacks %q", &stdout, c.out)
			}
			if !strings.Contains(stderr.String(), c.err) {
				t.Errorf("stderr %q lacks %q", &stderr, c.err)
			}
			if c.errOnceOf != "" && strings.Count(stderr.String(), c.errOnceOf) != 1 {
				t.Errorf("stderr %q should say %q once", &stderr, c.errOnceOf)
			}
			if c.emptyError && stderr.Len() != 0 {
				t.Errorf("stderr %q, want nothing", &stderr)
			}
		})
	}
}

// TestSizeFlags: the size flags take Kubernetes quantities, and
// --memory-limit stays unset (-1, for the default or $GOMEMLIMIT) unless
// given; 0 is no limit.
func TestSizeFlags(t *testing.T) {
	for _, c := range []struct {
		args           []string
		budget, memory int64
	}{
		{nil, 0, -1},
		{[]string{"--recording-budget=256Mi", "--memory-limit=0"}, 256 << 20, 0},
		{[]string{"--memory-limit=1G"}, 0, 1e9},
	} {
		cfg, err := parseRun(append([]string{"--kubeconfig=x", "--node-name=n"}, c.args...), io.Discard)
		if err != nil {
			t.Fatalf("%q: %v", c.args, err)
		}
		if cfg.RecordingBudget != c.budget || cfg.MemoryLimit != c.memory {
			t.Errorf("%q: budget %d, memory limit %d; want %d, %d", c.args, cfg.RecordingBudget, cfg.MemoryLimit, c.budget, c.memory)
		}
	}
}

// --peer-address with a kubeconfig that holds a token and no client
// certificate: refused at startup, once, as a configuration error (exit 2),
// since every peer would otherwise report this live node unreachable.
func TestPeersNeedNodeCertificate(t *testing.T) {
	dir := t.TempDir()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test-ca"}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca := base64.StdEncoding.EncodeToString(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:6443", certificate-authority-data: "`+ca+`"}
users:
- name: u
  user: {token: abc}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
`), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	code := run([]string{"run", "--kubeconfig=" + kubeconfig, "--node-name=n", "--data-dir=" + filepath.Join(dir, "data"),
		"--secure-address=127.0.0.1:0", "--admin-address=", "--peer-address=127.0.0.2:10269"}, &stdout, &stderr)
	const want = "--peer-address needs a node client certificate"
	if code != 2 || strings.Count(stderr.String(), want) != 1 {
		t.Errorf("exit %d, want 2, and stderr saying %q once:\n%s", code, want, &stderr)
	}
}
