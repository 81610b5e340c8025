package hub

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/outposthq/outpost/internal/atomicfile"
	"github.com/outposthq/outpost/internal/certs"
	"github.com/outposthq/outpost/internal/identity"
	"github.com/outposthq/outpost/internal/version"
)

// Names of the certificate pairs outpost obtains by CSR, in DataDir/pki.
const (
	nodeClientName  = "node-client"
	nodeServingName = "node-serving"
)

// upstreamCredentials returns the upstream apiserver address with its CA,
// and the TLS settings that carry this node's credentials.
//
// Without --bootstrap-kubeconfig both come from --kubeconfig as it is. With
// it, outpost does what kubelet's TLS bootstrap does: a valid client
// certificate in --kubeconfig, or one obtained earlier into DataDir/pki, is
// used; otherwise the rotator files a node client CSR with the bootstrap
// token once Run starts. Either way the certificate is renewed before it
// expires and read at every TLS handshake, so a renewal needs no restart.
func (h *Hub) upstreamCredentials() (*rest.Config, *tls.Config, error) {
	if h.cfg.BootstrapKubeconfig == "" {
		restCfg, err := clientcmd.BuildConfigFromFlags("", h.cfg.Kubeconfig)
		if err != nil {
			return nil, nil, fmt.Errorf("loading kubeconfig %s: %w", h.cfg.Kubeconfig, err)
		}
		tlsCfg, err := rest.TLSConfigFor(restCfg)
		if err != nil {
			return nil, nil, fmt.Errorf("loading upstream TLS settings from %s: %w", h.cfg.Kubeconfig, err)
		}
		if tlsCfg == nil {
			tlsCfg = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		return restCfg, tlsCfg, nil
	}

	boot, err := clientcmd.BuildConfigFromFlags("", h.cfg.BootstrapKubeconfig)
	if err != nil {
		return nil, nil, fmt.Errorf("loading bootstrap kubeconfig %s: %w", h.cfg.BootstrapKubeconfig, err)
	}
	h.bootstrap = boot
	rot := &certs.Rotator{
		Name: nodeClientName,
		Dir:  filepath.Join(h.cfg.DataDir, "pki"),
		// What kubelet asks for; kube-controller-manager's approver
		// recognises exactly this shape (and no SANs).
		Template: &x509.CertificateRequest{Subject: pkix.Name{
			CommonName:   identity.NodeUser(h.cfg.NodeName),
			Organization: []string{"system:nodes"},
		}},
		SignerName: certs.SignerNodeClient,
		Usages:     []certificatesv1.KeyUsage{certificatesv1.UsageDigitalSignature, certificatesv1.UsageClientAuth},
		Client:     h.csrClient,
		OnRotate:   h.nodeCertRotated,
		Log:        h.log,
	}
	if err := rot.Load(); err != nil {
		return nil, nil, err
	}
	h.nodeCert = rot

	base := boot
	if kc, err := clientcmd.BuildConfigFromFlags("", h.cfg.Kubeconfig); err == nil {
		if certPEM, keyPEM, ok := validClientCert(kc); ok {
			if err := rot.Seed(certPEM, keyPEM); err != nil {
				return nil, nil, err
			}
			base = kc
		}
	}
	if rot.Current() == nil {
		h.log.Info("no valid node certificate in --kubeconfig or the data dir: requesting one with --bootstrap-kubeconfig", "node", h.cfg.NodeName)
	}
	// Only the address and the CA are taken from the kubeconfig; the
	// client certificate is the rotator's.
	restCfg := &rest.Config{Host: base.Host, TLSClientConfig: rest.TLSClientConfig{
		CAFile: base.CAFile, CAData: base.CAData, ServerName: base.ServerName, Insecure: base.Insecure,
	}}
	tlsCfg, err := rest.TLSConfigFor(restCfg)
	if err != nil {
		return nil, nil, fmt.Errorf("loading upstream TLS settings: %w", err)
	}
	if tlsCfg == nil {
		tlsCfg = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	tlsCfg.GetClientCertificate = rot.GetClientCertificate
	return restCfg, tlsCfg, nil
}

// validClientCert returns the client certificate and key of a kubeconfig
// when both are present and the certificate has not expired.
func validClientCert(c *rest.Config) (certPEM, keyPEM []byte, ok bool) {
	certPEM, keyPEM = c.CertData, c.KeyData
	var err error
	if len(certPEM) == 0 && c.CertFile != "" {
		if certPEM, err = os.ReadFile(c.CertFile); err != nil {
			return nil, nil, false
		}
	}
	if len(keyPEM) == 0 && c.KeyFile != "" {
		if keyPEM, err = os.ReadFile(c.KeyFile); err != nil {
			return nil, nil, false
		}
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, nil, false
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil || !time.Now().Before(leaf.NotAfter) {
		return nil, nil, false
	}
	return certPEM, keyPEM, true
}

// csrClient is the client that files this node's CSRs: as the node when it
// holds a valid certificate (renewal), else with the bootstrap token.
func (h *Hub) csrClient(current *tls.Certificate) (*certs.CSRClient, error) {
	if current == nil {
		if h.bootstrap == nil {
			return nil, errors.New("no valid node certificate, and no --bootstrap-kubeconfig to request one")
		}
		rt, err := rest.TransportFor(h.bootstrap)
		if err != nil {
			return nil, fmt.Errorf("bootstrap credentials: %w", err)
		}
		return &certs.CSRClient{Host: h.bootstrap.Host, Transport: rt, UserAgent: userAgent()}, nil
	}
	return h.nodeCSRClient(), nil
}

// nodeCSRClient files CSRs as the node, through the pool, so that a renewal
// follows the healthy apiservers.
func (h *Hub) nodeCSRClient() *certs.CSRClient {
	return &certs.CSRClient{Host: "https://upstream", Transport: nodeTransport{h}, UserAgent: userAgent()}
}

func userAgent() string { return "outpost/" + version.Version }

// nodeTransport sends requests upstream with the node's credentials
// (upstream.Pool.As), resolved at each request: the CSR client is made
// before the pool and the authenticator are.
type nodeTransport struct{ h *Hub }

func (t nodeTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	return t.h.pool.As(t.h.auth.Node()).RoundTrip(r)
}

// nodeCertRotated closes every upstream connection after a renewal: they
// were made with the old certificate, which the apiserver will refuse
// once it expires. Watches on them end cleanly and are re-established with
// the new one, as kubelet's transport does on rotation.
func (h *Hub) nodeCertRotated(c *tls.Certificate) {
	h.log.Info("node client certificate renewed; closing upstream connections made with the old one", "expires", c.Leaf.NotAfter)
	for i := 0; i < h.pool.Len(); i++ {
		h.pool.CloseConnections(i)
	}
	h.metrics.CertRotations.WithLabelValues(nodeClientName).Inc()
}

// writeKubeconfig writes --kubeconfig pointing at the rotated certificate
// once one is held, unless it already holds a valid credential: it is what
// an operator (and kubelet's own tooling) reads to act as this node.
func (h *Hub) writeKubeconfig(server string, caData []byte, caFile string) error {
	if kc, err := clientcmd.BuildConfigFromFlags("", h.cfg.Kubeconfig); err == nil {
		if _, _, ok := validClientCert(kc); ok {
			return nil
		}
	}
	current := h.nodeCert.CurrentPath()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["default-cluster"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caData, CertificateAuthority: caFile}
	cfg.AuthInfos["default-auth"] = &clientcmdapi.AuthInfo{ClientCertificate: current, ClientKey: current}
	cfg.Contexts["default-context"] = &clientcmdapi.Context{Cluster: "default-cluster", AuthInfo: "default-auth"}
	cfg.CurrentContext = "default-context"
	if err := os.MkdirAll(filepath.Dir(h.cfg.Kubeconfig), 0o700); err != nil {
		return err
	}
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return fmt.Errorf("encoding %s: %w", h.cfg.Kubeconfig, err)
	}
	// Replaced whole: kubelet's tooling or an operator may read it at any
	// time, and a crash midway must not leave a half kubeconfig.
	return atomicfile.WriteFile(h.cfg.Kubeconfig, data, 0o600)
}

// servingHosts are the SANs of outpost's serving certificate: the names
// local clients use.
func (h *Hub) servingHosts() []string {
	hosts := []string{"127.0.0.1", "::1", "localhost"}
	if h.cfg.NodeName != "" {
		hosts = append(hosts, h.cfg.NodeName)
	}
	hosts = append(hosts, h.cfg.NodeIPs...)
	if host, _, err := net.SplitHostPort(h.cfg.SecureAddress); err == nil && host != "" && host != "0.0.0.0" && host != "::" {
		hosts = append(hosts, host)
	}
	if h.cfg.NodeLocalAddress != "" {
		// What in-cluster clients verify: the address kubelet gives them,
		// and the names of the kubernetes Service (its VIP is learned from
		// the apiserver, see kubernetesServiceIPs).
		if host, _, err := net.SplitHostPort(h.cfg.NodeLocalAddress); err == nil {
			hosts = append(hosts, host)
		}
		hosts = append(hosts, "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc."+h.cfg.ClusterDomain)
	}
	seen := map[string]bool{}
	out := hosts[:0]
	for _, s := range hosts {
		if k := strings.ToLower(s); !seen[k] {
			seen[k] = true
			out = append(out, s)
		}
	}
	return out
}

// servingRotator requests outpost's serving certificate from the
// kubernetes.io/kubelet-serving signer, as kubelet does with
// --rotate-server-certificates. Like kubelet's, such a CSR is not approved
// by kube-controller-manager: the cluster's operator or approver decides.
func (h *Hub) servingRotator() *certs.Rotator {
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{
		CommonName:   identity.NodeUser(h.cfg.NodeName),
		Organization: []string{"system:nodes"},
	}}
	for _, s := range h.servingHosts() {
		if ip := net.ParseIP(s); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, s)
		}
	}
	return &certs.Rotator{
		Name:       nodeServingName,
		Dir:        filepath.Join(h.cfg.DataDir, "pki"),
		Template:   tmpl,
		SignerName: certs.SignerNodeServing,
		Usages:     []certificatesv1.KeyUsage{certificatesv1.UsageDigitalSignature, certificatesv1.UsageServerAuth},
		// Always as the node: the signer issues serving certificates only
		// to the node they name.
		Client: func(*tls.Certificate) (*certs.CSRClient, error) { return h.nodeCSRClient(), nil },
		Learn:  h.learnServingNames,
		Log:    h.log,
	}
}

