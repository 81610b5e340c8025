package certs

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// fakeSigner is a CSR API that approves and signs every request with a
// test CA for life, or denies them all.
type fakeSigner struct {
	t    *testing.T
	life time.Duration
	deny bool

	ca    *x509.Certificate
	caKey *ecdsa.PrivateKey

	mu   sync.Mutex
	csrs map[string]*certificatesv1.CertificateSigningRequest
}

func newFakeSigner(t *testing.T, life time.Duration) *fakeSigner {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test-ca"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	return &fakeSigner{t: t, life: life, ca: ca, caKey: key, csrs: map[string]*certificatesv1.CertificateSigningRequest{}}
}

func (f *fakeSigner) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case r.Method == http.MethodPost && r.URL.Path == csrPath:
		body, _ := io.ReadAll(r.Body)
		csr := &certificatesv1.CertificateSigningRequest{}
		if err := json.Unmarshal(body, csr); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		csr.Name = csr.GenerateName + big.NewInt(int64(len(f.csrs))).String()
		csr.UID = "uid-" + types.UID(csr.Name)
		f.sign(csr)
		f.csrs[csr.Name] = csr
		w.WriteHeader(http.StatusCreated)
		_ = json.NewEncoder(w).Encode(csr)
	case r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, csrPath+"/"):
		csr, ok := f.csrs[strings.TrimPrefix(r.URL.Path, csrPath+"/")]
		if !ok {
			w.WriteHeader(http.StatusNotFound)
			_ = json.NewEncoder(w).Encode(metav1.Status{Status: metav1.StatusFailure, Message: "not found", Code: 404})
			return
		}
		_ = json.NewEncoder(w).Encode(csr)
	default:
		http.Error(w, "unexpected "+r.Method+" "+r.URL.Path, http.StatusBadRequest)
	}
}

func (f *fakeSigner) sign(csr *certificatesv1.CertificateSigningRequest) {
	if f.deny {
		csr.Status.Conditions = []certificatesv1.CertificateSigningRequestCondition{{Type: certificatesv1.CertificateDenied, Reason: "Test"}}
		return
	}
	block, _ := pem.Decode(csr.Spec.Request)
	req, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		f.t.Errorf("CSR does not parse: %v", err)
		return
	}
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(now.UnixNano()), Subject: req.Subject,
		// Back-dated as kube-controller-manager does.
		NotBefore: now.Add(-5 * time.Minute), NotAfter: now.Add(f.life),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, f.ca, req.PublicKey, f.caKey)
	if err != nil {
		f.t.Errorf("signing: %v", err)
		return
	}
	csr.Status.Conditions = []certificatesv1.CertificateSigningRequestCondition{{Type: certificatesv1.CertificateApproved, Reason: "Test"}}
	csr.Status.Certificate = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func newRotator(t *testing.T, dir, url string) *Rotator {
	return &Rotator{
		Name: "node-client", Dir: dir,
		Template:   &x509.CertificateRequest{Subject: pkix.Name{CommonName: "system:node:n1", Organization: []string{"system:nodes"}}},
		SignerName: SignerNodeClient,
		Usages:     []certificatesv1.KeyUsage{certificatesv1.UsageDigitalSignature, certificatesv1.UsageClientAuth},
		Client: func(*tls.Certificate) (*CSRClient, error) {
			return &CSRClient{Host: url, Transport: http.DefaultTransport}, nil
		},
		Log: slog.New(slog.DiscardHandler),
	}
}

func TestRotatorObtainsStoresAndRenews(t *testing.T) {
	signer := newFakeSigner(t, 4*time.Second)
	srv := httptest.NewServer(signer)
	defer srv.Close()
	dir := t.TempDir()

	var rotated []*tls.Certificate
	var mu sync.Mutex
	r := newRotator(t, dir, srv.URL)
	r.OnRotate = func(c *tls.Certificate) { mu.Lock(); rotated = append(rotated, c); mu.Unlock() }
	if err := r.Load(); err != nil {
		t.Fatal(err)
	}
	if r.Current() != nil {
		t.Fatal("a certificate before any was requested")
	}
	if c, _ := r.GetClientCertificate(nil); c == nil || len(c.Certificate) != 0 {
		t.Fatal("without a certificate the handshake must send none")
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	select {
	case <-r.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("no certificate obtained")
	}
	first := r.Current()
	if first.Leaf.Subject.CommonName != "system:node:n1" {
		t.Fatalf("subject %v", first.Leaf.Subject)
	}
	// The renewal point counts from receipt, not from the back-dated
	// NotBefore: 70-90% of the 4 s left, i.e. 2.8-3.6 s from now.
	if d := time.Until(r.Deadline()); d < 2*time.Second || d > 4*time.Second {
		t.Fatalf("renewal in %v; want within 70-90%% of the life left", d)
	}
	fi, err := os.Stat(r.CurrentPath())
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("stored pair: %v %v; want mode 0600", fi, err)
	}

	// Renewed before it expires, with a new key.
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		n := len(rotated)
		mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("not renewed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	second := r.Current()
	if second.Leaf.SerialNumber.Cmp(first.Leaf.SerialNumber) == 0 || second.Leaf.PublicKey.(*ecdsa.PublicKey).Equal(first.Leaf.PublicKey) {
		t.Fatal("the renewal reused the certificate or its key")
	}
	if !time.Now().Before(first.Leaf.NotAfter) {
		t.Fatal("renewed only after the old certificate expired")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}

	// Another process finds the renewed pair on disk.
	again := newRotator(t, dir, srv.URL)
	if err := again.Load(); err != nil {
		t.Fatal(err)
	}
	if c := again.Current(); c == nil || c.Leaf.SerialNumber.Cmp(second.Leaf.SerialNumber) != 0 {
		t.Fatal("the current pair was not read back from disk")
	}
}

func TestCSRClientDenied(t *testing.T) {
	signer := newFakeSigner(t, time.Hour)
	signer.deny = true
	srv := httptest.NewServer(signer)
	defer srv.Close()
	r := newRotator(t, t.TempDir(), srv.URL)
	if err := r.Load(); err != nil {
		t.Fatal(err)
	}
	err := r.renew(t.Context())
	if err == nil || !strings.Contains(err.Error(), "denied") {
		t.Fatalf("renew with a denied CSR: %v; want an error saying so", err)
	}
	if r.Current() != nil {
		t.Fatal("a certificate from a denied request")
	}
}

// TestOldPairsPruned: each renewal writes a new pair; only the newest and
// the one before it stay, beside the current link and files not ours.
func TestOldPairsPruned(t *testing.T) {
	dir := t.TempDir()
	r := newRotator(t, dir, "http://127.0.0.1:1")
	if err := r.Load(); err != nil {
		t.Fatal(err)
	}
	others := []string{"node-serving-2020-01-01-00-00-00.000000000.pem", "node-client-notes.pem", "2020-01-01-00-00-00.000000000.pem"}
	for _, f := range others {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	certPEM, keyPEM := selfSignedPair(t)
	var names []string
	for range 4 {
		if _, err := r.store(certPEM, keyPEM); err != nil {
			t.Fatal(err)
		}
		target, err := os.Readlink(r.CurrentPath())
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, target)
		time.Sleep(2 * time.Millisecond) // a new name each time
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	want := append([]string{names[2], names[3], "node-client-current.pem"}, others...)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("files after 4 renewals: %v; want %v", got, want)
	}
}

// selfSignedPair returns a throwaway certificate and its key, in PEM.
func selfSignedPair(t *testing.T) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "system:node:n1"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
}
