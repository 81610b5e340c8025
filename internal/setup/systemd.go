package setup

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"time"
)

// Systemd is the node's systemd, through systemctl.
type Systemd struct{}

// Reload runs systemctl daemon-reload.
func (Systemd) Reload() error { return run("systemctl", "daemon-reload") }

// Active runs systemctl is-active --quiet unit.
func (Systemd) Active(unit string) bool {
	return exec.Command("systemctl", "is-active", "--quiet", unit).Run() == nil
}

// EnableStart runs systemctl enable --now unit.
func (Systemd) EnableStart(unit string) error { return run("systemctl", "enable", "--now", unit) }

// Restart runs systemctl restart unit.
func (Systemd) Restart(unit string) error { return run("systemctl", "restart", unit) }

// DisableStop runs systemctl disable --now unit.
func (Systemd) DisableStop(unit string) error { return run("systemctl", "disable", "--now", unit) }

// run runs a command, its output in the error when it fails.
func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %v: %v: %s", name, args, err, bytes.TrimSpace(out))
	}
	return nil
}

// WaitReady waits until outpost's admin endpoint at adminAddress answers
// /readyz with 200, or timeout passes.
func WaitReady(adminAddress string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second}
	var last error
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+adminAddress+"/readyz", nil)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("/readyz: %s", resp.Status)
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("outpost not ready within %v: %v", timeout, last)
		case <-time.After(500 * time.Millisecond):
		}
	}
}
