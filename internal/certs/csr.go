package certs

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// CSRClient files CertificateSigningRequests and reads them back: the two
// calls a node makes, as JSON over HTTP. It stands in for client-go's
// clientset, whose every API group would otherwise be linked and
// registered at start (several MB of resident memory) for these two calls.
type CSRClient struct {
	// Host is the apiserver's URL (scheme and host).
	Host string
	// Transport carries the credentials (bootstrap token or node
	// certificate).
	Transport http.RoundTripper
	// UserAgent identifies outpost in the apiserver's logs.
	UserAgent string
}

const csrPath = "/apis/certificates.k8s.io/v1/certificatesigningrequests"

// maxCSRBody bounds an answer; a CSR with its certificate is a few KB.
const maxCSRBody = 1 << 20

func (c *CSRClient) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(c.Host, "/")+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.UserAgent != "" {
		req.Header.Set("User-Agent", c.UserAgent)
	}
	resp, err := (&http.Client{Transport: c.Transport}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxCSRBody))
	if err != nil {
		return fmt.Errorf("%s %s: reading the answer: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		var st metav1.Status
		if json.Unmarshal(data, &st) == nil && st.Message != "" {
			return fmt.Errorf("%s %s: %s (%d)", method, path, st.Message, resp.StatusCode)
		}
		return fmt.Errorf("%s %s: %s", method, path, resp.Status)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s %s: decoding the answer: %w", method, path, err)
	}
	return nil
}

// Create files csr and returns it as stored (with its name and UID).
func (c *CSRClient) Create(ctx context.Context, csr *certificatesv1.CertificateSigningRequest) (*certificatesv1.CertificateSigningRequest, error) {
	csr.APIVersion, csr.Kind = "certificates.k8s.io/v1", "CertificateSigningRequest"
	out := &certificatesv1.CertificateSigningRequest{}
	return out, c.do(ctx, http.MethodPost, csrPath, csr, out)
}

// Get reads CSR name.
func (c *CSRClient) Get(ctx context.Context, name string) (*certificatesv1.CertificateSigningRequest, error) {
	out := &certificatesv1.CertificateSigningRequest{}
	return out, c.do(ctx, http.MethodGet, csrPath+"/"+name, nil, out)
}

// Wait polls CSR name (of uid) every interval until it is signed, and
// returns the certificate (PEM). A denied or failed request is an error.
// A node may read its own CSRs (the system:node-bootstrapper and
// selfnodeclient roles), not necessarily list or watch them all.
func (c *CSRClient) Wait(ctx context.Context, name string, uid string, interval time.Duration) ([]byte, error) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var lastErr error
	for {
		csr, err := c.Get(ctx, name)
		switch {
		case err != nil:
			lastErr = err
		case string(csr.UID) != uid:
			return nil, fmt.Errorf("CSR %s was replaced by another of the same name", name)
		default:
			for _, cond := range csr.Status.Conditions {
				switch cond.Type {
				case certificatesv1.CertificateDenied:
					return nil, fmt.Errorf("CSR %s was denied: %s %s", name, cond.Reason, cond.Message)
				case certificatesv1.CertificateFailed:
					return nil, fmt.Errorf("CSR %s failed: %s %s", name, cond.Reason, cond.Message)
				}
			}
			if len(csr.Status.Certificate) > 0 {
				return csr.Status.Certificate, nil
			}
		}
		select {
		case <-ctx.Done():
			if lastErr != nil {
				return nil, fmt.Errorf("waiting for CSR %s: %w (last error: %v)", name, ctx.Err(), lastErr)
			}
			return nil, fmt.Errorf("waiting for CSR %s to be approved and signed: %w", name, ctx.Err())
		case <-t.C:
		}
	}
}
