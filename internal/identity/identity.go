// Package identity authenticates outpost's local callers. It decides whose
// credentials a request travels with: this node's own (only for a caller
// proving it is this node), or the caller's bearer token as it is. Outpost
// never forwards a request with the node's credentials for a caller it has
// not authenticated (the hole in YurtHub's plain-HTTP port and its
// User-Agent-keyed cache).
package identity

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/status"
)

// Reviewer asks the apiserver who a bearer token belongs to (a
// SelfSubjectReview made with that token). ok is false when the apiserver
// rejected the token.
type Reviewer func(ctx context.Context, token string) (user string, groups []string, ok bool, err error)

// Authenticator authenticates callers of the secure port. Set the exported
// fields before the first call (ServiceAccounts may be stored at any time);
// it is then safe for concurrent use.
type Authenticator struct {
	// NodeName is this node; only the client certificate of
	// system:node:<NodeName> is served with the node's credentials.
	NodeName string
	// ClientCAs verifies client certificates. Required for certificate
	// callers; nil rejects every certificate.
	ClientCAs *x509.CertPool
	// Review learns who a token belongs to. Nil: tokens are forwarded with
	// their hash as the only identity.
	Review Reviewer
	// TokenTTL is how long a learned token identity is trusted before it
	// is reviewed again. Default 10 minutes.
	TokenTTL time.Duration
	// Remember, if set, persists an identity the apiserver confirmed, by
	// token hash, until expires, so that it survives a restart of outpost
	// while the cloud is unreachable.
	Remember func(hash string, id request.Identity, expires time.Time)
	// Recall reads back what Remember stored. It is consulted only when the
	// apiserver cannot be asked.
	Recall func(hash string) (id request.Identity, expires time.Time, ok bool)
	// Seen, if set, is told of every token call whose user is known, so
	// that the hub can re-list that caller's views with its own token after
	// a reconnect. The token stays in memory only.
	Seen func(user, token string)
	// Online reports whether the apiserver can judge tokens. Offline, a
	// token is accepted only if it was confirmed online and has not
	// expired, or if ServiceAccounts verifies it; anything else gets 401.
	// Nil: always online.
	Online func() bool
	// ServiceAccounts is the cluster's service-account token issuer. Offline,
	// a token never confirmed online is accepted if it verifies against it,
	// as the service account it names. The hub stores a new Issuer whenever
	// it fetches the published keys again. Until one is stored, such tokens
	// get 401 offline.
	ServiceAccounts atomic.Pointer[Issuer]

	mu     sync.RWMutex // guards the fields below
	certs  map[[32]byte]certEntry
	tokens map[string]tokenEntry // by the token itself; memory only

	flight singleflight.Group
}

type certEntry struct {
	id      request.Identity
	err     error
	expires time.Time
}

type tokenEntry struct {
	id      request.Identity
	expires time.Time
}

// maxEntries bounds each memo; past it the memo is emptied (cheap, and only
// costs a re-verification).
const maxEntries = 4096

// negativeTTL is how long a token the apiserver rejected, or that could not
// be reviewed, is remembered as such before trying again.
const negativeTTL = 10 * time.Second

// NodeUser is the Kubernetes user of node name.
func NodeUser(node string) string { return "system:node:" + node }

// Node returns the identity of this node's kubelet, as used for callers of
// the insecure port.
func (a *Authenticator) Node() request.Identity {
	return request.Identity{Kind: request.NodeCert, User: NodeUser(a.NodeName), Groups: []string{"system:nodes", "system:authenticated"}}
}

