package framework

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/internal/cloud/autonomy"
)

// controllerBuild is the outpost-controller binary built for this test
// process.
var controllerBuild struct {
	once sync.Once
	path string
	err  error
}

// ControllerBinary returns the outpost-controller binary the test runs:
// $OUTPOST_CONTROLLER_BIN when set, else one built once per test process
// from the working tree, static like the one `make build` ships, so that
// the test never runs a stale _output/bin/outpost-controller (a shared
// directory another tree may have built).
func ControllerBinary() (string, error) {
	if p := os.Getenv("OUTPOST_CONTROLLER_BIN"); p != "" {
		return p, nil
	}
	b := &controllerBuild
	b.once.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			b.err = err
			return
		}
		dir, err := os.MkdirTemp("", "outpost-controller-bin-")
		if err != nil {
			b.err = err
			return
		}
		b.path = filepath.Join(dir, "outpost-controller")
		cmd := exec.Command("go", "build", "-o", b.path, "./cmd/outpost-controller")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("building outpost-controller: %v\n%s", err, out)
		}
	})
	return b.path, b.err
}

// removeControllerBinary deletes what ControllerBinary built.
func removeControllerBinary() {
	if b := &controllerBuild; b.path != "" && os.Getenv("OUTPOST_CONTROLLER_BIN") == "" {
		_ = os.RemoveAll(filepath.Dir(b.path))
	}
}

// SyncBuffer is a log sink the test reads while the controller writes.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Controller is a running outpost-controller process.
type Controller struct {
	MetricsURL string
	Log        *SyncBuffer
	exited     chan struct{}
	err        error // after exited is closed
	stopOnce   sync.Once
	stop       func(t *testing.T)
}

// Stop stops the controller now, rather than when the test ends.
func (c *Controller) Stop(t *testing.T) {
	t.Helper()
	c.stopOnce.Do(func() { c.stop(t) })
}

// StartControllerT runs the outpost-controller binary as its ServiceAccount
// would in the cluster: with the RBAC of deploy/rbac.yaml bound to that
// identity, and leader election on. Its webhook configuration has no
// webhooks: they are not under test here, only the CA bundle bookkeeping
// needs the object. It stops the process when the test ends and checks
// that it exited cleanly and that nothing it did was forbidden.
func (c *ControlPlane) StartControllerT(t *testing.T, args ...string) *Controller {
	t.Helper()
	ctx := t.Context()
	bin, err := ControllerBinary()
	if err != nil {
		t.Fatal(err)
	}
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	deploy := filepath.Join(root, "deploy")
	if out, err := c.Kubectl(ctx, "", "apply", "-f", filepath.Join(deploy, "namespace.yaml"), "-f", filepath.Join(deploy, "rbac.yaml")); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if _, err := c.Client().AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx,
		&admissionregistrationv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: autonomy.DefaultName}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	sa := "system:serviceaccount:" + autonomy.DefaultNamespace + ":" + autonomy.DefaultName
	crt, key, err := c.IssueClientCert("outpost-controller", sa, "system:serviceaccounts", "system:serviceaccounts:"+autonomy.DefaultNamespace)
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(c.Dir, "outpost-controller.kubeconfig")
	if err := WriteKubeconfig(kubeconfig, c.URL(0), c.CAFile, crt, key, ""); err != nil {
		t.Fatal(err)
	}

	metricsPort, hookPort := FreePort(t), FreePort(t)
	ctl := &Controller{
		MetricsURL: fmt.Sprintf("http://127.0.0.1:%d", metricsPort),
		Log:        &SyncBuffer{},
		exited:     make(chan struct{}),
	}
	cmd := exec.Command(bin, append([]string{"run",
		"--kubeconfig=" + kubeconfig,
		fmt.Sprintf("--metrics-address=127.0.0.1:%d", metricsPort),
		fmt.Sprintf("--webhook-address=127.0.0.1:%d", hookPort),
		"--webhook-host=127.0.0.1",
	}, args...)...)
	cmd.Stdout = t.Output()
	cmd.Stderr = ctl.Log
	// Killed with the test binary, whatever kills it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		ctl.err = cmd.Wait()
		close(ctl.exited)
	}()
	ctl.stop = func(t *testing.T) {
		t.Helper()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-ctl.exited:
			if ctl.err != nil {
				t.Errorf("outpost-controller: %v", ctl.err)
			}
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-ctl.exited
			t.Error("outpost-controller did not stop within 20s of SIGTERM")
		}
		if strings.Contains(ctl.Log.String(), "forbidden") {
			t.Error("outpost-controller was forbidden something: deploy/rbac.yaml lacks a permission")
		}
		t.Logf("outpost-controller log:\n%s", ctl.Log)
	}
	t.Cleanup(func() { ctl.Stop(t) })

	_, err = Poll(ctx, 200*time.Millisecond, startTimeout, func(ctx context.Context) (bool, string) {
		select {
		case <-ctl.exited:
			return false, fmt.Sprintf("outpost-controller exited: %v\n%s", ctl.err, ctl.Log)
		default:
		}
		if _, err := GetOK(ctx, nil, ctl.MetricsURL+"/readyz"); err != nil {
			return false, err.Error()
		}
		body, err := GetOK(ctx, nil, ctl.MetricsURL+"/metrics")
		if err != nil {
			return false, err.Error()
		}
		v, err := SumMetric(string(body), "outpost_controller_leader")
		return err == nil && v == 1 && strings.Contains(ctl.Log.String(), "toleration controller started"), "not yet the leader with its controllers started"
	})
	if err != nil {
		t.Fatalf("waiting for outpost-controller: %v", err)
	}
	return ctl
}
