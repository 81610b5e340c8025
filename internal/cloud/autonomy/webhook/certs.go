package webhook

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// Keys of the CA Secret.
const (
	SecretCACert   = "ca.crt"        // the CA that signs serving certificates
	SecretCAKey    = "ca.key"        // its private key (PKCS #8)
	SecretCABundle = "ca-bundle.crt" // every CA still trusted: the current one and, after a rotation, the previous one
)

// Defaults of Certs.
const (
	DefaultCAValidity   = 365 * 24 * time.Hour
	DefaultCertValidity = 7 * 24 * time.Hour
	DefaultInterval     = time.Minute
)

// Certs keeps the webhook's serving certificate and the trust in it.
//
// The CA lives in a Secret so that every replica behind the webhook's
// Service serves a certificate the apiserver trusts: each replica issues its
// own serving certificate from that CA, in memory. The bundle written into
// the MutatingWebhookConfiguration holds the current CA and, after a
// rotation, the previous one until it expires, so certificates issued
// before a rotation stay valid while the replicas move over. Each pass
// writes the bundle before issuing from a new CA, so the apiserver trusts a
// CA before any certificate from it is served.
//
// Every replica runs Certs; they agree through the Secret's resourceVersion.
type Certs struct {
	// Client reads and writes the Secret and the webhook configuration.
	Client kubernetes.Interface
	// Namespace and SecretName name the Secret holding the CA.
	Namespace  string
	SecretName string
	// ConfigName is the MutatingWebhookConfiguration whose webhooks get the
	// CA bundle. If empty, no bundle is written.
	ConfigName string
	// Hosts are the DNS names and IP addresses in the serving certificate.
	Hosts []string
	// CAValidity and CertValidity are the lifetimes of the CA and of the
	// serving certificate; zero means DefaultCAValidity and
	// DefaultCertValidity. Each is renewed when less than a third of its
	// lifetime is left.
	CAValidity   time.Duration
	CertValidity time.Duration
	// Interval is the time between two passes of Run; zero means
	// DefaultInterval.
	Interval time.Duration
	// Logger receives rotations and errors. If nil, slog.Default() is used.
	Logger *slog.Logger
	// Now returns the current time. If nil, time.Now is used.
	Now func() time.Time

	mu   sync.Mutex // guards the fields below
	cert *tls.Certificate
	leaf *x509.Certificate
}

// authority is a CA able to sign.
type authority struct {
	cert *x509.Certificate
	key  crypto.Signer
	pem  []byte
}

// Run keeps the certificates current until ctx is done. A failed pass is
// retried with a backoff from one second up to Interval; errors are logged,
// since the previous certificate keeps serving meanwhile.
func (c *Certs) Run(ctx context.Context) error {
	backoff := time.Second
	for {
		wait := c.interval()
		if err := c.Sync(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			c.logger().Error("webhook certificates", "err", err)
			wait, backoff = min(backoff, wait), min(2*backoff, wait)
		} else {
			backoff = time.Second
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// Sync makes one pass: it creates or rotates the CA in the Secret, writes
// the bundle into the webhook configuration and renews the serving
// certificate when it is due or was issued by another CA.
func (c *Certs) Sync(ctx context.Context) error {
	ca, bundle, err := c.ensureCA(ctx)
	if err != nil {
		return err
	}
	// A configuration that cannot be updated must not stop us from serving:
	// the error is reported, and the certificate renewed all the same.
	bundleErr := c.ensureBundle(ctx, bundle)
	return errors.Join(bundleErr, c.ensureServing(ca))
}

// GetCertificate is for tls.Config.GetCertificate.
func (c *Certs) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cert == nil {
		return nil, errNoCertificate
	}
	return c.cert, nil
}

// Ready reports whether a serving certificate has been issued.
func (c *Certs) Ready() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cert != nil
}

// NotAfter returns the expiry of the serving certificate, or the zero time
// before the first one is issued.
func (c *Certs) NotAfter() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.leaf == nil {
		return time.Time{}
	}
	return c.leaf.NotAfter
}

