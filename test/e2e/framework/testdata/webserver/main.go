// Command webserver is the workload of the real-kubelet e2e tests, packed
// into the image outpost.test/web:1 by the framework. It answers:
//
//	GET /healthz            "ok", for readiness probes
//	GET /file?path=/a/b     the content of a file in the container, so a test
//	                        can read what kubelet mounted (ConfigMap, Secret,
//	                        service account token) over HTTP
//	GET /                   the hostname and the value of $MESSAGE
//
// It listens on -addr, by default ":$PORT" ($PORT defaults to 8080), and
// exits on SIGTERM at once, so that pods stop without waiting out their
// grace period.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	addr := flag.String("addr", ":"+port, "listen address")
	flag.Parse()

	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /file", func(w http.ResponseWriter, r *http.Request) {
		data, err := os.ReadFile(r.URL.Query().Get("path"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		w.Write(data)
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		host, _ := os.Hostname()
		fmt.Fprintf(w, "%s %s\n", host, os.Getenv("MESSAGE"))
	})
	srv := &http.Server{Addr: *addr, Handler: mux}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	log.Printf("webserver: listening on %s", *addr)
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		log.Fatalf("webserver: %v", err)
	}
}