// Authenticate returns who sent r, or a Status error: 401 without a usable
// credential, 403 for a valid certificate of anyone but this node.
func (a *Authenticator) Authenticate(r *http.Request) (request.Identity, error) {
	token, hasToken := bearer(r)
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		id, err := a.certificate(r.TLS.PeerCertificates)
		// A certificate that proves nothing (not the cluster CA's) leaves
		// the token to judge, as kube-apiserver's authenticators do.
		if !hasToken || !apierrors.IsUnauthorized(err) {
			return id, err
		}
	}
	if hasToken {
		id := a.token(r.Context(), token)
		if a.Online != nil && !a.Online() {
			var err error
			if id, err = a.offline(id, token, time.Now()); err != nil {
				return request.Identity{}, err
			}
		}
		if a.Seen != nil && id.User != "" {
			a.Seen(id.User, token)
		}
		return id, nil
	}
	return request.Identity{}, status.Unauthorized("outpost: no client certificate and no bearer token")
}

// offline judges a token while the apiserver cannot: id is what outpost
// knows of it.
func (a *Authenticator) offline(id request.Identity, token string, now time.Time) (request.Identity, error) {
	if id.User != "" {
		if exp := tokenExpiry(token, now); !now.Before(exp) {
			return request.Identity{}, status.Unauthorized("outpost: the cloud is unreachable and this token has expired")
		}
		return id, nil
	}
	sa, err := a.verifyServiceAccount(token, now)
	if err != nil {
		return request.Identity{}, status.Unauthorized(fmt.Sprintf("outpost: the cloud is unreachable and this token was never confirmed online; %v", err))
	}
	sa.Token = token
	return sa, nil
}

func (a *Authenticator) verifyServiceAccount(token string, now time.Time) (request.Identity, error) {
	issuer := a.ServiceAccounts.Load()
	if issuer == nil {
		return request.Identity{}, errors.New("the cluster's service-account keys are not known, so it cannot be accepted")
	}
	sa, err := issuer.Verify(token, now)
	if err != nil {
		return request.Identity{}, fmt.Errorf("it is not a valid service-account token of this cluster: %w", err)
	}
	return sa, nil
}

func bearer(r *http.Request) (string, bool) {
	h := r.Header.Get("Authorization")
	scheme, token, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "bearer") {
		return "", false
	}
	token = strings.TrimSpace(token)
	return token, token != ""
}

func (a *Authenticator) certificate(chain []*x509.Certificate) (request.Identity, error) {
	leaf := chain[0]
	key := sha256.Sum256(leaf.Raw)
	now := time.Now()
	a.mu.RLock()
	e, ok := a.certs[key]
	a.mu.RUnlock()
	if ok && now.Before(e.expires) {
		return e.id, e.err
	}

	e = a.verify(chain, now)
	a.mu.Lock()
	if a.certs == nil || len(a.certs) >= maxEntries {
		a.certs = make(map[[32]byte]certEntry)
	}
	a.certs[key] = e
	a.mu.Unlock()
	return e.id, e.err
}

func (a *Authenticator) verify(chain []*x509.Certificate, now time.Time) certEntry {
	leaf := chain[0]
	expires := now.Add(10 * time.Minute)
	if leaf.NotAfter.Before(expires) {
		expires = leaf.NotAfter
	}
	if a.ClientCAs == nil {
		return certEntry{err: status.Unauthorized("outpost: client certificates are not accepted (no client CA configured)"), expires: expires}
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots: a.ClientCAs, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return certEntry{err: status.Unauthorized(fmt.Sprintf("outpost: client certificate %q is not valid for the cluster CA: %v", leaf.Subject.CommonName, err)), expires: expires}
	}
	want := NodeUser(a.NodeName)
	if leaf.Subject.CommonName != want || !slices.Contains(leaf.Subject.Organization, "system:nodes") {
		return certEntry{err: status.Forbidden(fmt.Sprintf(
			"outpost: the client certificate of %q (groups %v) is valid, but outpost serves certificates only of this node (CN=%s, O=system:nodes); other callers must use a bearer token",
			leaf.Subject.CommonName, leaf.Subject.Organization, want)), expires: expires}
	}
	return certEntry{id: a.Node(), expires: expires}
}

// TokenHash is how a token is known without keeping it (as
// request.Identity.TokenHash): hex SHA-256.
func TokenHash(token string) string { return tokenHash(token) }

func tokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

