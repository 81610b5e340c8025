package identity

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// IssuerKeeper keeps the cluster's service-account issuer: the two OIDC
// discovery documents kube-apiserver publishes, fetched while online and
// kept in the store, so that offline (even after a restart offline) the
// authenticator can verify service-account tokens it never saw online
// (Issuer). Set the fields, call Load before serving, then Run.
type IssuerKeeper struct {
	Store *store.Store
	// Auth receives the issuer (its ServiceAccounts).
	Auth *Authenticator
	// Upstream sends requests of outpost's own as an identity
	// (upstream.Pool.As); Node is this node's.
	Upstream func(request.Identity) http.RoundTripper
	Node     request.Identity
	// Tokens returns the token each user last called with (Tokens.All):
	// by default only service accounts may read the documents.
	Tokens func() map[string]string
	// Audiences a never-seen token must carry (--api-audiences).
	Audiences []string
	// Online and Changed are the online/offline state.
	Online  func() bool
	Changed func() <-chan struct{}
	Log     *slog.Logger
}

const (
	issuerConfigPath = "/.well-known/openid-configuration"
	issuerKeysPath   = "/openid/v1/jwks"
	issuerConfigDoc  = "issuer\x00openid-configuration"
	issuerKeysDoc    = "issuer\x00jwks"

	// issuerRefresh is how often the documents are fetched again while
	// online (keys rotate rarely; a reconnect fetches them at once too).
	issuerRefresh = 10 * time.Minute
	// issuerRetry is the wait after a failed fetch.
	issuerRetry = time.Minute
	// issuerPoll is how often, while the node may not read the documents,
	// outpost looks for a service-account token it has not tried yet.
	issuerPoll = time.Second
	// maxIssuerDoc bounds each document; the apiserver's are a few hundred
	// bytes per key.
	maxIssuerDoc = 1 << 20
)

var (
	// errIssuerDenied: the apiserver answered 401 or 403 for a document.
	errIssuerDenied = errors.New("not allowed to read it")
	// errNoIssuerReader: neither the node nor a service account whose token
	// outpost holds may read the documents.
	errNoIssuerReader = errors.New("neither this node nor a service account seen lately may read the service-account issuer's documents")
)

// Load gives the authenticator the issuer kept in the store, if any.
func (k *IssuerKeeper) Load() {
	_, cfg, ok, err := k.Store.Doc(issuerConfigDoc)
	if err != nil || !ok {
		return
	}
	_, keys, ok, err := k.Store.Doc(issuerKeysDoc)
	if err != nil || !ok {
		return
	}
	iss, err := NewIssuer(cfg, keys, k.Audiences)
	if err != nil {
		k.Log.Warn("the service-account issuer kept in the cache is not usable; it is fetched again once online", "err", err)
		return
	}
	k.Auth.ServiceAccounts.Store(iss)
	k.Log.Info("service-account issuer loaded from the cache", "issuer", iss.URL(), "keys", iss.Keys())
}