// ensureCA returns the current CA and the bundle to trust, creating the
// Secret, rotating a CA that is due and dropping expired CAs from the
// bundle.
func (c *Certs) ensureCA(ctx context.Context) (*authority, []byte, error) {
	secrets := c.Client.CoreV1().Secrets(c.Namespace)
	s, err := secrets.Get(ctx, c.SecretName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		ca, genErr := newAuthority(c.now(), c.caValidity())
		if genErr != nil {
			return nil, nil, genErr
		}
		s = &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: c.Namespace, Name: c.SecretName},
			Type:       corev1.SecretTypeOpaque,
			Data:       caData(ca, ca.pem),
		}
		_, err = secrets.Create(ctx, s, metav1.CreateOptions{})
		if err == nil {
			c.logger().Info("created webhook CA", "secret", c.Namespace+"/"+c.SecretName, "notAfter", ca.cert.NotAfter)
			return ca, ca.pem, nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return nil, nil, fmt.Errorf("creating CA secret %s/%s: %w", c.Namespace, c.SecretName, err)
		}
		// Another replica won the race: use its CA.
		s, err = secrets.Get(ctx, c.SecretName, metav1.GetOptions{})
	}
	if err != nil {
		return nil, nil, fmt.Errorf("reading CA secret %s/%s: %w", c.Namespace, c.SecretName, err)
	}

	now := c.now()
	ca, parseErr := parseAuthority(s.Data[SecretCACert], s.Data[SecretCAKey])
	old := unexpired(s.Data[SecretCABundle], now)
	var bundle []byte
	switch {
	case parseErr != nil || dueForRenewal(ca.cert, now):
		if parseErr != nil {
			c.logger().Warn("replacing unreadable webhook CA", "secret", c.Namespace+"/"+c.SecretName, "err", parseErr)
		}
		if ca, err = newAuthority(now, c.caValidity()); err != nil {
			return nil, nil, err
		}
		bundle = append(bytes.Clone(ca.pem), old...)
	case !bytes.Equal(old, s.Data[SecretCABundle]) || !bytes.Contains(old, ca.pem):
		bundle = append(bytes.Clone(ca.pem), bytes.ReplaceAll(old, ca.pem, nil)...)
	default:
		return ca, old, nil // nothing to write
	}

	s = s.DeepCopy()
	s.Data = caData(ca, bundle)
	// The update carries the resourceVersion we read: if another replica
	// rotated meanwhile, we get a conflict and retry on its CA.
	if _, err := secrets.Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		return nil, nil, fmt.Errorf("updating CA secret %s/%s: %w", c.Namespace, c.SecretName, err)
	}
	c.logger().Info("updated webhook CA", "secret", c.Namespace+"/"+c.SecretName, "notAfter", ca.cert.NotAfter)
	return ca, bundle, nil
}

// ensureBundle writes bundle into every webhook of the configuration that
// does not have it yet.
func (c *Certs) ensureBundle(ctx context.Context, bundle []byte) error {
	if c.ConfigName == "" {
		return nil
	}
	configs := c.Client.AdmissionregistrationV1().MutatingWebhookConfigurations()
	cfg, err := configs.Get(ctx, c.ConfigName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("reading webhook configuration %s: %w", c.ConfigName, err)
	}
	// Guarded by the resourceVersion, so the indexes are the ones we read.
	ops := []Op{{Op: "test", Path: "/metadata/resourceVersion", Value: cfg.ResourceVersion}}
	for i, wh := range cfg.Webhooks {
		if !bytes.Equal(wh.ClientConfig.CABundle, bundle) {
			ops = append(ops, Op{Op: "add", Path: fmt.Sprintf("/webhooks/%d/clientConfig/caBundle", i), Value: bundle})
		}
	}
	if len(ops) == 1 {
		return nil
	}
	patch, err := json.Marshal(ops)
	if err != nil {
		return fmt.Errorf("encoding webhook configuration patch: %w", err)
	}
	if _, err := configs.Patch(ctx, c.ConfigName, types.JSONPatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("writing CA bundle into webhook configuration %s: %w", c.ConfigName, err)
	}
	c.logger().Info("wrote CA bundle into webhook configuration", "config", c.ConfigName, "webhooks", len(ops)-1)
	return nil
}

