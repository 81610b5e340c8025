package identity

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
)

// ReviewThrough returns the Reviewer that asks the apiserver, through
// upstream as the token's own caller (see upstream.Pool.As), with a
// SelfSubjectReview: the one request every authenticated user may make.
func ReviewThrough(upstream func(token string) http.RoundTripper) Reviewer {
	return func(ctx context.Context, token string) (string, []string, bool, error) {
		body := `{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://upstream/apis/authentication.k8s.io/v1/selfsubjectreviews", strings.NewReader(body))
		if err != nil {
			return "", nil, false, err
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json")
		resp, err := upstream(token).RoundTrip(req)
		if err != nil {
			return "", nil, false, err
		}
		defer resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusCreated, http.StatusOK:
		case http.StatusUnauthorized:
			return "", nil, false, nil
		default:
			return "", nil, false, fmt.Errorf("selfsubjectreview answered %s", resp.Status)
		}
		var out struct {
			Status struct {
				UserInfo struct {
					Username string   `json:"username"`
					Groups   []string `json:"groups"`
				} `json:"userInfo"`
			} `json:"status"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
			return "", nil, false, fmt.Errorf("decoding selfsubjectreview: %w", err)
		}
		return out.Status.UserInfo.Username, out.Status.UserInfo.Groups, true, nil
	}
}
