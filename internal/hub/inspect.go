package hub

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/outposthq/outpost/internal/drift"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// driftUpstream sends a view's comparison list upstream as its identity:
// the node with the node's credentials, a token caller with the token it
// last used (in memory only); nil for anyone else.
func (h *Hub) driftUpstream() drift.Upstream {
	node := h.auth.Node()
	tokens := h.tokens.All()
	return func(identity string) http.RoundTripper {
		if identity == node.Key() {
			return h.pool.As(node)
		}
		if token, ok := tokens[identity]; ok {
			return h.pool.As(request.Identity{Kind: request.BearerToken, User: identity, Token: token})
		}
		return nil
	}
}

// InspectSocket is the name, in the data dir, of the unix socket through
// which `outpost cache` reads the store of a running outpost: bbolt lets
// one process open the file at a time, so the running one hands out
// consistent copies (store.Snapshot). Only who may read the data dir (0700)
// may connect, as only they may read cache.db itself; the cache's content
// is never served on a TCP port.
const InspectSocket = "inspect.sock"

// listenInspect listens on the inspection socket of dataDir, replacing one
// a previous run left, with mode 0600.
func listenInspect(dataDir string) (net.Listener, error) {
	path := filepath.Join(dataDir, InspectSocket)
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("removing old inspection socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("inspection socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("inspection socket: %w", err)
	}
	return ln, nil
}

// snapshotTimeout bounds the copy of the store: ample for a cache of
// gigabytes on a local socket.
const snapshotTimeout = 2 * time.Minute

// inspectHandler serves GET /snapshot: a consistent copy of the store
// file; and GET /diff: the views compared with the apiserver (package
// drift), as JSON, optionally only those of ?identity= and ?resource=
// (group/version/resource).
func (h *Hub) inspectHandler(st *store.Store) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /diff", func(w http.ResponseWriter, r *http.Request) {
		if !h.monitor.Online() {
			http.Error(w, "outpost is offline: there is no apiserver to compare the cache with", http.StatusServiceUnavailable)
			return
		}
		identity, resource := r.URL.Query().Get("identity"), r.URL.Query().Get("resource")
		keep := func(k store.ViewKey) bool {
			return (identity == "" || k.Identity == identity) && (resource == "" || request.MatchesResource(k.Resource, resource))
		}
		report, err := drift.Compare(r.Context(), st, keep, h.driftUpstream())
		if err != nil {
			http.Error(w, "comparing the cache with the apiserver: "+err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(report)
	})
	mux.HandleFunc("GET /snapshot", func(w http.ResponseWriter, _ *http.Request) {
		// The copy holds one read transaction open; a reader that stops
		// reading must not hold it, and the file's growth, for long.
		_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(snapshotTimeout))
		w.Header().Set("Content-Type", "application/octet-stream")
		// An error midway cannot be reported in the body any more: the
		// reader then finds a truncated copy, which does not open.
		_, _ = st.Snapshot(w)
	})
	return mux
}
