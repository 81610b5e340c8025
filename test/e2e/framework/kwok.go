package framework

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// KwokNodeAnnotation marks the Nodes that StartKwok's kwok manages: create
// a Node with this annotation (value "fake") and kwok makes it Ready, keeps
// its lease and runs its pods.
const KwokNodeAnnotation = "kwok.x-k8s.io/node"

// kwokStages are kwok's "fast" stage set, the one kwok ships as its default:
// nodes become Ready at once and keep a lease, pods become Ready, complete
// and are deleted. kwok v0.8.0 refuses to start without stages.
var kwokStages = []string{
	"node/fast/node-initialize.yaml",
	"node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
	"pod/fast/pod-ready.yaml",
	"pod/fast/pod-complete.yaml",
	"pod/fast/pod-delete.yaml",
}

// kwokGrace is how long StopKwok waits after SIGTERM.
const kwokGrace = 5 * time.Second

// StartKwok starts kwok as the admin user, simulating kubelets for Nodes
// annotated kwok.x-k8s.io/node=fake, and waits for its /healthz. extraArgs
// are appended; if they hold a --manage-* flag, it replaces the annotation
// selector (kwok rejects two ways of choosing nodes).
func (c *ControlPlane) StartKwok(ctx context.Context, extraArgs ...string) error {
	bin, err := Binary("kwok")
	if err != nil {
		return err
	}
	stages, err := kwokStageFiles(ctx)
	if err != nil {
		return err
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	workDir := filepath.Join(c.Dir, "kwok")
	if err := os.MkdirAll(workDir, 0o755); err != nil {
		return fmt.Errorf("starting kwok: %w", err)
	}
	args := []string{
		"--kubeconfig=" + c.AdminKubeconfig,
		// The server carries only /healthz here; no test reaches pods
		// through it.
		"--server-address=127.0.0.1:" + strconv.Itoa(port),
		// Pod IPs outside the service range, so they never collide with
		// ClusterIPs in endpoint tests.
		"--cidr=10.244.0.0/16",
	}
	for _, s := range stages {
		args = append(args, "--config="+s)
	}
	if !hasFlagPrefix(extraArgs, "--manage-") {
		args = append(args, "--manage-nodes-with-annotation-selector="+KwokNodeAnnotation+"=fake")
	}
	args = append(args, extraArgs...)
	// KWOK_WORKDIR keeps kwok from loading ~/.kwok/kwok.yaml.
	env := []string{"KWOK_WORKDIR=" + workDir}

	c.mu.Lock()
	if c.stopped {
		c.mu.Unlock()
		return fmt.Errorf("starting kwok: %w", errStopped)
	}
	if c.kwok != nil {
		c.mu.Unlock()
		return errors.New("starting kwok: already running")
	}
	p, err := startProcess("kwok", c.logPath("kwok"), bin, args, env)
	if err == nil {
		c.kwok = p
	}
	c.mu.Unlock()
	if err != nil {
		return err
	}

	ctx, cancel := c.withStop(ctx)
	defer cancel()
	healthz := "http://127.0.0.1:" + strconv.Itoa(port) + "/healthz"
	err = waitFor(ctx, p, "kwok /healthz", func(ctx context.Context) error {
		return probeOK(ctx, nil, healthz)
	})
	if err != nil {
		return fmt.Errorf("starting kwok: %w", err)
	}
	return nil
}

// StopKwok stops kwok and waits for it to exit; stopping a stopped kwok does
// nothing. Nodes it managed stop heartbeating and, with the node lifecycle
// controller running, turn NotReady.
func (c *ControlPlane) StopKwok() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.kwok == nil {
		return nil
	}
	c.kwok.stop(kwokGrace)
	c.kwok = nil
	return nil
}

// KwokLog returns the last lines of kwok's log (kwok.log in Dir), for
// failure messages.
func (c *ControlPlane) KwokLog(lines int) string {
	return tailFile(c.logPath("kwok"), lines)
}

// kwokStageFiles returns the paths of kwokStages in the module cache, in the
// kwok version that hack/tools/kwok pins (hack/k8s.sh downloads it). They are
// read from there rather than copied, so they always match the binary.
func kwokStageFiles(ctx context.Context) ([]string, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kwok")
	cmd.Dir = filepath.Join(root, "hack", "tools", "kwok")
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("locating kwok module: %w: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	dir := strings.TrimSpace(string(out))
	if dir == "" {
		return nil, errors.New("locating kwok module: not in the module cache: run make k8s (hack/k8s.sh kwok)")
	}
	files := make([]string, len(kwokStages))
	for i, s := range kwokStages {
		files[i] = filepath.Join(dir, "kustomize", "stage", s)
		if _, err := os.Stat(files[i]); err != nil {
			return nil, fmt.Errorf("locating kwok stage: %w", err)
		}
	}
	return files, nil
}

func hasFlagPrefix(args []string, prefix string) bool {
	for _, a := range args {
		if strings.HasPrefix(a, prefix) {
			return true
		}
	}
	return false
}
