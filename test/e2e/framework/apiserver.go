package framework

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sync/errgroup"
)

const (
	// serviceCIDR is the service IP range; serviceIP is the address of the
	// kubernetes Service in it, which the serving certificate covers.
	serviceCIDR = "10.0.0.0/24"
	serviceIP   = "10.0.0.1"
	// serviceAccountIssuer is the iss claim of service account tokens.
	serviceAccountIssuer = "https://kubernetes.default.svc.cluster.local"
)

// apiserverArgs returns the flags of apiserver i; Options.APIServerArgs come
// last so that they override these.
func (c *ControlPlane) apiserverArgs(i int) []string {
	args := []string{
		"--etcd-servers=" + c.EtcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(c.ports[i]),
		// Several apiservers on one address would fight over the
		// endpoints of the kubernetes Service; no test needs them.
		"--endpoint-reconciler-type=none",
		"--cert-dir=" + filepath.Join(c.Dir, "kube-apiserver-"+strconv.Itoa(i)),
		"--tls-cert-file=" + c.servingCrt,
		"--tls-private-key-file=" + c.servingKey,
		"--client-ca-file=" + c.CAFile,
		"--service-cluster-ip-range=" + serviceCIDR,
		"--service-account-issuer=" + serviceAccountIssuer,
		"--service-account-signing-key-file=" + c.ServiceAccountKeyFile,
		"--service-account-key-file=" + c.ServiceAccountPublicKeyFile,
		"--authorization-mode=Node,RBAC",
		"--enable-bootstrap-token-auth",
		"--allow-privileged=true",
	}
	return append(args, c.opts.APIServerArgs...)
}

// startAPIServers starts all apiservers at once and waits for each.
func (c *ControlPlane) startAPIServers(ctx context.Context) error {
	var g errgroup.Group
	for i := range c.ports {
		g.Go(func() error { return c.startAPIServer(ctx, i) })
	}
	return g.Wait()
}

// startAPIServer starts apiserver i on its port and waits for /readyz. The
// caller makes sure it is not running.
func (c *ControlPlane) startAPIServer(ctx context.Context, i int) error {
	c.mu.Lock()
	p, err := c.launchAPIServer(i)
	c.mu.Unlock()
	if err != nil {
		return err
	}
	return c.waitAPIServer(ctx, p, i)
}

// launchAPIServer starts the process of apiserver i and records it, so that
// Stop kills it even while it is still starting. The caller holds c.mu.
func (c *ControlPlane) launchAPIServer(i int) (*process, error) {
	bin, err := Binary("kube-apiserver")
	if err != nil {
		return nil, err
	}
	name := "kube-apiserver-" + strconv.Itoa(i)
	p, err := startProcess(name, c.logPath(name), bin, c.apiserverArgs(i), nil)
	if err != nil {
		return nil, err
	}
	c.apiservers[i] = p
	return p, nil
}

// waitAPIServer waits until apiserver i, running as p, is ready.
func (c *ControlPlane) waitAPIServer(ctx context.Context, p *process, i int) error {
	return waitFor(ctx, p, p.name+" /readyz", func(ctx context.Context) error {
		return c.readyz(ctx, i)
	})
}

// readyz asks apiserver i whether it is ready. Ready includes the RBAC
// bootstrap policy being in place, which Start relies on.
func (c *ControlPlane) readyz(ctx context.Context, i int) error {
	return probeOK(ctx, c.probe, c.URL(i)+"/readyz")
}

// StopAPIServer stops apiserver i — SIGTERM, then SIGKILL if it has not
// exited within a few seconds — and returns once the process has exited and
// its port can be bound again. Stopping a stopped apiserver does nothing.
func (c *ControlPlane) StopAPIServer(i int) error {
	if i < 0 || i >= len(c.ports) {
		return fmt.Errorf("stopping apiserver %d: have %d apiservers", i, len(c.ports))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return fmt.Errorf("stopping apiserver %d: %w", i, errStopped)
	}
	p := c.apiservers[i]
	if p == nil {
		return nil
	}
	p.stop(apiserverGrace)
	c.apiservers[i] = nil
	ctx, cancel := c.boundedContext(30 * time.Second)
	defer cancel()
	if err := waitPortFree(ctx, c.ports[i]); err != nil {
		return fmt.Errorf("stopping apiserver %d: %w", i, err)
	}
	return nil
}

// StartAPIServer starts the stopped apiserver i again on the same port and
// waits for /readyz. The data is in etcd, so it serves what it did before.
func (c *ControlPlane) StartAPIServer(i int) error {
	if i < 0 || i >= len(c.ports) {
		return fmt.Errorf("starting apiserver %d: have %d apiservers", i, len(c.ports))
	}
	c.mu.Lock()
	if c.stopped {
		c.mu.Unlock()
		return fmt.Errorf("starting apiserver %d: %w", i, errStopped)
	}
	if c.apiservers[i] != nil {
		c.mu.Unlock()
		return fmt.Errorf("starting apiserver %d: already running", i)
	}
	p, err := c.launchAPIServer(i)
	c.mu.Unlock()
	if err != nil {
		return fmt.Errorf("starting apiserver %d: %w", i, err)
	}
	// Waiting without the lock lets Stop kill the apiserver meanwhile, which
	// ends the wait.
	ctx, cancel := c.boundedContext(startTimeout)
	defer cancel()
	if err := c.waitAPIServer(ctx, p, i); err != nil {
		return fmt.Errorf("starting apiserver %d: %w", i, err)
	}
	return nil
}
