package webhook

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

const (
	testCAValidity   = 300 * 24 * time.Hour
	testCertValidity = 30 * 24 * time.Hour
)

func webhookConfig() *admissionregistrationv1.MutatingWebhookConfiguration {
	return &admissionregistrationv1.MutatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: "outpost-controller", ResourceVersion: "1"},
		Webhooks: []admissionregistrationv1.MutatingWebhook{
			{Name: "pods.example.com", ClientConfig: admissionregistrationv1.WebhookClientConfig{URL: new("https://127.0.0.1:1/pods")}},
			{Name: "slices.example.com", ClientConfig: admissionregistrationv1.WebhookClientConfig{CABundle: []byte("stale")}},
		},
	}
}

// replica is one controller replica's Certs, on a shared fake clock.
func replica(client *fake.Clientset, now *time.Time) *Certs {
	return &Certs{
		Client:       client,
		Namespace:    "outpost-system",
		SecretName:   "ca",
		ConfigName:   "outpost-controller",
		Hosts:        []string{"outpost-controller.outpost-system.svc", "127.0.0.1"},
		CAValidity:   testCAValidity,
		CertValidity: testCertValidity,
		Logger:       slog.New(slog.DiscardHandler),
		Now:          func() time.Time { return *now },
	}
}

// bundleOf returns the CA bundle of every webhook, failing if they differ.
func bundleOf(t *testing.T, client *fake.Clientset) []byte {
	t.Helper()
	cfg, err := client.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(t.Context(), "outpost-controller", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	b := cfg.Webhooks[0].ClientConfig.CABundle
	for _, wh := range cfg.Webhooks[1:] {
		if !bytes.Equal(wh.ClientConfig.CABundle, b) {
			t.Fatalf("webhooks have different bundles")
		}
	}
	return b
}

func countCerts(bundle []byte) int {
	n := 0
	for {
		var b *pem.Block
		if b, bundle = pem.Decode(bundle); b == nil {
			return n
		}
		n++
	}
}

// verify checks that c's serving certificate is trusted by bundle at now,
// for both of its hosts.
func verify(t *testing.T, c *Certs, bundle []byte, now time.Time) {
	t.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(bundle) {
		t.Fatal("empty bundle")
	}
	cert, err := c.GetCertificate(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, host := range c.Hosts {
		if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: host, CurrentTime: now}); err != nil {
			t.Errorf("serving certificate for %s: %v", host, err)
		}
	}
}

func TestCertsRotation(t *testing.T) {
	ctx := t.Context()
	client := fake.NewClientset(webhookConfig())
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	a, b := replica(client, &now), replica(client, &now)

	if a.Ready() {
		t.Fatal("ready before the first sync")
	}
	if _, err := a.GetCertificate(nil); err == nil {
		t.Fatal("certificate before the first sync")
	}
	sync := func(c *Certs) {
		t.Helper()
		if err := c.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	sync(a)
	sync(b)
	bundle := bundleOf(t, client)
	if n := countCerts(bundle); n != 1 {
		t.Fatalf("bundle has %d certificates, want 1", n)
	}
	verify(t, a, bundle, now)
	verify(t, b, bundle, now) // the second replica uses the same CA
	if !a.Ready() || a.NotAfter().IsZero() {
		t.Fatal("not ready after sync")
	}

	// Serving certificates are renewed with a third of their life left.
	first := a.NotAfter()
	now = now.Add(testCertValidity / 2)
	sync(a)
	if a.NotAfter() != first {
		t.Error("renewed too early")
	}
	now = now.Add(testCertValidity / 4)
	sync(a)
	if !a.NotAfter().After(first) {
		t.Error("not renewed with less than a third left")
	}

	// The CA is rotated with a third of its life left (day 200 of 300);
	// the old CA stays in the bundle, so b's certificate from it is still
	// trusted until b moves over.
	day := func(n int) time.Time {
		return time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(n) * 24 * time.Hour)
	}
	now = day(195)
	sync(a)
	sync(b)
	if n := countCerts(bundleOf(t, client)); n != 1 {
		t.Fatalf("rotated too early")
	}
	bOld, _ := b.GetCertificate(nil)
	now = day(205)
	sync(a)
	bundle = bundleOf(t, client)
	if n := countCerts(bundle); n != 2 {
		t.Fatalf("bundle has %d certificates after rotation, want 2", n)
	}
	verify(t, a, bundle, now)
	verify(t, b, bundle, now)
	sync(b)
	if bNew, _ := b.GetCertificate(nil); bNew == bOld {
		t.Error("b kept a certificate from the old CA")
	}
	verify(t, b, bundle, now)

	// Once the old CA has expired it leaves the bundle.
	now = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).Add(testCAValidity + time.Hour)
	sync(a)
	if n := countCerts(bundleOf(t, client)); n != 1 {
		t.Fatalf("bundle has %d certificates after the old CA expired, want 1", n)
	}
}

// TestCertsServeTLS serves HTTPS with GetCertificate and checks that a
// client trusting only the bundle connects, as the apiserver will.
func TestCertsServeTLS(t *testing.T) {
	client := fake.NewClientset(webhookConfig())
	now := time.Now()
	c := replica(client, &now)
	c.Now = nil
	if err := c.Sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	// Not httptest: its StartTLS installs a certificate of its own, which
	// crypto/tls prefers to GetCertificate when the client sends no SNI.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler:   http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}),
		TLSConfig: &tls.Config{GetCertificate: c.GetCertificate},
	}
	go srv.ServeTLS(ln, "", "")
	defer srv.Close()

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(bundleOf(t, client))
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := hc.Get("https://" + ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
}

// TestCertsMissingConfig: without its webhook configuration the replica
// still gets a certificate, and the error says what is missing.
func TestCertsMissingConfig(t *testing.T) {
	client := fake.NewClientset()
	now := time.Now()
	c := replica(client, &now)
	err := c.Sync(context.Background())
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("outpost-controller")) {
		t.Errorf("err = %v, want one naming the configuration", err)
	}
	if !c.Ready() {
		t.Error("no certificate")
	}
}

// TestCertsCorruptSecret: an unreadable CA is replaced.
func TestCertsCorruptSecret(t *testing.T) {
	client := fake.NewClientset(webhookConfig())
	now := time.Now()
	c := replica(client, &now)
	if err := c.Sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	s, _ := client.CoreV1().Secrets("outpost-system").Get(t.Context(), "ca", metav1.GetOptions{})
	s.Data[SecretCAKey] = []byte("garbage")
	if _, err := client.CoreV1().Secrets("outpost-system").Update(t.Context(), s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.Sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	verify(t, c, bundleOf(t, client), now)
}