// learnServingNames adds the kubernetes Service's VIP to a serving
// certificate request when in-cluster clients are served, since clients
// that reach outpost through the VIP verify it.
func (h *Hub) learnServingNames(ctx context.Context, tmpl *x509.CertificateRequest) (*x509.CertificateRequest, error) {
	if h.cfg.NodeLocalAddress == "" {
		return tmpl, nil
	}
	ips, err := h.kubernetesServiceIPs(ctx)
	if err != nil {
		return nil, fmt.Errorf("learning the kubernetes Service's address for the serving certificate: %w", err)
	}
	out := *tmpl
	out.IPAddresses = slices.Clone(tmpl.IPAddresses)
	for _, ip := range ips {
		if !slices.ContainsFunc(out.IPAddresses, ip.Equal) {
			out.IPAddresses = append(out.IPAddresses, ip)
		}
	}
	return &out, nil
}

// kubernetesServiceIPs asks the apiserver, as the node, for the ClusterIPs
// of the kubernetes Service in default.
func (h *Hub) kubernetesServiceIPs(ctx context.Context) ([]net.IP, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://upstream/api/v1/namespaces/default/services/kubernetes", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", userAgent())
	resp, err := nodeTransport{h}.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET the kubernetes Service: %s", resp.Status)
	}
	var svc corev1.Service
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&svc); err != nil {
		return nil, fmt.Errorf("decoding the kubernetes Service: %w", err)
	}
	var ips []net.IP
	for _, s := range append([]string{svc.Spec.ClusterIP}, svc.Spec.ClusterIPs...) {
		if ip := net.ParseIP(s); ip != nil && !slices.ContainsFunc(ips, ip.Equal) {
			ips = append(ips, ip)
		}
	}
	if len(ips) == 0 {
		return nil, errors.New("the kubernetes Service has no ClusterIP")
	}
	return ips, nil
}
