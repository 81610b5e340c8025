package setup

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/tools/clientcmd"
)

// recorder is a service manager that notes what it was asked.
type recorder struct {
	calls  []string
	active map[string]bool
}

func (r *recorder) Active(unit string) bool { return r.active[unit] }

func (r *recorder) Reload() error { r.calls = append(r.calls, "daemon-reload"); return nil }

func (r *recorder) EnableStart(unit string) error {
	r.calls = append(r.calls, "enable --now "+unit)
	r.setActive(unit, true)
	return nil
}

func (r *recorder) Restart(unit string) error {
	r.calls = append(r.calls, "restart "+unit)
	r.setActive(unit, true)
	return nil
}

func (r *recorder) DisableStop(unit string) error {
	r.calls = append(r.calls, "disable --now "+unit)
	r.setActive(unit, false)
	return nil
}

func (r *recorder) setActive(unit string, on bool) {
	if r.active == nil {
		r.active = map[string]bool{}
	}
	r.active[unit] = on
}

// kubeadmNode writes what kubeadm leaves on a node: the cluster CA, the
// kubelet's client certificate pair, and kubelet.conf naming them (the
// certificate by a path relative to the kubeconfig, as it may be).
func kubeadmNode(t *testing.T) (dir, kubeconfig string, ca []byte) {
	t.Helper()
	dir = t.TempDir()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cluster-ca"}, IsCA: true,
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.MkdirAll(filepath.Join(dir, "pki"), 0o700); err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{"pki/ca.crt": ca, "pki/kubelet-client-current.pem": []byte("pair")} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	kubeconfig = filepath.Join(dir, "kubelet.conf")
	conf := `apiVersion: v1
kind: Config
clusters:
- name: kubernetes
  cluster:
    server: https://10.1.2.3:6443
    certificate-authority: pki/ca.crt
contexts:
- name: system:node:n1@kubernetes
  context:
    cluster: kubernetes
    user: system:node:n1
current-context: system:node:n1@kubernetes
users:
- name: system:node:n1
  user:
    client-certificate: pki/kubelet-client-current.pem
    client-key: pki/kubelet-client-current.pem
`
	if err := os.WriteFile(kubeconfig, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir, kubeconfig, ca
}

func config(dir, kubeconfig string, services Services) *Config {
	return &Config{
		KubeletKubeconfig: kubeconfig,
		OutpostKubeconfig: filepath.Join(dir, "outpost", "node.kubeconfig"),
		DataDir:           filepath.Join(dir, "outpost-data"),
		UnitFile:          filepath.Join(dir, "systemd", "outpost.service"),
		Binary:            "/usr/local/bin/outpost",
		NodeName:          "n1",
		SecureAddress:     "127.0.0.1:10268",
		AdminAddress:      "127.0.0.1:10267",
		Services:          services,
	}
}

func TestSetupAndUndo(t *testing.T) {
	dir, kubeconfig, ca := kubeadmNode(t)
	original, _ := os.ReadFile(kubeconfig)
	systemd := &recorder{}
	c := config(dir, kubeconfig, systemd)

	steps, err := c.Plan()
	if err != nil {
		t.Fatal(err)
	}
	if err := Apply(steps, io.Discard); err != nil {
		t.Fatal(err)
	}
	if want := []string{"daemon-reload", "enable --now outpost.service", "restart outpost.service", "restart kubelet.service"}; !slices.Equal(systemd.calls, want) {
		t.Errorf("service manager asked %q, want %q", systemd.calls, want)
	}
	// outpost goes upstream as kubelet did, with its (rotating) certificate.
	up, err := clientcmd.LoadFromFile(c.OutpostKubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cluster, user, err := current(up)
	if err != nil {
		t.Fatal(err)
	}
	if cluster.Server != "https://10.1.2.3:6443" || user.ClientCertificate != filepath.Join(dir, "pki/kubelet-client-current.pem") {
		t.Errorf("outpost's kubeconfig: server %s, certificate %s", cluster.Server, user.ClientCertificate)
	}
	// kubelet now talks to outpost, trusting the cluster CA and outpost's.
	kc, err := clientcmd.LoadFromFile(kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cluster, user, _ = current(kc)
	if cluster.Server != "https://127.0.0.1:10268" || user.ClientCertificate != filepath.Join(dir, "pki/kubelet-client-current.pem") {
		t.Errorf("kubelet's kubeconfig: server %s, certificate %s", cluster.Server, user.ClientCertificate)
	}
	bundle, err := os.ReadFile(cluster.CertificateAuthority)
	if err != nil {
		t.Fatal(err)
	}
	own, _ := os.ReadFile(filepath.Join(c.DataDir, "pki", "ca.crt"))
	if !bytes.Contains(bundle, bytes.TrimSpace(ca)) || len(own) == 0 || !bytes.Contains(bundle, own) {
		t.Error("kubelet does not trust both the cluster CA and outpost's own")
	}
	unit, _ := os.ReadFile(c.UnitFile)
	if !strings.Contains(string(unit), "ExecStart=/usr/local/bin/outpost run --kubeconfig="+c.OutpostKubeconfig+" --node-name=n1") ||
		strings.Contains(string(unit), "ExecStartPre") {
		t.Errorf("unit:\n%s", unit)
	}

	// Again: nothing to do.
	if steps, err := c.Plan(); err != nil || len(steps) != 0 {
		t.Errorf("second setup planned %d steps (%v): %v", len(steps), err, describe(steps))
	}

	// Undo: kubelet's kubeconfig back byte for byte, outpost's files gone.
	systemd.calls = nil
	steps, err = c.UndoPlan()
	if err != nil {
		t.Fatal(err)
	}
	if err := Apply(steps, io.Discard); err != nil {
		t.Fatal(err)
	}
	if now, _ := os.ReadFile(kubeconfig); !bytes.Equal(now, original) {
		t.Errorf("kubelet's kubeconfig not restored:\n%s", now)
	}
	if want := []string{"restart kubelet.service", "disable --now outpost.service", "daemon-reload"}; !slices.Equal(systemd.calls, want) {
		t.Errorf("undo asked the service manager %q, want %q", systemd.calls, want)
	}
	for _, f := range []string{c.UnitFile, c.OutpostKubeconfig, c.backupPath(), c.bundlePath()} {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after undo", f)
		}
	}
	if steps, err := c.UndoPlan(); err != nil || len(steps) != 0 {
		t.Errorf("second undo planned %v (%v)", describe(steps), err)
	}
}

// A node-local address puts it on lo before outpost starts, and asks for a
// serving certificate of the cluster CA.
func TestUnitWithNodeLocalAddress(t *testing.T) {
	c := config(t.TempDir(), "", nil)
	c.NodeLocalAddress = "169.254.2.1:10269"
	unit := c.Unit()
	for _, want := range []string{"ExecStartPre=-/usr/sbin/ip addr add 169.254.2.1/32 dev lo\n", "--node-local-address=169.254.2.1:10269 --rotate-server-certificates\n", "Restart=always", "ReadWritePaths=" + c.DataDir} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q:\n%s", want, unit)
		}
	}
}

