package share

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// withToken sends as the identity's own token, as the pool does.
type withToken struct {
	rt    http.RoundTripper
	token string
}

func (w withToken) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+w.token)
	return w.rt.RoundTrip(r)
}

// newTokenCache is newTestCache sending each identity's own token: tokens
// maps an identity's key to the token outpost holds for it now.
func newTokenCache(t *testing.T, api *fakeAPIServer, tokens map[string]string) *Cache {
	t.Helper()
	var mu sync.Mutex
	c := newTestCache(t, api)
	c.As = func(id request.Identity) http.RoundTripper { return withToken{api, id.Token} }
	c.UpstreamAs = func(key string) http.RoundTripper {
		mu.Lock()
		defer mu.Unlock()
		return withToken{api, tokens[key]}
	}
	c.Credential = func(key string) string {
		mu.Lock()
		defer mu.Unlock()
		return "hash-" + tokens[key]
	}
	return c
}

func caller(user, token string) request.Identity {
	return request.Identity{Kind: request.BearerToken, User: user, Token: token, TokenHash: "hash-" + token}
}

// ask sends target to c as id, within d, and reports whether the watch
// cache answered it.
func ask(t *testing.T, c *Cache, id request.Identity, target string, header http.Header) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	r := httptest.NewRequest("GET", target, nil).WithContext(ctx)
	r.Header.Set("Accept", "application/json")
	for k, v := range header {
		r.Header[k] = v
	}
	info, err := request.Parse(r, id)
	if err != nil {
		t.Fatal(err)
	}
	return c.Serve(httptest.NewRecorder(), r, info)
}

const listRV0 = "/api/v1/namespaces/ns/configmaps?resourceVersion=0"

// other is a second caller, served from token's streams.
var other = request.Identity{Kind: request.BearerToken, User: "system:serviceaccount:ns:other", Token: "o", TokenHash: "o"}

// logGrants makes c's Grant log what it is told ("put RV", "delete"),
// and returns a copy of the log so far.
func logGrants(c *Cache) func() []string {
	var mu sync.Mutex
	var calls []string
	c.Grant = func(_ string, _, _ store.ViewKey, rv uint64, allowed bool) {
		mu.Lock()
		defer mu.Unlock()
		if allowed {
			calls = append(calls, "put "+itoa(rv))
		} else {
			calls = append(calls, "delete")
		}
	}
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(calls)
	}
}

// TestRefusedCallerStartsNoStream: a caller the apiserver lets read
// nothing asked first for a scope; its stream, started before any review,
// was refused, and the scope was then left upstream for every caller.
func TestRefusedCallerStartsNoStream(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10), refuse: func(tok string) bool { return tok == "nosy" }}
	nosy, good := caller("system:serviceaccount:ns:nosy", "nosy"), caller("system:serviceaccount:ns:good", "good")
	c := newTokenCache(t, api, map[string]string{nosy.User: "nosy", good.User: "good"})
	if ask(t, c, nosy, listRV0, nil) {
		t.Fatal("a caller without rights was served")
	}
	for _, s := range api.seen() {
		if strings.HasPrefix(s, "GET") {
			t.Errorf("a stream ran as the refused caller: %s", s)
		}
	}
	if !ask(t, c, good, listRV0, nil) {
		t.Errorf("an allowed caller was not served after a refused one asked for the same scope (refused scopes: %v)", c.refused)
	}
}

// TestImpersonationGoesUpstream: a request made as another user
// (Impersonate-User) was answered from the stream as its caller itself.
func TestImpersonationGoesUpstream(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	c := newTestCache(t, api)
	if !ask(t, c, token, listRV0, nil) {
		t.Fatal("the caller itself was not served")
	}
	if ask(t, c, token, listRV0, http.Header{"Impersonate-User": {"system:serviceaccount:tenant:restricted"}}) {
		t.Error("a request impersonating another user was answered from the watch cache")
	}
}

// TestOwnerWithAnotherTokenIsReviewed: the stream's owner was served with
// no review whatever token it presented, so a token the apiserver no
// longer accepts (a deleted pod's) was still served.
func TestOwnerWithAnotherTokenIsReviewed(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10), refuse: func(tok string) bool { return tok == "old" }}
	agent := caller("system:serviceaccount:ns:agent", "new")
	tokens := map[string]string{agent.User: "new"}
	c := newTokenCache(t, api, tokens)
	if !ask(t, c, agent, listRV0, nil) {
		t.Fatal("the owner was not served")
	}
	reviews := func() int {
		n := 0
		for _, s := range api.seen() {
			if strings.HasPrefix(s, "POST") {
				n++
			}
		}
		return n
	}
	before := reviews()
	if !ask(t, c, agent, listRV0, nil) || reviews() != before {
		t.Fatalf("the owner with the stream's token: reviews %d → %d", before, reviews())
	}
	if ask(t, c, caller(agent.User, "old"), listRV0, nil) {
		t.Error("the owner's user with a token the apiserver refuses was served")
	}
}

