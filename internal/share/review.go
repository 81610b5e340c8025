package share

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// reviewKey is one question to the apiserver: may this user, with this
// token (or certificate), use this verb on this scope. A token's own
// answer: a token the apiserver no longer accepts must not live on
// through another token of the same user.
type reviewKey struct {
	user, token string
	verb        string
	scope       store.ViewKey
}

// review is the apiserver's answer to one question, shared by the
// requests that asked it at once.
type review struct {
	done    chan struct{} // closed once answered
	verdict verdict
	at      time.Time // when it was asked
}

// errUnauthenticated: the apiserver answered a review 401.
var errUnauthenticated = errors.New("credentials not accepted (401)")

// reviewTimeout bounds one access review.
const reviewTimeout = 10 * time.Second

// A verdict is the apiserver's answer to an access review, or that none
// came (the link is down, the review failed, the caller left).
type verdict int

const (
	unknown verdict = iota
	allowed
	denied
	// rejected: the apiserver no longer accepts this credential (401).
	// It reads nothing, but the user's other credentials may: its grants
	// and others' answers stand.
	rejected
)

// admitted asks whether the apiserver lets info's caller do what it asks
// (list or watch its scope, with its selectors), asking it with the
// caller's own credentials (a SelfSubjectAccessReview) at most once per
// Recheck for each token (or certificate), verb and scope. Only allowed
// serves a request; only denied takes back what was allowed (grants, a
// watch being served): an answer that did not come says nothing.
func (c *Cache) admitted(ctx context.Context, info *request.Info, maxAge time.Duration) verdict {
	verb := "list"
	if info.Watch {
		verb = "watch"
	}
	return c.admittedVerb(ctx, info, verb, maxAge)
}

// admittedVerb is admitted for verb, with an answer at most maxAge old.
func (c *Cache) admittedVerb(ctx context.Context, info *request.Info, verb string, maxAge time.Duration) verdict {
	k := reviewKey{user: info.Identity.Key(), token: info.Identity.TokenHash, verb: verb, scope: scopeOf(info)}
	c.mu.Lock()
	rv := c.reviews[k]
	ask := false
	if rv == nil || (isClosed(rv.done) && time.Since(rv.at) > maxAge) {
		rv = &review{done: make(chan struct{}), at: time.Now()}
		c.keepReview(k, rv)
		ask = true
		c.pruneReviews()
	}
	base := c.ctx
	c.mu.Unlock()
	if ask {
		// Not the request's own context: others wait for this answer.
		// Its age counts from when it was asked, so a revoke is seen
		// within maxAge of it.
		rctx, cancel := context.WithTimeout(base, reviewTimeout)
		ok, err := c.review(rctx, info, verb)
		cancel()
		result := "allowed"
		switch {
		case errors.Is(err, errUnauthenticated):
			result = "denied"
			rv.verdict = rejected
		case err != nil:
			result = "error"
			c.Log.Debug("watch cache: access review failed", "identity", info.Identity.Key(), "verb", verb, "scope", describe(k.scope), "err", err)
			// Not kept: the next request asks again.
			c.mu.Lock()
			if c.reviews[k] == rv {
				c.dropReview(k)
			}
			c.mu.Unlock()
			rv.verdict = unknown
		case ok:
			rv.verdict = allowed
		default:
			result = "denied"
			rv.verdict = denied
			c.denyOthers(k)
		}
		if c.Metrics != nil {
			c.Metrics.WatchCacheReviews.WithLabelValues(result).Inc()
		}
		close(rv.done)
	}
	select {
	case <-rv.done:
		return rv.verdict
	case <-ctx.Done():
		return unknown
	}
}

// denyOthers forgets the answers kept for k's user and scope but for other
// verbs or tokens: after a no, a yes asked before it must not serve (and
// grant) again until asked again.
func (c *Cache) denyOthers(k reviewKey) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dropAnswers(k.user, k.scope, k)
}