// Planning changes nothing, so a dry run is only the plan.
func TestPlanChangesNothing(t *testing.T) {
	dir, kubeconfig, _ := kubeadmNode(t)
	before := tree(t, dir)
	c := config(dir, kubeconfig, &recorder{})
	steps, err := c.Plan()
	if err != nil || len(steps) == 0 {
		t.Fatalf("plan: %v %v", describe(steps), err)
	}
	if after := tree(t, dir); !slices.Equal(before, after) {
		t.Errorf("planning changed files:\nbefore %v\nafter  %v", before, after)
	}
}

func TestUnusableKubeconfig(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{
		"missing":    "",
		"garbage":    "{{{",
		"no user":    "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://x\n    certificate-authority-data: eA==\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
		"token only": "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://x\n    certificate-authority-data: eA==\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\nusers:\n- name: u\n  user:\n    token: abc\n",
	} {
		path := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
		if content != "" {
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		_, err := config(dir, path, nil).Plan()
		if !errors.Is(err, ErrKubeconfig) {
			t.Errorf("%s: %v, want ErrKubeconfig", name, err)
		}
	}
}

func describe(steps []Step) []string {
	var out []string
	for _, s := range steps {
		out = append(out, s.What)
	}
	return out
}

// tree lists the files under dir with their sizes.
func tree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	_ = filepath.Walk(dir, func(path string, fi os.FileInfo, err error) error {
		if err == nil {
			out = append(out, path+":"+fi.Mode().String())
		}
		return nil
	})
	return out
}

var update = flag.Bool("update", false, "rewrite deploy/node/outpost.service")

