package certs

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/cert"
	"k8s.io/client-go/util/keyutil"

	"github.com/outposthq/outpost/internal/atomicfile"
)

// Signers of the certificates a node asks for, as kubelet does.
const (
	SignerNodeClient  = certificatesv1.KubeAPIServerClientKubeletSignerName
	SignerNodeServing = certificatesv1.KubeletServingSignerName
)

// Rotator keeps one certificate that the cluster signs on request fresh: it
// files a CertificateSigningRequest when it holds none (or only an expired
// one), waits for approval, keeps the key and certificate in Dir (0600, in
// kubelet's file layout: <Name>-<time>.pem holding both, and the symlink
// <Name>-current.pem), and files a new request at a random point between 70
// and 90 per cent of the certificate's life, as kubelet does.
//
// Set the exported fields, call Load, then Run. Current is safe for
// concurrent use at any time.
type Rotator struct {
	// Name prefixes the files in Dir, e.g. "node-client".
	Name string
	Dir  string
	// Template is the subject and SANs to request.
	Template *x509.CertificateRequest
	// Learn, if set, completes Template at the time of a request with what
	// only the apiserver can tell (say, a Service's address); an error
	// postpones the request. A held certificate that lacks a name the
	// completed template asks for is renewed at once.
	Learn func(ctx context.Context, tmpl *x509.CertificateRequest) (*x509.CertificateRequest, error)
	// SignerName and Usages go into the CSR.
	SignerName string
	Usages     []certificatesv1.KeyUsage
	// Client returns the client that files the request: with the current
	// certificate (renewal), or with bootstrap credentials when current is
	// nil.
	Client func(current *tls.Certificate) (*CSRClient, error)
	// OnRotate, if set, is called after a new certificate replaced an older
	// one (not after the first), e.g. to close connections made with it.
	OnRotate func(*tls.Certificate)
	Log      *slog.Logger

	cur atomic.Pointer[tls.Certificate]
	// received is when the current certificate was written to Dir: the
	// signer back-dates NotBefore (by five minutes in kube-controller-
	// manager), which must not make a short-lived certificate look older.
	received atomic.Int64

	readyOnce sync.Once
	ready     chan struct{}
}

// Load reads the current certificate from Dir, if any. It does not fail
// when there is none.
func (r *Rotator) Load() error {
	if r.ready == nil {
		r.ready = make(chan struct{})
	}
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", r.Dir, err)
	}
	current := r.CurrentPath()
	c, err := tls.LoadX509KeyPair(current, current)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		// A damaged pair is replaced by a new request, not fatal.
		r.Log.Warn("stored certificate is unusable; a new one will be requested", "name", r.Name, "err", err)
		return nil
	}
	r.set(&c, fileTime(current))
	return nil
}

// CurrentPath is the file (a symlink) holding the current certificate and
// its key.
func (r *Rotator) CurrentPath() string { return filepath.Join(r.Dir, r.Name+"-current.pem") }

// Seed stores a certificate and key obtained elsewhere (e.g. the kubeconfig
// the node started with) as the current pair when Dir holds no valid one,
// so that it is renewed from there on.
func (r *Rotator) Seed(certPEM, keyPEM []byte) error {
	if c := r.Current(); c != nil {
		return nil
	}
	c, err := r.store(certPEM, keyPEM)
	if err != nil {
		return fmt.Errorf("storing %s certificate: %w", r.Name, err)
	}
	r.set(c, time.Time{})
	return nil
}

// store writes a new pair into a file of its own and points the current
// symlink at it, so that a crash leaves either the old pair or the new.
func (r *Rotator) store(certPEM, keyPEM []byte) (*tls.Certificate, error) {
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	name := r.Name + "-" + time.Now().UTC().Format(pairTime) + ".pem"
	data := append(append(append([]byte(nil), certPEM...), '\n'), keyPEM...)
	if err := atomicfile.WriteFile(filepath.Join(r.Dir, name), data, 0o600); err != nil {
		return nil, err
	}
	link := r.CurrentPath()
	tmp := link + ".tmp"
	_ = os.Remove(tmp)
	if err := os.Symlink(name, tmp); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, link); err != nil {
		return nil, err
	}
	r.prune(name)
	return &c, nil
}

