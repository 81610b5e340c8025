// Command floorproxy is the thinnest TLS HTTP/2 reverse proxy Go's standard
// library makes: httputil.ReverseProxy, flushing at once, forwarding the
// caller's bearer token, with nothing recorded, parsed or counted. The
// benchmark runs it beside outpost so that a run shows what any proxy hop
// written in Go costs on the machine, apart from what outpost adds to it.
//
// Usage: floorproxy LISTEN UPSTREAM-URL UPSTREAM-CA CERT KEY
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
)

func main() {
	if len(os.Args) != 6 {
		fmt.Fprintln(os.Stderr, "usage: floorproxy LISTEN UPSTREAM-URL UPSTREAM-CA CERT KEY")
		os.Exit(2)
	}
	listen, upstream, caFile, certFile, keyFile := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5]
	target, err := url.Parse(upstream)
	if err != nil {
		log.Fatal(err)
	}
	ca, err := os.ReadFile(caFile)
	if err != nil {
		log.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		log.Fatalf("no certificate in %s", caFile)
	}
	proxy := &httputil.ReverseProxy{
		Rewrite:       func(r *httputil.ProxyRequest) { r.SetURL(target) },
		FlushInterval: -1,
		Transport: &http.Transport{
			TLSClientConfig:     &tls.Config{RootCAs: pool},
			ForceAttemptHTTP2:   true,
			MaxIdleConnsPerHost: 100,
			DisableCompression:  true,
		},
	}
	log.Fatal(http.ListenAndServeTLS(listen, certFile, keyFile, proxy))
}