// dropAnswers forgets the answers kept for user and scope, but except's;
// one still being asked is asked now, and stays. c.mu is held.
func (c *Cache) dropAnswers(user string, scope store.ViewKey, except reviewKey) {
	for k, rv := range c.answers[grantKey{user, scope}] {
		if k != except && isClosed(rv.done) {
			c.dropReview(k)
		}
	}
}

// keepReview keeps rv as the answer to k; c.mu is held.
func (c *Cache) keepReview(k reviewKey, rv *review) {
	c.reviews[k] = rv
	by := c.answers[grantKey{k.user, k.scope}]
	if by == nil {
		by = map[reviewKey]*review{}
		c.answers[grantKey{k.user, k.scope}] = by
	}
	by[k] = rv
}

// dropReview forgets the answer to k; c.mu is held.
func (c *Cache) dropReview(k reviewKey) {
	delete(c.reviews, k)
	gk := grantKey{k.user, k.scope}
	if by := c.answers[gk]; by != nil {
		delete(by, k)
		if len(by) == 0 {
			delete(c.answers, gk)
		}
	}
}

// pruneReviews forgets answers long expired, at most once a Recheck (a
// scan of every answer); c.mu is held.
func (c *Cache) pruneReviews() {
	if len(c.reviews) < 1024 || time.Since(c.pruned) < c.Recheck {
		return
	}
	c.pruned = time.Now()
	for k, rv := range c.reviews {
		if isClosed(rv.done) && time.Since(rv.at) > 2*c.Recheck {
			c.dropReview(k)
		}
	}
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// review asks the apiserver, as info's caller, whether it may use verb on
// the scope info asks for.
func (c *Cache) review(ctx context.Context, info *request.Info, verb string) (bool, error) {
	return c.reviewAs(ctx, c.As(info.Identity), info, verb)
}

// reviewAs is review, sending with rt.
func (c *Cache) reviewAs(ctx context.Context, rt http.RoundTripper, info *request.Info, verb string) (bool, error) {
	attrs := &authorizationv1.ResourceAttributes{
		Namespace: info.Namespace,
		Verb:      verb,
		Group:     info.APIGroup,
		Version:   info.APIVersion,
		Resource:  info.Resource,
	}
	if info.LabelSelector != "" {
		attrs.LabelSelector = &authorizationv1.LabelSelectorAttributes{RawSelector: info.LabelSelector}
	}
	if info.FieldSelector != "" {
		attrs.FieldSelector = &authorizationv1.FieldSelectorAttributes{RawSelector: info.FieldSelector}
		// The apiserver names the object of a list or watch selected by
		// metadata.name to its authorizers (the Node authorizer lets a
		// node read its pods' ConfigMaps that way): so does the review.
		if name, ok := info.Fields.RequiresExactMatch("metadata.name"); ok {
			attrs.Name = name
		}
	}
	body, err := json.Marshal(&authorizationv1.SelfSubjectAccessReview{
		TypeMeta: metaTypeSSAR,
		Spec:     authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: attrs},
	})
	if err != nil {
		return false, err
	}
	r, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://upstream/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("Accept", "application/json")
	resp, err := rt.RoundTrip(r)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return false, err
	}
	if resp.StatusCode == http.StatusUnauthorized {
		// The apiserver no longer accepts these credentials (an expired
		// or revoked token): they may read nothing.
		return false, errUnauthenticated
	}
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return false, fmt.Errorf("SelfSubjectAccessReview: %s", resp.Status)
	}
	var out authorizationv1.SelfSubjectAccessReview
	if err := json.Unmarshal(raw, &out); err != nil {
		return false, fmt.Errorf("SelfSubjectAccessReview: %w", err)
	}
	return out.Status.Allowed && !out.Status.Denied, nil
}

var metaTypeSSAR = metav1.TypeMeta{APIVersion: "authorization.k8s.io/v1", Kind: "SelfSubjectAccessReview"}
