package webhook

import "errors"

// errNoCertificate is returned by Certs.GetCertificate before the first
// serving certificate is issued; the TLS handshake then fails, and the
// apiserver applies the webhook's failure policy.
var errNoCertificate = errors.New("webhook serving certificate not issued yet")
