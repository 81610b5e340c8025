package converge

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/outposthq/outpost/internal/request"
)

// local notes the steps asked of it, in order, with the identity each
// upstream was made for.
type local struct {
	mu       sync.Mutex
	steps    []string
	failNext bool // the next re-list fails, as when the link fails again
}

func (l *local) note(s string) {
	l.mu.Lock()
	l.steps = append(l.steps, s)
	l.mu.Unlock()
}

func (l *local) ReplayStatus(_ context.Context, up http.RoundTripper) (int, error) {
	l.note("status as " + up.(as).key)
	return 1, nil
}
func (l *local) DropOverlays() { l.note("drop overlays") }
func (l *local) ReplayJournal(_ context.Context, _ int, up http.RoundTripper) (int, error) {
	l.note("journal as " + up.(as).key)
	return 2, nil
}
func (l *local) Relist(_ context.Context, identity string, _ int, up http.RoundTripper, _ time.Time) (int, error) {
	l.note("relist " + identity + " as " + up.(as).key)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.failNext {
		l.failNext = false
		return 1, io.ErrUnexpectedEOF
	}
	return 3, nil
}

func (l *local) taken() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := strings.Join(l.steps, "; ")
	l.steps = nil
	return s
}

// as stands for the upstream of one identity: the user, or for a token
// its token.
type as struct{ key string }

func (as) RoundTrip(*http.Request) (*http.Response, error) { return nil, io.EOF }

// state is an online/offline switch.
type state struct {
	mu      sync.Mutex
	online  bool
	changed chan struct{}
}

func (s *state) Online() bool { s.mu.Lock(); defer s.mu.Unlock(); return s.online }
func (s *state) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}
func (s *state) set(online bool) {
	s.mu.Lock()
	s.online = online
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
}

// TestConvergeOnReturn: on each return of the cloud the node's statuses
// are sent and its overlays dropped before the journal is replayed, all as
// the node; views are re-listed (the node's, then each token caller's with
// its own token) only after an outage longer than the flap window.
func TestConvergeOnReturn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		node := request.Identity{Kind: request.NodeCert, User: "system:node:edge-1"}
		l := &local{}
		st := &state{online: true, changed: make(chan struct{})}
		c := &Converger{Local: l, Relist: l.Relist, Node: node, Online: st.Online, Changed: st.Changed, FlapWindow: 10 * time.Second, RelistRate: 5,
			Upstream: func(id request.Identity) http.RoundTripper {
				if id.Kind == request.BearerToken {
					return as{id.User + "/" + id.Token}
				}
				return as{id.User}
			},
			Tokens: func() map[string]string { return map[string]string{"system:serviceaccount:a:b": "tok"} },
			Log:    slog.New(slog.DiscardHandler)}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { _ = c.Run(ctx); close(done) }()

		st.set(false)
		time.Sleep(2 * time.Second) // a flap
		st.set(true)
		synctest.Wait()
		if got, want := l.taken(), "status as system:node:edge-1; drop overlays; journal as system:node:edge-1"; got != want {
			t.Errorf("after a flap:\n got %s\nwant %s", got, want)
		}

		st.set(false)
		time.Sleep(time.Minute)
		st.set(true)
		synctest.Wait()
		want := "status as system:node:edge-1; drop overlays; journal as system:node:edge-1; " +
			"relist system:node:edge-1 as system:node:edge-1; relist system:serviceaccount:a:b as system:serviceaccount:a:b/tok"
		if got := l.taken(); got != want {
			t.Errorf("after an outage:\n got %s\nwant %s", got, want)
		}

		// A re-list the link cut short is finished at the next return,
		// even after a flap; then flaps re-list nothing again.
		l.mu.Lock()
		l.failNext = true
		l.mu.Unlock()
		st.set(false)
		time.Sleep(time.Minute)
		st.set(true)
		synctest.Wait()
		if got, want := l.taken(), "status as system:node:edge-1; drop overlays; journal as system:node:edge-1; relist system:node:edge-1 as system:node:edge-1"; got != want {
			t.Errorf("after an outage whose re-list failed:\n got %s\nwant %s", got, want)
		}
		for i, want := range []string{want, "status as system:node:edge-1; drop overlays; journal as system:node:edge-1"} {
			st.set(false)
			time.Sleep(2 * time.Second) // a flap
			st.set(true)
			synctest.Wait()
			if got := l.taken(); got != want {
				t.Errorf("flap %d after it:\n got %s\nwant %s", i+1, got, want)
			}
		}
		cancel()
		<-done
	})
}