// TestDenialOfOneVerbTakesBackTheOther: after the apiserver denied a
// caller's watch, which took its grant back, its list was served from an
// answer to a review asked before the revoke, and granted again.
func TestDenialOfOneVerbTakesBackTheOther(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	c := newTestCache(t, api)
	grants := logGrants(c)
	if !ask(t, c, token, listRV0, nil) || !ask(t, c, other, listRV0, nil) {
		t.Fatal("not served")
	}
	api.mu.Lock()
	api.allowed = false // revoked
	api.mu.Unlock()
	if ask(t, c, other, "/api/v1/namespaces/ns/configmaps?watch=true&resourceVersion=10", nil) {
		t.Fatal("a denied watch was served")
	}
	if ask(t, c, other, listRV0, nil) {
		t.Error("after its watch was denied, the caller's list was served from an answer asked before")
	}
	if calls := grants(); calls[len(calls)-1] != "delete" {
		t.Errorf("grants %v: the last word was not the denial", calls)
	}
}

// TestRejectedTokenReadsNothing: a review the apiserver answers 401 (a
// token expired, or its pod deleted) said nothing, so a watch served with
// that token went on; then it was taken as a denial of the user, which
// deleted the grant its other pods, whose tokens work, are answered from
// offline.
func TestRejectedTokenReadsNothing(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10), refuse: func(tok string) bool { return tok == "podA" }}
	owner := caller("system:serviceaccount:ns:owner", "owner")
	c := newTokenCache(t, api, map[string]string{owner.User: "owner"})
	grants := logGrants(c)
	if !ask(t, c, owner, listRV0, nil) {
		t.Fatal("the owner was not served")
	}
	podB, podA := caller("system:serviceaccount:ns:app", "podB"), caller("system:serviceaccount:ns:app", "podA")
	if !ask(t, c, podB, listRV0, nil) {
		t.Fatal("pod B was not served")
	}
	if v := c.admitted(context.Background(), parse(t, listRV0, podA), time.Minute); v != rejected {
		t.Errorf("a review answered 401: verdict %v, want rejected", v)
	}
	if ask(t, c, podA, listRV0, nil) {
		t.Error("a token the apiserver refuses was served")
	}
	if g := grants(); len(g) == 0 || g[len(g)-1] == "delete" {
		t.Errorf("grants of user app %v: one dead token took back what its other pods are answered from", g)
	}
	if !ask(t, c, podB, listRV0, nil) {
		t.Error("pod B, whose token works, was no longer served")
	}
}

// TestRecordedCallerNotServedFromUnrecordedOwner: with --record-identities
// naming some callers only, one recorded was served from the stream of an
// owner that is not, so nothing of it was recorded to answer offline.
func TestRecordedCallerNotServedFromUnrecordedOwner(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	c := newTestCache(t, api)
	recorded := request.Identity{Kind: request.BearerToken, User: "system:serviceaccount:rb:narrow", Token: "n", TokenHash: "n"}
	c.Recorded = func(id string) bool { return id == recorded.User }
	if !ask(t, c, token, listRV0, nil) {
		t.Fatal("the owner was not served")
	}
	if ask(t, c, recorded, listRV0, nil) {
		t.Error("a recorded caller was served from an unrecorded owner's stream")
	}
}

