package autonomy

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/client-go/tools/leaderelection"
)

// serve runs srv on ln until ctx is done, then shuts it down, forcing the
// stop after timeout.
func serve(ctx context.Context, srv *http.Server, ln net.Listener, useTLS bool, timeout time.Duration) error {
	errc := make(chan error, 1)
	go func() {
		if useTLS {
			errc <- srv.ServeTLS(ln, "", "")
		} else {
			errc <- srv.Serve(ln)
		}
	}()
	select {
	case err := <-errc:
		return fmt.Errorf("serving on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	<-errc // http.ErrServerClosed
	return nil
}

// adminMux serves /metrics, /healthz and /readyz.
//
// /healthz fails only when this replica holds the Lease but has not renewed
// it in time (a wedged leader should be restarted). /readyz succeeds once
// the caches have synced and a serving certificate exists: only then may
// the Service send us admission reviews.
func adminMux(m *metrics, health *leaderelection.HealthzAdaptor, synced, certReady func() bool) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if err := health.Check(r); err != nil {
			http.Error(w, "unhealthy: "+err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		switch {
		case !synced():
			http.Error(w, "not ready: informer caches not synced", http.StatusServiceUnavailable)
		case !certReady():
			http.Error(w, "not ready: no webhook serving certificate", http.StatusServiceUnavailable)
		default:
			fmt.Fprintln(w, "ok")
		}
	})
	return mux
}
