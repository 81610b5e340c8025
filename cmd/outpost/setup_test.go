package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSetupNodeCommandLine(t *testing.T) {
	dir := t.TempDir()
	base := []string{"--data-dir=" + filepath.Join(dir, "data"), "--unit-file=" + filepath.Join(dir, "outpost.service"),
		"--outpost-kubeconfig=" + filepath.Join(dir, "node.kubeconfig"), "--service-manager=none", "--node-name=n1"}
	for _, tc := range []struct {
		name string
		args []string
		code int
		err  string
	}{
		{"bad flag", []string{"--nope"}, setupUsage, "flag provided but not defined"},
		{"bad manager", []string{"--service-manager=upstart"}, setupUsage, `--service-manager "upstart"`},
		{"bad address", []string{"--node-local-address=169.254.2.1"}, setupUsage, "want IP:port"},
		{"no kubelet kubeconfig", append(base, "--kubelet-kubeconfig="+filepath.Join(dir, "missing.conf")), setupKubeconfig, "kubelet's kubeconfig cannot be used"},
	} {
		var stdout, stderr bytes.Buffer
		code := setupNode(tc.args, &stdout, &stderr)
		if code != tc.code || !strings.Contains(stderr.String(), tc.err) || strings.Count(strings.TrimSpace(stderr.String()), "\n") > 1 {
			t.Errorf("%s: exit %d, stderr %q; want exit %d and one line with %q", tc.name, code, stderr.String(), tc.code, tc.err)
		}
	}

	// A dry run prints the plan and changes nothing.
	conf := filepath.Join(dir, "kubelet.conf")
	ca := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(ca, []byte("-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	kc := "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://10.1.2.3:6443\n    certificate-authority: " + ca +
		"\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\nusers:\n- name: u\n  user:\n    client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem\n    client-key: /var/lib/kubelet/pki/kubelet-client-current.pem\n"
	if err := os.WriteFile(conf, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := setupNode(append(base, "--kubelet-kubeconfig="+conf, "--dry-run"), &stdout, &stderr); code != setupOK {
		t.Fatalf("dry run: exit %d: %s", code, stderr.String())
	}
	if !strings.Contains(stdout.String(), "would put this node behind outpost") || !strings.Contains(stdout.String(), "kubelet's kubeconfig, now pointing at outpost") {
		t.Errorf("dry run printed:\n%s", stdout.String())
	}
	if now, _ := os.ReadFile(conf); string(now) != kc {
		t.Error("a dry run changed kubelet's kubeconfig")
	}
	for _, f := range []string{"data", "outpost.service", "node.kubeconfig"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			t.Errorf("a dry run created %s", f)
		}
	}
}