// TestPinsFollowWhatWasServed: a grant is written at once with the
// version its caller was served, moves with the caller's watch, and a
// denial is never undone by a pin written after it.
func TestPinsFollowWhatWasServed(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	c := newTestCache(t, api)
	got := grantOther(t, c)
	// A watch being served: the stream moves on, the pin follows.
	ctx, cancel := context.WithCancel(context.Background())
	served := watchAsOther(ctx, c, httptest.NewRecorder())
	k := grantKey{other.Key(), scopeOf(parse(t, listRV0, other))}
	deadline := time.Now().Add(5 * time.Second)
	for {
		c.mu.Lock()
		n := c.grants[k].watches
		c.mu.Unlock()
		if n == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	api.events <- `{"type":"MODIFIED","object":` + cm("a", "12") + `}`
	for {
		c.mu.Lock()
		sent := c.grants[k].pending
		c.mu.Unlock()
		if sent >= 12 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.writePins()
	if want := []string{"put 10", "put 12"}; !slices.Equal(got(), want) {
		t.Errorf("with a watch open at 12: %v, want %v", got(), want)
	}
	cancel()
	if !<-served {
		t.Fatal("the watch was not served")
	}
	// Denied: the grant goes, and no later pin brings it back.
	c.forget(parse(t, listRV0, other))
	c.writePins()
	if want := []string{"put 10", "put 12", "delete"}; !slices.Equal(got(), want) {
		t.Errorf("after the denial: %v, want %v", got(), want)
	}
}

func itoa(n uint64) string { return strconv.FormatUint(n, 10) }

// grantOther serves token, then other, a list of listRV0, from token's
// stream, and returns the log of what Grant is told, now "put 10".
func grantOther(t *testing.T, c *Cache) func() []string {
	t.Helper()
	got := logGrants(c)
	if !ask(t, c, token, listRV0, nil) || !ask(t, c, other, listRV0, nil) {
		t.Fatal("not served")
	}
	if want := []string{"put 10"}; !slices.Equal(got(), want) {
		t.Fatalf("after the first list: %v, want %v", got(), want)
	}
	return got
}

// watchAsOther serves other a watch of ns's ConfigMaps from version 10
// into w until ctx ends, and sends whether the watch cache answered it.
func watchAsOther(ctx context.Context, c *Cache, w http.ResponseWriter) <-chan bool {
	served := make(chan bool, 1)
	go func() {
		r := httptest.NewRequest("GET", "/api/v1/namespaces/ns/configmaps?watch=true&resourceVersion=10", nil).WithContext(ctx)
		r.Header.Set("Accept", "application/json")
		info, _ := request.Parse(r, other)
		served <- c.Serve(w, r, info)
	}()
	return served
}

// listOnly refuses the watches of token "lo", which may list but not
// watch (a common read-only role), as the apiserver would.
type listOnly struct{ *fakeAPIServer }

func (l listOnly) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Header.Get("Authorization") == "Bearer lo" && (r.URL.Query().Get("watch") == "true" || r.Method == http.MethodPost && strings.Contains(readBody(r), `"verb":"watch"`)) {
		l.mu.Lock()
		l.requests = append(l.requests, r.Method+" "+r.URL.RequestURI())
		l.mu.Unlock()
		if r.Method == http.MethodPost {
			return &http.Response{StatusCode: http.StatusCreated, Header: http.Header{"Content-Type": {"application/json"}},
				Body: io.NopCloser(strings.NewReader(`{"status":{"allowed":false}}`)), Request: r}, nil
		}
		return &http.Response{StatusCode: http.StatusForbidden, Header: http.Header{"Content-Type": {"application/json"}}, Body: http.NoBody, Request: r}, nil
	}
	return l.fakeAPIServer.RoundTrip(r)
}

func readBody(r *http.Request) string {
	if r.Body == nil {
		return ""
	}
	b, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(b))
	return string(b)
}

// TestListOnlyCallerStartsNoStream: a caller allowed to list but not to
// watch started a stream as itself at every list, which the apiserver
// refused each time.
func TestListOnlyCallerStartsNoStream(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	lo := caller("system:serviceaccount:ns:reader", "lo")
	c := newTokenCache(t, api, map[string]string{lo.User: "lo"})
	wrapped := listOnly{api}
	c.As = func(id request.Identity) http.RoundTripper { return withToken{wrapped, id.Token} }
	c.UpstreamAs = func(string) http.RoundTripper { return withToken{wrapped, "lo"} }
	for range 5 {
		if ask(t, c, lo, listRV0, nil) {
			t.Fatal("served from a stream it may not watch")
		}
	}
	for _, s := range api.seen() {
		if strings.HasPrefix(s, "GET") {
			t.Errorf("a stream ran as a caller that may not watch: %s", s)
		}
	}
}

// TestTooBigAfterSyncBacksOff: a scope whose stream synced and then
// outgrew the budget was refused for a minute each time, and fetched
// whole again every minute.
func TestTooBigAfterSyncBacksOff(t *testing.T) {
	c := &Cache{Log: newTestStream(1).c.Log}
	c.init()
	scope := store.ViewKey{Resource: "/v1/configmaps"}
	var got []time.Duration
	for range 3 {
		st := newStream(c, scope, "u")
		close(st.syncedCh) // it fit at its fetch, then grew past the budget
		c.ended(st, true)
		got = append(got, time.Until(c.refused[scope].until).Round(time.Minute))
	}
	if want := []time.Duration{time.Minute, 2 * time.Minute, 4 * time.Minute}; !slices.Equal(got, want) {
		t.Errorf("refused for %v, want %v", got, want)
	}
}

