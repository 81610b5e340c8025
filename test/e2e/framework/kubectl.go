package framework

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
)

// Kubectl runs the pinned kubectl with --kubeconfig=kubeconfig ("" means
// AdminKubeconfig) and returns its combined stdout and stderr. A non-zero
// exit is an error that quotes the output, so a failing test shows why.
func (c *ControlPlane) Kubectl(ctx context.Context, kubeconfig string, args ...string) ([]byte, error) {
	bin, err := Binary("kubectl")
	if err != nil {
		return nil, err
	}
	if kubeconfig == "" {
		kubeconfig = c.AdminKubeconfig
	}
	full := append([]string{
		"--kubeconfig=" + kubeconfig,
		// Keep the discovery cache out of $HOME and away from other runs.
		"--cache-dir=" + filepath.Join(c.Dir, "kubectl-cache"),
	}, args...)
	cmd := exec.CommandContext(ctx, bin, full...)
	cmd.SysProcAttr = childAttr()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("running kubectl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}