// deploy/node/outpost.service is the unit setup-node writes on a kubeadm
// node with the defaults (node name "NODE"), for those who install by hand.
func TestShippedUnit(t *testing.T) {
	path := filepath.Join("..", "..", "deploy", "node", "outpost.service")
	c := DefaultConfig("NODE")
	want := c.Unit()
	if *update {
		if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil || string(got) != want {
		t.Errorf("%s is not the unit setup-node writes (go test ./internal/setup -update): %v", path, err)
	}
}

// With a node-local address, --undo first only points kubelet back: pods
// started behind outpost have its address in their environment, so it
// keeps serving them until --undo --remove.
func TestUndoInTwoPhases(t *testing.T) {
	dir, kubeconfig, _ := kubeadmNode(t)
	original, _ := os.ReadFile(kubeconfig)
	systemd := &recorder{}
	c := config(dir, kubeconfig, systemd)
	c.NodeLocalAddress = "169.254.2.1:10269"
	steps, err := c.Plan()
	if err != nil {
		t.Fatal(err)
	}
	if err := Apply(steps, io.Discard); err != nil {
		t.Fatal(err)
	}
	systemd.calls = nil
	undo := config(dir, kubeconfig, systemd) // flags need not match
	steps, err = undo.UndoPlan()
	if err != nil {
		t.Fatal(err)
	}
	if err := Apply(steps, io.Discard); err != nil {
		t.Fatal(err)
	}
	if now, _ := os.ReadFile(kubeconfig); !bytes.Equal(now, original) {
		t.Error("kubelet's kubeconfig not restored")
	}
	if _, err := os.Stat(c.UnitFile); err != nil || !slices.Equal(systemd.calls, []string{"restart kubelet.service"}) {
		t.Errorf("the first undo stopped outpost (%v) or did %q", err, systemd.calls)
	}
	if !strings.Contains(strings.Join(describe(steps), "\n"), "--undo --remove") {
		t.Errorf("the first undo does not say how to finish: %v", describe(steps))
	}
	// Again: nothing to do but the note.
	if steps, err := undo.UndoPlan(); err != nil || len(steps) != 0 {
		t.Errorf("undo again planned %v (%v)", describe(steps), err)
	}
	undo.Remove = true
	systemd.calls = nil
	steps, err = undo.UndoPlan()
	if err != nil {
		t.Fatal(err)
	}
	if err := Apply(steps, io.Discard); err != nil {
		t.Fatal(err)
	}
	if want := []string{"disable --now outpost.service", "daemon-reload"}; !slices.Equal(systemd.calls, want) {
		t.Errorf("--undo --remove asked %q, want %q", systemd.calls, want)
	}
	if _, err := os.Stat(c.UnitFile); !errors.Is(err, os.ErrNotExist) {
		t.Error("the unit is left after --undo --remove")
	}
}

// A kubelet restart that failed is planned again by the next run, though
// kubelet's kubeconfig is already written.
func TestFailedRestartIsRetried(t *testing.T) {
	dir, kubeconfig, _ := kubeadmNode(t)
	c := config(dir, kubeconfig, &failingRestart{recorder: &recorder{}})
	steps, err := c.Plan()
	if err != nil {
		t.Fatal(err)
	}
	if err := Apply(steps, io.Discard); err == nil {
		t.Fatal("the failing restart did not fail")
	}
	c.Services = &recorder{}
	steps, err = c.Plan()
	if err != nil || !slices.ContainsFunc(describe(steps), func(s string) bool { return strings.Contains(s, "restart kubelet") }) {
		t.Fatalf("the rerun does not restart kubelet: %v (%v)", describe(steps), err)
	}
	if err := Apply(steps, io.Discard); err != nil {
		t.Fatal(err)
	}
	if steps, err := c.Plan(); err != nil || len(steps) != 0 {
		t.Errorf("after the restart, planned %v (%v)", describe(steps), err)
	}
}

// An undo with kubelet pointing at outpost and no saved original refuses,
// rather than stop outpost under kubelet.
func TestUndoWithoutTheOriginal(t *testing.T) {
	dir, kubeconfig, _ := kubeadmNode(t)
	c := config(dir, kubeconfig, &recorder{})
	steps, _ := c.Plan()
	if err := Apply(steps, io.Discard); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(c.backupPath()); err != nil {
		t.Fatal(err)
	}
	if _, err := c.UndoPlan(); !errors.Is(err, ErrKubeconfig) {
		t.Errorf("undo without the original: %v", err)
	}
}

type failingRestart struct{ *recorder }

func (f *failingRestart) Restart(unit string) error {
	if unit == KubeletUnit {
		return errors.New("kubelet would not restart")
	}
	return f.recorder.Restart(unit)
}