// TestWatchCountAfterRegrant: a watch that began under a grant taken back
// and given again meanwhile decremented the new grant's count when it
// ended, so the pin stopped following a watch still open.
func TestWatchCountAfterRegrant(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	c := newTestCache(t, api)
	logGrants(c)
	if !ask(t, c, token, listRV0, nil) {
		t.Fatal("not served")
	}
	info := parse(t, "/api/v1/namespaces/ns/configmaps?watch=true&resourceVersion=10", other)
	c.mu.Lock()
	st := c.streams[scopeOf(info)]
	c.mu.Unlock()
	old := c.remember(info, st, c.denialMark())
	old.served(10)
	c.forget(info) // taken back
	p := c.remember(info, st, c.denialMark())
	p.served(10) // a new watch, still open
	old.end()
	c.mu.Lock()
	n := c.grants[p.k].watches
	c.mu.Unlock()
	if n != 1 {
		t.Errorf("one watch open under the grant, its count says %d", n)
	}
}

// verdicts answers access reviews by token: allowed unless it is "no".
type verdicts struct {
	mu      sync.Mutex
	reviews []string // the tokens asked with
}

func (v *verdicts) RoundTrip(r *http.Request) (*http.Response, error) {
	tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	v.mu.Lock()
	v.reviews = append(v.reviews, tok)
	v.mu.Unlock()
	body := `{"status":{"allowed":` + strconv.FormatBool(tok != "no") + `}}`
	return &http.Response{StatusCode: http.StatusCreated, Header: http.Header{"Content-Type": {"application/json"}},
		Body: io.NopCloser(strings.NewReader(body)), Request: r}, nil
}

// TestStoredGrantsReviewedAfterReconnect: a grant was taken back only
// when its caller asked the same scope again online and was denied; one
// that never asked again (kubelet, once its pod was deleted) kept it, and
// was answered from it offline, across restarts.
func TestStoredGrantsReviewedAfterReconnect(t *testing.T) {
	api := &verdicts{}
	tokens := map[string]string{"system:serviceaccount:ns:revoked": "no", "system:serviceaccount:ns:still": "yes", "system:serviceaccount:ns:active": "yes"}
	c := &Cache{Log: newTestStream(1).c.Log,
		UpstreamAs: func(id string) http.RoundTripper {
			if tok, ok := tokens[id]; ok {
				return withToken{api, tok}
			}
			return nil
		}}
	c.init()
	grants := logGrants(c)
	asked := store.ViewKey{Resource: "/v1/configmaps", Namespace: "ns", FieldSelector: "metadata.name=pod-config"}
	stored := []string{"system:serviceaccount:ns:revoked", "system:serviceaccount:ns:still", "system:serviceaccount:ns:active", "system:serviceaccount:ns:unknown"}
	c.Grants = func(fn func(string, store.ViewKey) error) error {
		for _, id := range stored {
			if err := fn(id, asked); err != nil {
				return err
			}
		}
		return nil
	}
	back := time.Now()
	// "active" was served, and so reviewed, since the link came back.
	done := make(chan struct{})
	close(done)
	c.keepReview(reviewKey{user: "system:serviceaccount:ns:active", token: "h", verb: "watch", scope: asked}, &review{done: done, verdict: allowed, at: back.Add(time.Second)})
	c.reviewGrants(context.Background(), back)
	if want := []string{"delete"}; !slices.Equal(grants(), want) {
		t.Errorf("grants told %v, want %v (only the revoked caller's taken back)", grants(), want)
	}
	if want := []string{"no", "yes"}; !slices.Equal(api.reviews, want) {
		t.Errorf("reviews asked with tokens %v, want %v (none for the caller reviewed since, nor for one outpost holds no credentials of)", api.reviews, want)
	}
}

// TestOwnerGetsNoGrantForItsOwnStream: a caller served a narrower scope
// from the stream it owns reads its own data. A grant, pinned to what it
// was last served, would cut its offline answers short of its own view:
// objects changed since the pin would be left out of a list that still
// holds them.
func TestOwnerGetsNoGrantForItsOwnStream(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	c := newTestCache(t, api)
	grants := logGrants(c)
	if !ask(t, c, token, listRV0, nil) {
		t.Fatal("the owner was not served")
	}
	if !ask(t, c, token, listRV0+"&labelSelector=app%3Dweb", nil) {
		t.Fatal("the owner was not served a narrower scope from its stream")
	}
	if !ask(t, c, other, listRV0+"&labelSelector=app%3Dweb", nil) {
		t.Fatal("another caller was not served")
	}
	waitUntil(t, "the other caller's grant", func() bool { return len(grants()) > 0 })
	if g := grants(); len(g) != 1 {
		t.Errorf("grants %v: want one, the other caller's, none for the owner", g)
	}
}
