package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// tlsConfigFor trusts outpost's serving CA.
func tlsConfigFor(o *framework.Outpost) (*tls.Config, error) {
	pem, err := os.ReadFile(o.ServingCAFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificate in %s", o.ServingCAFile)
	}
	return &tls.Config{RootCAs: pool}, nil
}
