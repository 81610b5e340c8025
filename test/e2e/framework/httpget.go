package framework

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"time"
)

// GetOK sends GET url with c (nil means http.DefaultClient) and returns the
// body of a 200 answer. Any other status is an error that quotes the start
// of the body, where servers say why (/readyz lists its failed checks).
// ctx, or c's Timeout, bounds the request.
func GetOK(ctx context.Context, c *http.Client, url string) ([]byte, error) {
	if c == nil {
		c = http.DefaultClient
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", url, resp.Status, bytes.TrimSpace(body[:min(len(body), 4096)]))
	}
	if err != nil {
		return nil, fmt.Errorf("GET %s: reading the answer: %w", url, err)
	}
	return body, nil
}

// probeTimeout bounds one readiness probe of a process the framework
// starts: each answers its health endpoint in milliseconds when it is up.
const probeTimeout = 2 * time.Second

// probeOK is one readiness probe, for waitFor: nil when GET url answers 200
// within probeTimeout.
func probeOK(ctx context.Context, c *http.Client, url string) error {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	_, err := GetOK(ctx, c, url)
	return err
}
