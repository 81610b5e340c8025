// Command webserver is the workload of the real-kubelet e2e tests, packed
// into the image outpost.test/web:1 by the framework. It answers:
//
//	GET /healthz            "ok", for readiness probes
//	GET /file?path=/a/b     the content of a file in the container, so a test
//	                        can read what kubelet mounted (ConfigMap, Secret,
//	                        service account token) over HTTP
//	GET /env?name=X         the value of environment variable X
//	GET /kube?path=/api/v1/... and optional &host=H (default
//	                        $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)
//	                        the answer of the Kubernetes API to a GET as an
//	                        in-cluster client: the pod's service account
//	                        token, verified against the mounted cluster CA;
//	                        the status code on the first line, then the body
//	GET /                   the hostname and the value of $MESSAGE
//
// It listens on -addr, by default ":$PORT" ($PORT defaults to 8080), and
// exits on SIGTERM at once, so that pods stop without waiting out their
// grace period.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
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
	mux.HandleFunc("GET /env", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, os.Getenv(r.URL.Query().Get("name")))
	})
	mux.HandleFunc("GET /kube", func(w http.ResponseWriter, r *http.Request) {
		code, body, err := inCluster(r.Context(), r.URL.Query().Get("host"), r.URL.Query().Get("path"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		fmt.Fprintf(w, "%d\n%s", code, body)
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

// serviceAccountDir is where kubelet mounts a pod's token and cluster CA.
const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount/"

// inCluster GETs path from the Kubernetes API as client-go's in-cluster
// config would: at host (default from the KUBERNETES_SERVICE_* variables
// kubelet sets), with the mounted token, trusting only the mounted CA.
func inCluster(ctx context.Context, host, path string) (int, []byte, error) {
	if host == "" {
		host = net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"))
	}
	token, err := os.ReadFile(serviceAccountDir + "token")
	if err != nil {
		return 0, nil, err
	}
	ca, err := os.ReadFile(serviceAccountDir + "ca.crt")
	if err != nil {
		return 0, nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca) {
		return 0, nil, errors.New("no certificate in ca.crt")
	}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: nil, TLSClientConfig: &tls.Config{RootCAs: roots}}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+host+path, nil)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+string(token))
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, body, err
}
