package hub

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/outposthq/outpost/internal/store"
)

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

// inspectHandler serves GET /snapshot: a consistent copy of the store file.
func inspectHandler(st *store.Store) http.Handler {
	mux := http.NewServeMux()
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
