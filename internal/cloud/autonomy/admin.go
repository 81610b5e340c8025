package autonomy

import (
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/client-go/tools/leaderelection"
)

// adminMux serves /metrics, /healthz and /readyz.
//
// /healthz fails only when this replica holds the Lease but has not renewed
// it in time (a wedged leader should be restarted). /readyz succeeds once
// the namespace it works in exists, the caches have synced and a serving
// certificate exists: only then may the Service send us admission reviews.
func adminMux(m *metrics, health *leaderelection.HealthzAdaptor, namespace func() error, synced, certReady func() bool) *http.ServeMux {
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
		if err := namespace(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
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
