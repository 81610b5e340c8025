package peer

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// nodeUserPrefix is the user name prefix of node identities; the name
// after it is the node's (kube-apiserver's Node authorizer reads it so).
const nodeUserPrefix = "system:node:"

// GetCertificate returns this node's current client certificate: the one
// it presents upstream, which a rotation may replace at any time.
type GetCertificate func() (*tls.Certificate, error)

// verifyNode checks that a presented chain is a node identity issued by the
// cluster CA, for client authentication as kube-apiserver requires of node
// certificates, and returns the node's name. want, if not empty, is the
// only node accepted.
func verifyNode(rawCerts [][]byte, ca *x509.CertPool, want string) (string, error) {
	if len(rawCerts) == 0 {
		return "", errors.New("no certificate presented")
	}
	certs := make([]*x509.Certificate, len(rawCerts))
	for i, raw := range rawCerts {
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return "", fmt.Errorf("parsing certificate: %w", err)
		}
		certs[i] = c
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	leaf := certs[0]
	// Node certificates are client certificates: kube-controller-manager
	// signs them for client auth only, so that is the usage checked, on
	// both ends of the connection.
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return "", fmt.Errorf("not signed by the cluster CA: %w", err)
	}
	node, ok := strings.CutPrefix(leaf.Subject.CommonName, nodeUserPrefix)
	if !ok || node == "" || !slices.Contains(leaf.Subject.Organization, "system:nodes") {
		return "", fmt.Errorf("%q (groups %v) is not a node identity", leaf.Subject.CommonName, leaf.Subject.Organization)
	}
	if want != "" && node != want {
		return "", fmt.Errorf("presented the identity of node %s, want %s", node, want)
	}
	return node, nil
}

// ServerTLS is the TLS configuration of the probe endpoint: it presents
// this node's certificate and accepts only callers with a node identity of
// this cluster.
func ServerTLS(cert GetCertificate, ca *x509.CertPool) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{"http/1.1"},
		ClientAuth: tls.RequireAnyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return cert()
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := verifyNode(raw, ca, "")
			return err
		},
	}
}

// clientTLS is the TLS configuration of a probe of node peer: it presents
// this node's certificate and accepts only peer's identity. The standard
// verification is replaced (InsecureSkipVerify) by verifyNode, because a
// node certificate names a user, not a host, and is issued for client auth.
func clientTLS(cert GetCertificate, ca *x509.CertPool, peer string) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // verified below, as a node identity
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cert()
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := verifyNode(raw, ca, peer)
			return err
		},
	}
}