// pairTime is the time format in the names of stored pairs; it sorts as
// the times do.
const pairTime = "2006-01-02-15-04-05.000000000"

// prune removes the stored pairs older than the one before newest, so that
// renewals (every few weeks for as long as the node lives, or every few
// minutes with short-lived certificates) do not pile files up. kubelet keeps
// them all; one previous pair is kept, to compare with after a rotation.
// Files whose names are not ours are left alone.
func (r *Rotator) prune(newest string) {
	entries, err := os.ReadDir(r.Dir)
	if err != nil {
		r.Log.Warn("cannot list stored certificates to remove old ones", "dir", r.Dir, "err", err)
		return
	}
	var pairs []string
	for _, e := range entries {
		stamp, ok := strings.CutPrefix(e.Name(), r.Name+"-")
		if !ok {
			continue
		}
		if stamp, ok = strings.CutSuffix(stamp, ".pem"); !ok || !e.Type().IsRegular() {
			continue
		}
		if _, err := time.Parse(pairTime, stamp); err == nil && e.Name() <= newest {
			pairs = append(pairs, e.Name())
		}
	}
	slices.Sort(pairs)
	for _, old := range pairs[:max(len(pairs)-2, 0)] {
		if err := os.Remove(filepath.Join(r.Dir, old)); err != nil && !errors.Is(err, os.ErrNotExist) {
			r.Log.Warn("cannot remove an old certificate", "file", old, "err", err)
			return
		}
	}
}

func fileTime(path string) time.Time {
	fi, err := os.Stat(path)
	if err != nil {
		return time.Time{}
	}
	return fi.ModTime()
}

func (r *Rotator) set(c *tls.Certificate, received time.Time) {
	if c.Leaf == nil && len(c.Certificate) > 0 {
		c.Leaf, _ = x509.ParseCertificate(c.Certificate[0])
	}
	r.cur.Store(c)
	r.received.Store(received.UnixNano())
	if c.Leaf != nil && time.Now().Before(c.Leaf.NotAfter) {
		r.readyOnce.Do(func() { close(r.ready) })
	}
}

// Current returns the certificate in use, or nil when there is none or it
// has expired.
func (r *Rotator) Current() *tls.Certificate {
	c := r.cur.Load()
	if c == nil || c.Leaf == nil || !time.Now().Before(c.Leaf.NotAfter) {
		return nil
	}
	return c
}

// Ready is closed once a valid certificate is held.
func (r *Rotator) Ready() <-chan struct{} { return r.ready }

// GetClientCertificate serves tls.Config.GetClientCertificate. Without a
// certificate it sends none: the apiserver then sees an anonymous caller.
func (r *Rotator) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	if c := r.Current(); c != nil {
		return c, nil
	}
	return &tls.Certificate{}, nil
}

// Deadline is when the current certificate is to be renewed: a random
// point between 70 and 90 per cent of its life, counted from when it was
// received (or NotBefore, if later). Zero when there is no valid one.
func (r *Rotator) Deadline() time.Time {
	c := r.Current()
	if c == nil {
		return time.Time{}
	}
	start := c.Leaf.NotBefore
	if rec := time.Unix(0, r.received.Load()); r.received.Load() != 0 && rec.After(start) && rec.Before(c.Leaf.NotAfter) {
		start = rec
	}
	life := c.Leaf.NotAfter.Sub(start)
	n, _ := rand.Int(rand.Reader, big.NewInt(1000))
	frac := 0.7 + 0.2*float64(n.Int64())/1000
	return start.Add(time.Duration(float64(life) * frac))
}

