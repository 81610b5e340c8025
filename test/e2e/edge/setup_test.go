package edge

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestSetupNode: `outpost setup-node` moves a node that joined straight to
// the apiserver behind outpost without restarting a pod, and `--undo` moves
// it back, byte for byte. There is no systemd on the test machine, so it
// runs with --service-manager=none: the test starts outpost with the exact
// command line of the unit setup-node wrote, and restarts kubelet itself,
// as systemd would.
func TestSetupNode(t *testing.T) {
	framework.RequireRealNode(t)
	const (
		node = "edge-setup"
		ns   = "edge-setup"
	)
	ctx := t.Context()
	bin, err := framework.OutpostBinary()
	if err != nil {
		t.Fatal(err)
	}
	if err := cp.CreateWebConfig(ctx, ns, greeting, password); err != nil {
		t.Fatal(err)
	}
	kubeconfig, err := cp.NodeKubeconfig(node, cp.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	original, err := os.ReadFile(kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	n := cp.StartNodeForTest(t, node, kubeconfig)
	hostPort := framework.FreePort(t)
	if err := cp.CreateWebPods(ctx, ns, node, hostPort); err != nil {
		t.Fatal(err)
	}
	before := waitPodsReady(t, n, ns)

	dir := t.TempDir()
	admin := "127.0.0.1:" + strconv.Itoa(framework.FreePort(t))
	args := []string{"setup-node", "--service-manager=none",
		"--kubelet-kubeconfig=" + kubeconfig,
		"--outpost-kubeconfig=" + filepath.Join(dir, "etc", "node.kubeconfig"),
		"--data-dir=" + filepath.Join(dir, "data"),
		"--unit-file=" + filepath.Join(dir, "systemd", "outpost.service"),
		"--binary=" + bin,
		"--node-name=" + node,
		"--secure-address=127.0.0.1:" + strconv.Itoa(framework.FreePort(t)),
		"--admin-address=" + admin,
		"--node-local-address=",
	}
	setup := func(extra ...string) string {
		t.Helper()
		out, err := exec.CommandContext(ctx, bin, append(args, extra...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("outpost %s: %v\n%s", strings.Join(append(args, extra...), " "), err, out)
		}
		return string(out)
	}

	// A dry run first: it changes nothing.
	if out := setup("--dry-run"); !strings.Contains(out, "would put this node behind outpost") {
		t.Fatalf("dry run printed:\n%s", out)
	}
	if now, _ := os.ReadFile(kubeconfig); !bytes.Equal(now, original) {
		t.Fatal("a dry run changed kubelet's kubeconfig")
	}
	t.Logf("setup-node:\n%s", setup())
	if out := setup(); !strings.Contains(out, "nothing to do") {
		t.Errorf("setup-node run again did something:\n%s", out)
	}

	// What systemd would do: start the unit's command line, restart kubelet.
	unit, err := os.ReadFile(filepath.Join(dir, "systemd", "outpost.service"))
	if err != nil {
		t.Fatal(err)
	}
	stop := startUnit(t, string(unit), filepath.Join(dir, "outpost.log"))
	if _, ok := waitFor(t, 30*time.Second, "outpost from the unit ready", func(ctx context.Context) (bool, string) {
		_, err := framework.GetOK(ctx, nil, "http://"+admin+"/readyz")
		return err == nil, fmt.Sprint(err)
	}); !ok {
		t.FailNow()
	}
	moved := time.Now()
	if err := n.StopKubelet(); err != nil {
		t.Fatal(err)
	}
	if err := n.StartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	nodeRequests := func() float64 {
		text, err := framework.GetOK(ctx, nil, "http://"+admin+"/metrics")
		if err != nil {
			return 0
		}
		v, _ := framework.SumMetric(string(text), "outpost_client_requests_total", "client=node")
		return v
	}
	if _, ok := waitFor(t, 30*time.Second, "kubelet's requests through outpost", func(context.Context) (bool, string) {
		v := nodeRequests()
		return v >= 5, fmt.Sprintf("%v requests of the node", v)
	}); ok {
		figure(t, "setup-node → kubelet restarted, talking to outpost: %v", ms(time.Since(moved)))
	}
	after := waitPodsReady(t, n, ns)
	for name, p := range before {
		if after[name].ContainerID != p.ContainerID {
			t.Errorf("pod %s was restarted by the move behind outpost: container %s, then %s", name, p.ContainerID, after[name].ContainerID)
		}
	}
	if err := checkServing(ctx, hostPort, after[framework.WebPodName].IP); err != nil {
		t.Error(err)
	}

	// And back.
	t.Logf("setup-node --undo:\n%s", setup("--undo"))
	if now, _ := os.ReadFile(kubeconfig); !bytes.Equal(now, original) {
		t.Errorf("after --undo kubelet's kubeconfig is not the original:\n%s", now)
	}
	if err := n.StopKubelet(); err != nil {
		t.Fatal(err)
	}
	stop()
	if err := n.StartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	back := waitPodsReady(t, n, ns)
	for name, p := range before {
		if back[name].ContainerID != p.ContainerID {
			t.Errorf("pod %s was restarted by the move back: container %s, then %s", name, p.ContainerID, back[name].ContainerID)
		}
	}
	if out := setup("--undo"); !strings.Contains(out, "nothing to do") {
		t.Errorf("--undo run again did something:\n%s", out)
	}
	for _, f := range []string{"etc/node.kubeconfig", "systemd/outpost.service", "data/setup/kubelet.kubeconfig.orig"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			t.Errorf("%s left after --undo", f)
		}
	}
}

// startUnit starts the ExecStart command line of a systemd unit, logging to
// logFile, and returns a func that stops it (also run when t ends).
func startUnit(t *testing.T, unit, logFile string) (stop func()) {
	t.Helper()
	var command string
	for line := range strings.Lines(unit) {
		if c, ok := strings.CutPrefix(strings.TrimSpace(line), "ExecStart="); ok {
			command = c
		}
	}
	fields := strings.Fields(command)
	if len(fields) == 0 {
		t.Fatalf("no ExecStart in the unit:\n%s", unit)
	}
	log, err := os.Create(logFile)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(fields[0], fields[1:]...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		log.Close()
		if t.Failed() {
			data, _ := os.ReadFile(logFile)
			t.Logf("outpost's log:\n%s", data[max(0, len(data)-4000):])
		}
	}
	t.Cleanup(stop)
	return stop
}