// Run keeps the service-account issuer fresh until ctx ends: it
// fetches the documents whenever the cloud becomes reachable, then every
// issuerRefresh, after a failure every issuerRetry, and as soon as a new
// service-account token is seen when only such a token may read them.
func (k *IssuerKeeper) Run(ctx context.Context) error {
	tick := time.NewTicker(issuerPoll)
	defer tick.Stop()
	var (
		due     time.Time           // next fetch; zero: as soon as online
		logged  string              // the failure last logged: one line per failure, not per retry
		tried   = map[string]bool{} // service-account tokens refused since the last success
		waiting bool                // the last fetch failed for want of a token allowed to read
	)
	for {
		changed := k.Changed()
		if k.Online() && (!time.Now().Before(due) || waiting && k.untriedToken(tried) != "") {
			err := k.refreshIssuer(ctx, tried)
			if ctx.Err() != nil {
				return nil
			}
			if err == nil {
				due, logged, waiting = time.Now().Add(issuerRefresh), "", false
				clear(tried)
			} else {
				due, waiting = time.Now().Add(issuerRetry), errors.Is(err, errNoIssuerReader)
				if err.Error() != logged {
					logged = err.Error()
					k.Log.Warn("cannot fetch the service-account issuer's keys; offline, service-account tokens never seen online are verified only with keys fetched before",
						"holding", k.Auth.ServiceAccounts.Load() != nil, "err", err)
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			due = time.Time{} // fetched again as soon as the cloud is back
		case <-tick.C:
		}
	}
}

// refreshIssuer fetches both documents, gives the authenticator the issuer
// they describe and keeps them in the store (in one transaction, so a
// crash never pairs a configuration with another fetch's keys).
func (k *IssuerKeeper) refreshIssuer(ctx context.Context, tried map[string]bool) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	cfg, keys, err := k.fetchIssuer(ctx, tried)
	if err != nil {
		return err
	}
	iss, err := NewIssuer(cfg, keys, k.Audiences)
	if err != nil {
		return fmt.Errorf("service-account issuer: %w", err)
	}
	k.Auth.ServiceAccounts.Store(iss)

	_, oldCfg, _, _ := k.Store.Doc(issuerConfigDoc)
	_, oldKeys, _, _ := k.Store.Doc(issuerKeysDoc)
	if bytes.Equal(oldCfg, cfg) && bytes.Equal(oldKeys, keys) {
		return nil
	}
	err = k.Store.Update(func(tx *store.Tx) error {
		if err := tx.PutDoc(issuerConfigDoc, "application/json", cfg); err != nil {
			return err
		}
		return tx.PutDoc(issuerKeysDoc, "application/json", keys)
	})
	if err != nil {
		return fmt.Errorf("keeping the service-account issuer's keys: %w", err)
	}
	k.Log.Info("service-account issuer keys fetched", "issuer", iss.URL(), "keys", iss.Keys())
	return nil
}

// fetchIssuer reads the two documents as the node, or, when the node may
// not (by default only the group system:serviceaccounts may, through the
// ClusterRoleBinding system:service-account-issuer-discovery), with the
// token of a service account seen recently. Both are read with the same
// credentials.
func (k *IssuerKeeper) fetchIssuer(ctx context.Context, tried map[string]bool) (cfg, keys []byte, err error) {
	token := ""
	cfg, err = k.issuerDoc(ctx, issuerConfigPath, "")
	if errors.Is(err, errIssuerDenied) {
		nodeErr := err
		// A few tokens per round; the next ones are tried at the next poll.
		for range 3 {
			if token = k.untriedToken(tried); token == "" {
				break
			}
			if cfg, err = k.issuerDoc(ctx, issuerConfigPath, token); !errors.Is(err, errIssuerDenied) {
				break
			}
			tried[token] = true
		}
		if token == "" || errors.Is(err, errIssuerDenied) {
			return nil, nil, fmt.Errorf("%w (as the node: %v)", errNoIssuerReader, nodeErr)
		}
	}
	if err != nil {
		return nil, nil, err
	}
	if keys, err = k.issuerDoc(ctx, issuerKeysPath, token); err != nil {
		return nil, nil, err
	}
	return cfg, keys, nil
}

// issuerDoc GETs one document upstream, as the node when token is empty.
func (k *IssuerKeeper) issuerDoc(ctx context.Context, path, token string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://upstream"+path, nil)
	if err != nil {
		return nil, err
	}
	// The JWKS comes as application/jwk-set+json, and a narrower Accept
	// gets 406.
	req.Header.Set("Accept", "application/json, application/jwk-set+json")
	id := k.Node
	if token != "" {
		id = request.Identity{Kind: request.BearerToken, Token: token}
	}
	resp, err := k.Upstream(id).RoundTrip(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxIssuerDoc+1))
	switch {
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		return nil, fmt.Errorf("GET %s: %w (%s)", path, errIssuerDenied, resp.Status)
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("GET %s answered %s", path, resp.Status)
	case err != nil:
		return nil, fmt.Errorf("reading %s: %w", path, err)
	case len(body) > maxIssuerDoc:
		return nil, fmt.Errorf("%s is larger than %d bytes", path, maxIssuerDoc)
	}
	return body, nil
}

// untriedToken returns the token of a service account seen recently that
// is not in tried, or "".
func (k *IssuerKeeper) untriedToken(tried map[string]bool) string {
	for user, token := range k.Tokens() {
		if strings.HasPrefix(user, "system:serviceaccount:") && !tried[token] {
			return token
		}
	}
	return ""
}
