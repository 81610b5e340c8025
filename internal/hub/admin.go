package hub

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/pprof"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/outposthq/outpost/internal/converge"
	"github.com/outposthq/outpost/internal/local"
	"github.com/outposthq/outpost/internal/recorder"
	"github.com/outposthq/outpost/internal/report"
)

// adminHandler serves the admin port: health, readiness, metrics, the
// status `outpost status` reads, the cache's debug views and pprof.
func (h *Hub) adminHandler(conv *converge.Converger, writes *local.Writer, rec *recorder.Recorder) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		// Ready once outpost can serve: online (an apiserver answered a
		// probe), or offline with a cache.
		state, ready, views := h.readiness()
		switch {
		case ready && state == report.Online:
			_, _ = w.Write([]byte("ok: online\n"))
		case ready:
			_, _ = fmt.Fprintf(w, "ok: offline, serving %d cached views\n", views)
		case state == report.Starting:
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("starting: no apiserver has answered a probe yet, and nothing cached\n"))
		default:
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("offline: no apiserver healthy and nothing cached\n"))
		}
	})
	mux.HandleFunc("/status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(h.report(conv, writes, rec))
	})
	mux.Handle("/metrics", promhttp.HandlerFor(h.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/debug/cache/views", func(w http.ResponseWriter, _ *http.Request) {
		views, err := h.store.AllViews()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(views)
	})
	// Resources whose answers could not be recorded lately, and so will
	// not be served offline (the views endpoint keeps its list of views).
	mux.HandleFunc("/debug/cache/unrecorded", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(rec.Unrecorded())
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}
