package hub

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net/http"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/internal/config"
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

// checkPeers refuses --peer-address without what the peer checks need: the
// cluster CA, to verify the peers, and a node client certificate, which the
// peers verify. Without a certificate (a token kubeconfig) every peer's
// handshake with this node would fail, and they would report it unreachable
// while it is alive: if its link were then cut, its pods would be evicted.
// --peer-address was asked for, so this is a configuration error rather
// than a feature quietly turned off.
func checkPeers(cfg config.Hub, clientCA *x509.CertPool, upstream *tls.Config) error {
	if !cfg.Peers.Enabled() {
		return nil
	}
	if clientCA == nil {
		return errors.New("--peer-address needs the cluster CA to verify peers: --client-ca-file or a CA in the kubeconfig")
	}
	if upstream.GetClientCertificate == nil && len(upstream.Certificates) == 0 {
		return errors.New("--peer-address needs a node client certificate, which peers verify (client-certificate in --kubeconfig, or --bootstrap-kubeconfig to obtain one): this kubeconfig has none, and every peer would report this node unreachable")
	}
	return nil
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
