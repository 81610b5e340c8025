package framework

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"syscall"
)

// startEtcd starts a single-member etcd on two free loopback ports and waits
// until it reports healthy.
func (c *ControlPlane) startEtcd(ctx context.Context) error {
	bin, err := Binary("etcd")
	if err != nil {
		return err
	}
	clientPort, peerPort := c.etcdPorts[0], c.etcdPorts[1]
	c.EtcdURL = "http://127.0.0.1:" + strconv.Itoa(clientPort)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(peerPort)
	args := []string{
		"--name=e2e",
		"--data-dir=" + filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls=" + c.EtcdURL,
		"--advertise-client-urls=" + c.EtcdURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=e2e=" + peerURL,
		// The data is thrown away after the run; fsync only slows tests.
		"--unsafe-no-fsync",
		"--log-level=warn",
	}
	p, err := c.launch("etcd", bin, args, nil, &c.etcd)
	if err != nil {
		return err
	}

	health := c.EtcdURL + "/health"
	return waitFor(ctx, p, "etcd", func(ctx context.Context) error {
		return probeOK(ctx, nil, health)
	})
}

// PauseEtcd stops etcd in its tracks (SIGSTOP) until ResumeEtcd: requests
// that need etcd hang, and the apiservers' /readyz with them, while those
// served from the apiservers' watch caches (a list or get at
// resourceVersion=0, watches) are still answered: a busy or stuck storage
// layer behind a live apiserver.
func (c *ControlPlane) PauseEtcd() error { return c.signalEtcd(syscall.SIGSTOP) }

// ResumeEtcd lets a paused etcd run again (SIGCONT).
func (c *ControlPlane) ResumeEtcd() error { return c.signalEtcd(syscall.SIGCONT) }

func (c *ControlPlane) signalEtcd(sig syscall.Signal) error {
	c.mu.Lock()
	p := c.etcd
	c.mu.Unlock()
	if p == nil || p.cmd.Process == nil {
		return fmt.Errorf("etcd is not running")
	}
	return p.cmd.Process.Signal(sig)
}
