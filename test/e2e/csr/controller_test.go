package csr

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
	"github.com/outposthq/outpost/test/e2e/framework"
)

// controllerBuild is the outpost-controller binary built for this test
// process.
var controllerBuild struct {
	once sync.Once
	path string
	err  error
}

// controllerBinary returns the outpost-controller binary the test runs:
// $OUTPOST_CONTROLLER_BIN when set, else one built once per test process
// from the working tree, static like the one `make build` ships, so that
// the test never runs a stale _output/bin/outpost-controller (a shared
// directory another tree may have built).
func controllerBinary() (string, error) {
	if p := os.Getenv("OUTPOST_CONTROLLER_BIN"); p != "" {
		return p, nil
	}
	b := &controllerBuild
	b.once.Do(func() {
		root, err := framework.RepoRoot()
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

// removeControllerBinary deletes what controllerBinary built.
func removeControllerBinary() {
	if b := &controllerBuild; b.path != "" {
		_ = os.RemoveAll(filepath.Dir(b.path))
	}
}

// syncBuffer is a log sink the test reads while the controller writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// controller is a running outpost-controller process.
type controller struct {
	MetricsURL string
	Log        *syncBuffer
	exited     chan struct{}
	err        error // after exited is closed
	stopOnce   sync.Once
	stop       func(t *testing.T)
}

// Stop stops the controller now, rather than when the test ends.
func (c *controller) Stop(t *testing.T) {
	t.Helper()
	c.stopOnce.Do(func() { c.stop(t) })
}

// startController runs the outpost-controller binary as its ServiceAccount
// would in the cluster: with the RBAC of deploy/rbac.yaml bound to that
// identity, and leader election on. Its webhook configuration has no
// webhooks: they are not under test here, only the CA bundle bookkeeping
// needs the object. It stops the process when the test ends and checks
// that it exited cleanly and that nothing it did was forbidden.
func startController(ctx context.Context, t *testing.T, args ...string) *controller {
	t.Helper()
	bin, err := controllerBinary()
	if err != nil {
		t.Fatal(err)
	}
	root, err := framework.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	deploy := filepath.Join(root, "deploy")
	if out, err := cp.Kubectl(ctx, "", "apply", "-f", filepath.Join(deploy, "namespace.yaml"), "-f", filepath.Join(deploy, "rbac.yaml")); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if _, err := cp.Client().AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx,
		&admissionregistrationv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: autonomy.DefaultName}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	sa := "system:serviceaccount:" + autonomy.DefaultNamespace + ":" + autonomy.DefaultName
	crt, key, err := cp.IssueClientCert("outpost-controller", sa, "system:serviceaccounts", "system:serviceaccounts:"+autonomy.DefaultNamespace)
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(cp.Dir, "outpost-controller.kubeconfig")
	if err := framework.WriteKubeconfig(kubeconfig, cp.URL(0), cp.CAFile, crt, key, ""); err != nil {
		t.Fatal(err)
	}

	metricsPort, hookPort := framework.FreePort(t), framework.FreePort(t)
	c := &controller{
		MetricsURL: fmt.Sprintf("http://127.0.0.1:%d", metricsPort),
		Log:        &syncBuffer{},
		exited:     make(chan struct{}),
	}
	cmd := exec.Command(bin, append([]string{"run",
		"--kubeconfig=" + kubeconfig,
		fmt.Sprintf("--metrics-address=127.0.0.1:%d", metricsPort),
		fmt.Sprintf("--webhook-address=127.0.0.1:%d", hookPort),
		"--webhook-host=127.0.0.1",
	}, args...)...)
	cmd.Stdout = t.Output()
	cmd.Stderr = c.Log
	// Killed with the test binary, whatever kills it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		c.err = cmd.Wait()
		close(c.exited)
	}()
	c.stop = func(t *testing.T) {
		t.Helper()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.exited:
			if c.err != nil {
				t.Errorf("outpost-controller: %v", c.err)
			}
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-c.exited
			t.Error("outpost-controller did not stop within 20s of SIGTERM")
		}
		if strings.Contains(c.Log.String(), "forbidden") {
			t.Error("outpost-controller was forbidden something: deploy/rbac.yaml lacks a permission")
		}
		t.Logf("outpost-controller log:\n%s", c.Log)
	}
	t.Cleanup(func() { c.Stop(t) })

	waitFor(ctx, t, "outpost-controller ready and working", func(ctx context.Context) (bool, error) {
		select {
		case <-c.exited:
			return false, fmt.Errorf("outpost-controller exited: %v\n%s", c.err, c.Log)
		default:
		}
		if _, err := framework.GetOK(ctx, nil, c.MetricsURL+"/readyz"); err != nil {
			return false, nil
		}
		body, err := framework.GetOK(ctx, nil, c.MetricsURL+"/metrics")
		if err != nil {
			return false, nil
		}
		v, err := framework.SumMetric(string(body), "outpost_controller_leader")
		return err == nil && v == 1 && strings.Contains(c.Log.String(), "toleration controller started"), nil
	})
	return c
}

// waitFor polls cond every 200 ms until it holds, failing the test with
// what was awaited when ctx's deadline passes, or at once when cond errs.
func waitFor(ctx context.Context, t *testing.T, what string, cond func(ctx context.Context) (bool, error)) {
	t.Helper()
	deadline, ok := ctx.Deadline()
	if !ok {
		t.Fatalf("waiting for %s: the test's context has no deadline", what)
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	var condErr error
	_, err := framework.Poll(ctx, 200*time.Millisecond, time.Until(deadline), func(ctx context.Context) (bool, string) {
		ok, err := cond(ctx)
		if err != nil {
			condErr = err
			stop()
		}
		return ok, ""
	})
	if condErr != nil {
		err = condErr
	}
	if err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}
