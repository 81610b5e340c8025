package hub

import (
	"crypto/tls"
	"errors"
	"net/http"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/internal/peer"
)

// peerSite returns this node's part in its site's peer checks (package
// peer), or nil when --peer-address is off. It presents the node client
// certificate outpost uses upstream, renewed or not, and reports through the
// pool as the node.
func (h *Hub) peerSite() (*peer.Site, error) {
	if !h.cfg.Peers.Enabled() {
		return nil, nil
	}
	if h.auth.ClientCAs == nil {
		return nil, errors.New("--peer-address needs the cluster CA to verify peers: --client-ca-file or a CA in the kubeconfig")
	}
	client, err := kubernetes.NewForConfigAndClient(&rest.Config{Host: "https://upstream", UserAgent: userAgent()},
		&http.Client{Transport: nodeTransport{h}, Timeout: 10 * time.Second})
	if err != nil {
		return nil, err
	}
	return &peer.Site{
		Config:  h.cfg.Peers,
		Node:    h.cfg.NodeName,
		Cert:    h.nodeCertificate,
		CA:      h.auth.ClientCAs,
		Client:  client,
		Online:  h.monitor.Online,
		Metrics: h.peerMetrics,
		Log:     h.log.With("component", "peer"),
	}, nil
}

// nodeCertificate is the node client certificate outpost presents upstream
// at this moment.
func (h *Hub) nodeCertificate() (*tls.Certificate, error) {
	c := h.upstreamTLS
	if c.GetClientCertificate != nil {
		cert, err := c.GetClientCertificate(&tls.CertificateRequestInfo{})
		if err == nil && (cert == nil || len(cert.Certificate) == 0) {
			err = errors.New("this node holds no client certificate yet")
		}
		return cert, err
	}
	if len(c.Certificates) > 0 {
		return &c.Certificates[0], nil
	}
	return nil, errors.New("the kubeconfig holds no node client certificate")
}
