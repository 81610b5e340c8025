package framework

import (
	"context"
	"path/filepath"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// startControllerManager starts kube-controller-manager against the first
// apiserver and waits until its serviceaccount controller has given the
// default namespace its ServiceAccount: the sign that the controllers run.
func (c *ControlPlane) startControllerManager(ctx context.Context) error {
	bin, err := Binary("kube-controller-manager")
	if err != nil {
		return err
	}
	kubeconfig, err := c.componentKubeconfig("kube-controller-manager", "system:kube-controller-manager")
	if err != nil {
		return err
	}
	args := []string{
		"--kubeconfig=" + kubeconfig,
		"--cluster-signing-cert-file=" + c.CAFile,
		"--cluster-signing-key-file=" + c.CAKeyFile,
		"--root-ca-file=" + c.CAFile,
		"--service-account-private-key-file=" + c.ServiceAccountKeyFile,
		// One identity per controller, as in production, so RBAC denials
		// show up in tests.
		"--use-service-account-credentials=true",
		// bootstrapsigner and tokencleaner are off by default; kubelet TLS
		// bootstrap with tokens expects both.
		"--controllers=*,bootstrapsigner,tokencleaner",
		"--service-cluster-ip-range=" + serviceCIDR,
		"--bind-address=127.0.0.1",
		// No serving port: readiness is observed through its effects, and
		// a port would only add a race for it.
		"--secure-port=0",
		"--leader-elect=false",
	}
	args = append(args, c.opts.ControllerManagerArgs...)
	p, err := c.launch("kube-controller-manager", bin, args, nil, &c.kcm)
	if err != nil {
		return err
	}
	return waitFor(ctx, p, "kube-controller-manager to create the default ServiceAccount", func(ctx context.Context) error {
		_, err := c.client.CoreV1().ServiceAccounts(metav1.NamespaceDefault).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

// componentKubeconfig issues a client certificate for a control plane
// component and writes its kubeconfig, pointing at the first apiserver.
func (c *ControlPlane) componentKubeconfig(name, user string) (string, error) {
	crt, key, err := c.IssueClientCert(name, user)
	if err != nil {
		return "", err
	}
	path := filepath.Join(c.Dir, name+".kubeconfig")
	if err := WriteKubeconfig(path, c.URL(0), c.CAFile, crt, key, ""); err != nil {
		return "", err
	}
	return path, nil
}