// Run renews the certificate until ctx ends. Failures are retried with a
// backoff from 2 s to 1 min and logged once per distinct error.
func (r *Rotator) Run(ctx context.Context) error {
	backoff := 2 * time.Second
	var lastErr string
	renewed := false // a certificate was just issued: it is kept until its deadline
	for {
		if c := r.Current(); c != nil && (renewed || !r.lacksNames(ctx, c.Leaf)) {
			renewed = false
			at := r.Deadline()
			r.Log.Info("certificate renewal scheduled", "name", r.Name, "at", at.Round(time.Second), "expires", c.Leaf.NotAfter)
			if !sleep(ctx, time.Until(at)) {
				return nil
			}
		}
		err := r.renew(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if err == nil {
			backoff, lastErr, renewed = 2*time.Second, "", true
			if c := r.Current(); c != nil && r.lacksNames(ctx, c.Leaf) {
				// The signer left a name out: asking again at once would
				// only get the same.
				r.Log.Warn("the certificate issued lacks names asked for; kept until its renewal", "name", r.Name)
			}
			continue
		}
		if err.Error() != lastErr {
			r.Log.Warn("requesting a certificate failed; retrying", "name", r.Name, "signer", r.SignerName, "err", err, "in", backoff)
			lastErr = err.Error()
		}
		if !sleep(ctx, backoff) {
			return nil
		}
		// A denied or unanswered request is not asked again every minute
		// forever: each one is a CSR object and an event in the cluster.
		backoff = min(backoff*2, maxBackoff)
	}
}

// maxBackoff bounds the wait between failed requests.
const maxBackoff = 15 * time.Minute

func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// template returns what to request now.
func (r *Rotator) template(ctx context.Context) (*x509.CertificateRequest, error) {
	if r.Learn == nil {
		return r.Template, nil
	}
	return r.Learn(ctx, r.Template)
}

// lacksNames reports whether leaf lacks a SAN that a request now would
// ask for (the configuration changed, or the apiserver told something new).
// When the apiserver cannot be asked, only the configured names count.
func (r *Rotator) lacksNames(ctx context.Context, leaf *x509.Certificate) bool {
	tmpl, err := r.template(ctx)
	if err != nil {
		// What only the apiserver knows cannot be told now; the names
		// of the configuration can.
		tmpl = r.Template
	}
	for _, d := range tmpl.DNSNames {
		if !slices.Contains(leaf.DNSNames, d) {
			r.Log.Info("certificate lacks a name now asked for; requesting a new one", "name", r.Name, "dns", d)
			return true
		}
	}
	for _, ip := range tmpl.IPAddresses {
		if !slices.ContainsFunc(leaf.IPAddresses, ip.Equal) {
			r.Log.Info("certificate lacks an address now asked for; requesting a new one", "name", r.Name, "ip", ip)
			return true
		}
	}
	return false
}

// renew files one CSR with a new key and waits for its certificate.
func (r *Rotator) renew(ctx context.Context) error {
	tmpl, err := r.template(ctx)
	if err != nil {
		return fmt.Errorf("completing the request: %w", err)
	}
	old := r.Current()
	client, err := r.Client(old)
	if err != nil {
		return fmt.Errorf("building the client that files the CSR: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	csrPEM, err := cert.MakeCSRFromTemplate(key, tmpl)
	if err != nil {
		return fmt.Errorf("making CSR: %w", err)
	}
	keyPEM, err := keyutil.MarshalPrivateKeyToPEM(key)
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
	defer cancel()
	req, err := client.Create(rctx, &certificatesv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "csr-"},
		Spec:       certificatesv1.CertificateSigningRequestSpec{Request: csrPEM, SignerName: r.SignerName, Usages: r.Usages},
	})
	if err != nil {
		return fmt.Errorf("filing CSR: %w", err)
	}
	r.Log.Info("certificate signing request filed; waiting for approval", "name", r.Name, "csr", req.Name, "signer", r.SignerName)
	certPEM, err := client.Wait(rctx, req.Name, string(req.UID), time.Second)
	if err != nil {
		return err
	}
	c, err := r.store(certPEM, keyPEM)
	if err != nil {
		return fmt.Errorf("storing certificate: %w", err)
	}
	r.set(c, time.Now())
	r.Log.Info("certificate issued", "name", r.Name, "csr", req.Name, "subject", c.Leaf.Subject.String(), "expires", c.Leaf.NotAfter)
	if old != nil && r.OnRotate != nil {
		r.OnRotate(c)
	}
	return nil
}
