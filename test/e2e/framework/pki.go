package framework

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// certValidity is long on purpose: kube-controller-manager never signs a
// certificate past its CA's expiry, and tests that rotate certificates must
// not race the CA.
const certValidity = 10 * 365 * 24 * time.Hour

// authority is the cluster CA, kept in memory to sign the certificates the
// framework and tests ask for.
type authority struct {
	cert *x509.Certificate
	key  crypto.Signer
}

// newAuthority creates a self-signed CA and writes it to certFile/keyFile.
func newAuthority(certFile, keyFile string) (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating CA key: %w", err)
	}
	tmpl, err := template("outpost-e2e-ca")
	if err != nil {
		return nil, err
	}
	tmpl.IsCA = true
	tmpl.BasicConstraintsValid = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("self-signing CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing CA: %w", err)
	}
	if err := writeCertAndKey(certFile, keyFile, der, key); err != nil {
		return nil, err
	}
	return &authority{cert: cert, key: key}, nil
}

// template returns a certificate template with a random serial and the
// common validity window. NotBefore is backdated so that a certificate is
// valid at once for every process, whatever their clock granularity.
func template(cn string, orgs ...string) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generating serial number: %w", err)
	}
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(certValidity),
	}, nil
}

// issue signs a fresh key pair for tmpl and writes it to certFile/keyFile.
func (a *authority) issue(tmpl *x509.Certificate, certFile, keyFile string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating key for %q: %w", tmpl.Subject.CommonName, err)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, key.Public(), a.key)
	if err != nil {
		return fmt.Errorf("signing certificate for %q: %w", tmpl.Subject.CommonName, err)
	}
	return writeCertAndKey(certFile, keyFile, der, key)
}

// issueServing writes a serving certificate for the given IPs and DNS names.
func (a *authority) issueServing(cn string, ips []net.IP, dnsNames []string, certFile, keyFile string) error {
	tmpl, err := template(cn)
	if err != nil {
		return err
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	tmpl.IPAddresses = ips
	tmpl.DNSNames = dnsNames
	return a.issue(tmpl, certFile, keyFile)
}

// issueClient writes a client certificate; Kubernetes reads the user name
// from CN and the groups from O.
func (a *authority) issueClient(cn string, orgs []string, certFile, keyFile string) error {
	tmpl, err := template(cn, orgs...)
	if err != nil {
		return err
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	return a.issue(tmpl, certFile, keyFile)
}

// IssueClientCert writes a client certificate and key signed by the cluster
// CA into Dir, as <name>.crt and <name>.key, and returns their paths. The
// apiserver maps CN to the user name and each O to a group. Issuing again
// under the same name replaces the files.
func (c *ControlPlane) IssueClientCert(name, cn string, orgs ...string) (certFile, keyFile string, err error) {
	if name == "" || strings.ContainsAny(name, `/\`) || name == "." || name == ".." {
		return "", "", fmt.Errorf("issuing client certificate: invalid file name %q", name)
	}
	certFile = filepath.Join(c.Dir, "pki", name+".crt")
	keyFile = filepath.Join(c.Dir, "pki", name+".key")
	if err := c.ca.issueClient(cn, orgs, certFile, keyFile); err != nil {
		return "", "", fmt.Errorf("issuing client certificate %q: %w", name, err)
	}
	return certFile, keyFile, nil
}

// NodeCredentials issues the client certificate a kubelet of node would hold
// (CN=system:node:<node>, O=system:nodes), which the Node authorizer and
// NodeRestriction admission limit to that node's own objects.
func (c *ControlPlane) NodeCredentials(node string) (certFile, keyFile string, err error) {
	return c.IssueClientCert("node-"+node, "system:node:"+node, "system:nodes")
}

// CertPool reads the PEM certificates in file (a CAFile, an Outpost's
// ServingCAFile) into a pool, for a client that trusts them. It fails t if
// the file holds none.
func CertPool(t testing.TB, file string) *x509.CertPool {
	t.Helper()
	pool, err := readCertPool(file)
	if err != nil {
		t.Fatal(err)
	}
	return pool
}

func readCertPool(file string) (*x509.CertPool, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("no certificate in %s", file)
	}
	return pool, nil
}

// writeServiceAccountKeys writes the RSA key pair that signs and verifies
// service account tokens. RSA rather than ECDSA because RS256 is what every
// token consumer accepts.
func writeServiceAccountKeys(privFile, pubFile string) error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("generating service account key: %w", err)
	}
	privDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encoding service account key: %w", err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return fmt.Errorf("encoding service account public key: %w", err)
	}
	if err := writePEM(privFile, "PRIVATE KEY", privDER, 0o600); err != nil {
		return err
	}
	return writePEM(pubFile, "PUBLIC KEY", pubDER, 0o644)
}

func writeCertAndKey(certFile, keyFile string, certDER []byte, key crypto.Signer) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encoding private key: %w", err)
	}
	if err := writePEM(certFile, "CERTIFICATE", certDER, 0o644); err != nil {
		return err
	}
	return writePEM(keyFile, "PRIVATE KEY", keyDER, 0o600)
}

func writePEM(path, blockType string, der []byte, perm os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	data := pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der})
	return writeFileAtomic(path, data, perm)
}

// writeFileAtomic writes through a temporary file and a rename, so that a
// process watching the file (a client reloading a rotated certificate) never
// reads half of it.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // fails harmlessly after the rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}