// ensureServing issues a serving certificate from ca unless the current one
// was issued by ca and is not yet due for renewal.
func (c *Certs) ensureServing(ca *authority) error {
	c.mu.Lock()
	leaf := c.leaf
	c.mu.Unlock()
	now := c.now()
	if leaf != nil && !dueForRenewal(leaf, now) && leaf.CheckSignatureFrom(ca.cert) == nil {
		return nil
	}
	cert, leaf, err := ca.issueServing(c.Hosts, now, c.certValidity())
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.cert, c.leaf = cert, leaf
	c.mu.Unlock()
	c.logger().Info("issued webhook serving certificate", "hosts", c.Hosts, "notAfter", leaf.NotAfter)
	return nil
}

// dueForRenewal reports whether less than a third of cert's lifetime is left.
func dueForRenewal(cert *x509.Certificate, now time.Time) bool {
	life := cert.NotAfter.Sub(cert.NotBefore)
	return cert.NotAfter.Sub(now) < life/3
}

// clockSkew backdates NotBefore, so that an apiserver whose clock is a
// little behind ours accepts a fresh certificate.
const clockSkew = 5 * time.Minute

func newAuthority(now time.Time, validity time.Duration) (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating CA key: %w", err)
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: fmt.Sprintf("outpost-controller-webhook-ca@%d", now.Unix())},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("creating CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing CA certificate: %w", err)
	}
	return &authority{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// issueServing issues a serving certificate for hosts, expiring no later
// than the CA.
func (a *authority) issueServing(hosts []string, now time.Time, validity time.Duration) (*tls.Certificate, *x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating serving key: %w", err)
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "outpost-controller-webhook"},
		NotBefore:    now.Add(-clockSkew),
		NotAfter:     now.Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if tmpl.NotAfter.After(a.cert.NotAfter) {
		tmpl.NotAfter = a.cert.NotAfter // a certificate cannot outlive its CA
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, key.Public(), a.key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating serving certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("parsing serving certificate: %w", err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, leaf, nil
}

func parseAuthority(certPEM, keyPEM []byte) (*authority, error) {
	cb, _ := pem.Decode(certPEM)
	if cb == nil {
		return nil, errors.New("no CA certificate")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing CA certificate: %w", err)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, errors.New("no CA key")
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing CA key: %w", err)
	}
	key, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("CA key of type %T cannot sign", k)
	}
	return &authority{cert: cert, key: key, pem: pem.EncodeToMemory(cb)}, nil
}

func caData(ca *authority, bundle []byte) map[string][]byte {
	der, err := x509.MarshalPKCS8PrivateKey(ca.key)
	if err != nil {
		// Only keys from newAuthority or parsed as PKCS #8 get here.
		panic(fmt.Sprintf("encoding CA key: %v", err))
	}
	return map[string][]byte{
		SecretCACert:   ca.pem,
		SecretCAKey:    pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		SecretCABundle: bundle,
	}
}

// unexpired returns the certificates of a PEM bundle that are still valid at
// now, re-encoded; unparsable blocks are dropped.
func unexpired(bundle []byte, now time.Time) []byte {
	var out []byte
	for {
		var b *pem.Block
		b, bundle = pem.Decode(bundle)
		if b == nil {
			return out
		}
		if cert, err := x509.ParseCertificate(b.Bytes); err == nil && now.Before(cert.NotAfter) {
			out = append(out, pem.EncodeToMemory(b)...)
		}
	}
}

func serialNumber() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generating serial number: %w", err)
	}
	return n, nil
}

func (c *Certs) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

func (c *Certs) logger() *slog.Logger {
	if c.Logger != nil {
		return c.Logger
	}
	return slog.Default()
}

func (c *Certs) interval() time.Duration {
	if c.Interval > 0 {
		return c.Interval
	}
	return DefaultInterval
}

func (c *Certs) caValidity() time.Duration {
	if c.CAValidity > 0 {
		return c.CAValidity
	}
	return DefaultCAValidity
}

func (c *Certs) certValidity() time.Duration {
	if c.CertValidity > 0 {
		return c.CertValidity
	}
	return DefaultCertValidity
}
