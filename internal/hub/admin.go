package hub

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/pprof"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/outposthq/outpost/internal/recorder"
)

func (h *Hub) adminHandler(rec *recorder.Recorder) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		// Ready once outpost can serve: online (an apiserver answered a
		// probe), or offline with a cache.
		if h.monitor.Online() && h.monitor.Reached() {
			_, _ = w.Write([]byte("ok: online\n"))
			return
		}
		if _, views, err := h.store.Stats(); err == nil && views > 0 {
			_, _ = fmt.Fprintf(w, "ok: offline, serving %d cached views\n", views)
			return
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		if h.monitor.Online() {
			_, _ = w.Write([]byte("starting: no apiserver has answered a probe yet, and nothing cached\n"))
			return
		}
		_, _ = w.Write([]byte("offline: no apiserver healthy and nothing cached\n"))
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
