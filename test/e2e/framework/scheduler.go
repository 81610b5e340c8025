package framework

import (
	"context"
	"crypto/tls"
	"net/http"
	"strconv"
)

// startScheduler starts kube-scheduler against the first apiserver and waits
// for its /healthz.
func (c *ControlPlane) startScheduler(ctx context.Context) error {
	bin, err := Binary("kube-scheduler")
	if err != nil {
		return err
	}
	kubeconfig, err := c.componentKubeconfig("kube-scheduler", "system:kube-scheduler")
	if err != nil {
		return err
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	args := []string{
		"--kubeconfig=" + kubeconfig,
		"--authentication-kubeconfig=" + kubeconfig,
		"--authorization-kubeconfig=" + kubeconfig,
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--leader-elect=false",
	}
	p, err := c.launch("kube-scheduler", bin, args, nil, &c.scheduler)
	if err != nil {
		return err
	}

	// The scheduler serves /healthz with a self-signed certificate of its
	// own; verifying it would prove nothing about readiness.
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	defer client.CloseIdleConnections()
	healthz := "https://127.0.0.1:" + strconv.Itoa(port) + "/healthz"
	return waitFor(ctx, p, "kube-scheduler /healthz", func(ctx context.Context) error {
		return probeOK(ctx, client, healthz)
	})
}