func (a *Authenticator) token(ctx context.Context, token string) request.Identity {
	// The memo is keyed by the token itself (it is in memory anyway, in
	// the request): hashing every request's token cost 5-8% of outpost's
	// CPU under load. The hash is computed only to learn or recall.
	now := time.Now()
	a.mu.RLock()
	e, ok := a.tokens[token]
	a.mu.RUnlock()
	if !ok || !now.Before(e.expires) {
		v, _, _ := a.flight.Do(token, func() (any, error) {
			return a.learn(context.WithoutCancel(ctx), token, tokenHash(token)), nil
		})
		e = v.(tokenEntry)
	}
	id := e.id
	id.Token = token
	return id
}

// learn asks the apiserver who the token belongs to. The request is then
// forwarded whatever the answer: the apiserver remains the judge.
func (a *Authenticator) learn(ctx context.Context, token, hash string) tokenEntry {
	id := request.Identity{Kind: request.BearerToken, TokenHash: hash}
	now := time.Now()
	if a.Review == nil {
		return a.remember(token, tokenEntry{id: id, expires: now.Add(a.ttl())})
	}
	var (
		user   string
		groups []string
		ok     bool
		err    error
	)
	if a.Online != nil && !a.Online() {
		// Offline, a review would only wait for its timeout, holding up
		// every request with this token each time its memo expires.
		err = errOffline
	} else {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		user, groups, ok, err = a.Review(ctx, token)
	}
	if err != nil && a.Recall != nil {
		// The apiserver cannot be asked: a token it confirmed before, and
		// that has not expired, is still who it was.
		if known, expires, found := a.Recall(hash); found && now.Before(expires) {
			known.Kind, known.TokenHash = request.BearerToken, hash
			// Trusted for a short while, then recalled (or reviewed) again.
			until := now.Add(negativeTTL)
			if expires.Before(until) {
				until = expires
			}
			return a.remember(token, tokenEntry{id: known, expires: until})
		}
	}
	if err != nil {
		// Nor a token the cluster's issuer signed? The apiserver still
		// judges the request if it gets there; the identity only decides
		// whose views may answer it from the cache.
		if sa, verr := a.verifyServiceAccount(token, now); verr == nil {
			return a.remember(token, tokenEntry{id: sa, expires: now.Add(negativeTTL)})
		}
	}
	if err != nil || !ok {
		return a.remember(token, tokenEntry{id: id, expires: now.Add(negativeTTL)})
	}
	id.User, id.Groups = user, groups
	if a.Remember != nil {
		a.Remember(hash, id, tokenExpiry(token, now))
	}
	return a.remember(token, tokenEntry{id: id, expires: now.Add(a.ttl())})
}

// errOffline is why a token is not reviewed while the cloud is unreachable.
var errOffline = errors.New("the cloud is unreachable")

// maxRemembered bounds how long an identity is trusted offline for a token
// whose expiry cannot be read (not a JWT).
const maxRemembered = 24 * time.Hour

// tokenExpiry reads the exp claim of a JWT (service-account tokens are
// JWTs). The signature is not checked here: the apiserver has just
// accepted this very token. Tokens that are not JWTs get maxRemembered.
func tokenExpiry(token string, now time.Time) time.Time {
	limit := now.Add(maxRemembered)
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return limit
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return limit
	}
	var claims struct {
		Exp int64 `json:"exp"`
	}
	if json.Unmarshal(payload, &claims) != nil || claims.Exp == 0 {
		return limit
	}
	if exp := time.Unix(claims.Exp, 0); exp.Before(limit) {
		return exp
	}
	return limit
}

func (a *Authenticator) remember(token string, e tokenEntry) tokenEntry {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.tokens == nil || len(a.tokens) >= maxEntries {
		a.tokens = make(map[string]tokenEntry)
	}
	a.tokens[token] = e
	return e
}

func (a *Authenticator) ttl() time.Duration {
	if a.TokenTTL > 0 {
		return a.TokenTTL
	}
	return 10 * time.Minute
}
