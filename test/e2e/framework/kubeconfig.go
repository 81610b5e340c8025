package framework

import (
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// WriteKubeconfig writes a kubeconfig with one cluster, user and context to
// path: the server URL, the CA file that verifies it, and either a client
// certificate and key or a bearer token (pass "" for what is not used). The
// files are referenced, not embedded, so a reissued certificate is picked up
// by whoever reads the kubeconfig next.
func WriteKubeconfig(path, server, caFile, certFile, keyFile, token string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{
		Server:               server,
		CertificateAuthority: caFile,
	}
	cfg.AuthInfos["e2e"] = &clientcmdapi.AuthInfo{
		ClientCertificate: certFile,
		ClientKey:         keyFile,
		Token:             token,
	}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: "e2e"}
	cfg.CurrentContext = "e2e"
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return fmt.Errorf("encoding kubeconfig %s: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("writing kubeconfig: %w", err)
	}
	// 0600: the file may hold a bearer token.
	return writeFileAtomic(path, data, 0o600)
}

// NodeKubeconfig writes the kubeconfig of a kubelet of node that talks to
// server (an apiserver's URL, or a proxy in front of one) with the node's
// credentials (see NodeCredentials, issued afresh) and trusts the cluster
// CA, and returns its path in Dir. Each call rewrites it.
func (c *ControlPlane) NodeKubeconfig(node, server string) (string, error) {
	certFile, keyFile, err := c.NodeCredentials(node)
	if err != nil {
		return "", err
	}
	path := filepath.Join(c.Dir, "node-"+node+".kubeconfig")
	if err := WriteKubeconfig(path, server, c.CAFile, certFile, keyFile, ""); err != nil {
		return "", err
	}
	return path, nil
}
