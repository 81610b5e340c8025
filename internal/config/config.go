// Package config holds the plain configuration of the outpost hub: what the
// command line sets, with documented zero values and defaults. It holds no
// live objects; the packages that act on it build those from it.
package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"time"

	"github.com/outposthq/outpost/internal/peer"
)

// LB modes choose among healthy apiservers.
const (
	// LBRoundRobin spreads requests over every healthy apiserver in turn.
	LBRoundRobin = "round-robin"
	// LBPriority sends every request to the first healthy apiserver in the
	// order they were given, so a local or cheaper one is preferred.
	LBPriority = "priority"
)

// Hub is the configuration of `outpost run`.
type Hub struct {
	// Kubeconfig names the file holding the upstream apiserver(s) and the
	// node's credentials toward them. Required. With BootstrapKubeconfig it
	// may be missing or hold no valid certificate: outpost then obtains one
	// and writes this file, as kubelet does.
	Kubeconfig string
	// BootstrapKubeconfig holds a bootstrap token (kubelet TLS bootstrap).
	// When Kubeconfig has no valid node credential, outpost files a node
	// client CSR with it, waits for approval, keeps the key and certificate
	// in DataDir/pki and rotates them before they expire.
	BootstrapKubeconfig string
	// Servers, when set, replace the server of the kubeconfig's current
	// context. Each is an https URL of one kube-apiserver.
	Servers []string
	// NodeName is the name of this node. Defaults to the hostname.
	NodeName string
	// DataDir holds outpost's state: the cache (cache.db) and pki/.
	// Created with mode 0700. Default /var/lib/outpost.
	DataDir string

	// SecureAddress is the TLS listener for every client. Default 127.0.0.1:10268.
	SecureAddress string
	// TLSCertFile and TLSKeyFile are the serving certificate of SecureAddress.
	// When both are empty a self-signed one is created in DataDir.
	TLSCertFile string
	TLSKeyFile  string
	// RotateServerCertificates obtains the serving certificate by a
	// kubernetes.io/kubelet-serving CSR (approved by the cluster's operator
	// or approver, as for kubelet) and renews it before expiry, instead of
	// self-signing. Ignored when TLSCertFile is set.
	RotateServerCertificates bool
	// NodeIPs are this node's addresses, added to the serving certificate's
	// SANs besides 127.0.0.1, ::1, localhost and the node name.
	NodeIPs []string
	// NodeLocalAddress, when set (IP:port, a link-local address on lo, say
	// 169.254.2.1:10269), is a second TLS listener where in-cluster clients
	// of this node reach outpost: pods on the pod network and on the host
	// network alike. This node's kubelet then sees the kubernetes Service
	// pointing there (so pods' KUBERNETES_SERVICE_HOST/PORT lead to
	// outpost), and ServiceProxies see its endpoints there (so its VIP and
	// kubernetes.default.svc do too). The serving certificate then also
	// names the in-cluster names and the Service's VIP, so it must come from
	// the cluster CA: RotateServerCertificates, or TLSCertFile. Empty = off.
	NodeLocalAddress string
	// ServiceProxies are the users whose view of the kubernetes Service's
	// endpoints points at NodeLocalAddress (user names, or prefixes ending
	// in "*"); this node's own user always is. Default: kube-proxy's
	// service account and the system:kube-proxy user.
	ServiceProxies []string
	// ClusterDomain is the cluster's DNS domain, for the serving
	// certificate's kubernetes.default.svc.<domain>. Default cluster.local.
	ClusterDomain string
	// ClientCAFile verifies client certificates of local callers. Empty means
	// the certificate authority of the kubeconfig's cluster.
	ClientCAFile string
	// InsecureAddress, when set, is a plain-HTTP listener. Everything that
	// arrives there is treated as this node's kubelet and forwarded with the
	// node's credentials: bind it to loopback only. Empty (the default) = off.
	InsecureAddress string
	// AdminAddress serves /healthz, /readyz, /metrics and /debug/pprof.
	// Default 127.0.0.1:10267; empty string in the flag turns it off.
	AdminAddress string

	// LBMode is LBRoundRobin (default) or LBPriority.
	LBMode string
	// ProbeInterval is the time between active health probes of each
	// apiserver. Default 500ms: with the timeout, a dead link is noticed
	// within a second even when no request is in flight.
	ProbeInterval time.Duration
	// ProbeTimeout bounds one probe. Default 500ms.
	ProbeTimeout time.Duration
	// ProbeReadyInterval is the time between /readyz probes of a healthy
	// apiserver; the probes between them are HTTP/2 PINGs, which cross the
	// same link to the same process but cost the apiserver no request. An
	// apiserver not healthy is probed with /readyz every ProbeInterval.
	// Default 10s; 0: every probe asks /readyz.
	ProbeReadyInterval time.Duration
	// FailureThreshold consecutive failed probes mark an apiserver unhealthy.
	// Default 1: one failed probe is enough, as a failed real request is.
	FailureThreshold int
	// SuccessThreshold consecutive good probes bring an unhealthy apiserver
	// back. Default 2, so a flapping link does not flip the state each second.
	SuccessThreshold int

	// APIAudiences are the audiences a service-account token must carry to
	// be accepted offline when it was never seen online. Empty means the
	// issuer of the cluster's service-account tokens (the apiserver's
	// default for --api-audiences).
	APIAudiences []string
	// EncryptionKeyFile, when set, holds a 32-byte AES key (raw or base64)
	// with which Secret data and recorded service-account tokens are
	// encrypted in the cache file.
	EncryptionKeyFile string

	// RecordIdentities says whose answers are recorded into the cache:
	// user names, or prefixes ending in "*"; "*" (the default) records every
	// authenticated caller, an empty list records nobody.
	RecordIdentities []string

	// FlapWindow: after an outage shorter than this, outpost resumes without
	// re-listing its views (active clients' watches catch up by
	// themselves); after a longer one it re-lists every view it holds
	// credentials for. Default 10s.
	FlapWindow time.Duration
	// RelistRate bounds re-lists after a reconnect, per second. Default 5.
	RelistRate int
	// RecordingBudget bounds the bytes of answers held at once while they
	// are copied for recording (recorder.Recorder.MaxBuffered). Zero: the
	// recorder's default.
	RecordingBudget int64
	// MemoryLimit is the soft limit of the Go runtime's memory
	// (debug.SetMemoryLimit): 0 means none, negative means
	// DefaultMemoryLimit unless $GOMEMLIMIT is set.
	MemoryLimit int64
	// WatchCache turns on the node watch cache (package share): online,
	// the reads kube-apiserver answers from its own watch cache are
	// answered from one upstream list+watch per scope, shared by this
	// node's clients. WatchCacheSize bounds the memory it holds (zero: its
	// default), and WatchCacheRecheck how long an access review of a
	// caller holds (zero: its default). On by default.
	WatchCache        bool
	WatchCacheSize    int64
	WatchCacheRecheck time.Duration

	// Peers configures this node's part in its site's peer checks (package
	// peer); off unless Peers.Address is set.
	Peers peer.Config

	// ShutdownTimeout bounds the drain of in-flight requests on SIGTERM.
	// Default 15s.
	ShutdownTimeout time.Duration
	// LogLevel is one of debug, info, warn, error. Default info.
	LogLevel string
}

// DefaultMemoryLimit is --memory-limit's default. Outpost's live heap is a
// few MB plus what bursts hold for a moment (a page per client streamed
// from the cache, a MiB per answer proxied ahead of its client, the answer
// copied for recording); by default Go lets the heap grow to twice what is
// live before collecting, which leaves a burst's garbage resident. With
// the limit the collector runs sooner once the heap nears it. It is soft:
// more live data than this slows outpost down rather than failing it.
const DefaultMemoryLimit = 100 << 20

// DefaultHub returns a Hub with every default filled in except NodeName.
func DefaultHub() Hub {
	return Hub{
		DataDir:            "/var/lib/outpost",
		SecureAddress:      "127.0.0.1:10268",
		AdminAddress:       "127.0.0.1:10267",
		LBMode:             LBRoundRobin,
		ProbeInterval:      500 * time.Millisecond,
		ProbeTimeout:       500 * time.Millisecond,
		ProbeReadyInterval: 10 * time.Second,
		FailureThreshold:   1,
		SuccessThreshold:   2,
		RecordIdentities:   []string{"*"},
		WatchCache:         true,
		ServiceProxies:     []string{"system:serviceaccount:kube-system:kube-proxy", "system:kube-proxy"},
		ClusterDomain:      "cluster.local",
		FlapWindow:         10 * time.Second,
		RelistRate:         5,
		ShutdownTimeout:    15 * time.Second,
		LogLevel:           "info",
	}
}

// Validate reports every problem of c at once.
func (c *Hub) Validate() error {
	var errs []error
	if c.Kubeconfig == "" {
		errs = append(errs, errors.New("--kubeconfig is required"))
	}
	for _, s := range c.Servers {
		u, err := url.Parse(s)
		if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
			errs = append(errs, fmt.Errorf("--server %q: want an http(s) URL with a host", s))
		}
	}
	if c.NodeName == "" {
		errs = append(errs, errors.New("--node-name is empty and the hostname is unknown"))
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("--data-dir is required"))
	}
	if c.SecureAddress == "" && c.InsecureAddress == "" {
		errs = append(errs, errors.New("--secure-address and --insecure-address are both off: nothing to serve"))
	}
	for flag, addr := range map[string]string{"--secure-address": c.SecureAddress, "--insecure-address": c.InsecureAddress, "--admin-address": c.AdminAddress} {
		if addr == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", flag, addr, err))
		}
	}
	if c.NodeLocalAddress != "" && (c.ClusterDomain == "" || strings.HasPrefix(c.ClusterDomain, ".") || strings.HasSuffix(c.ClusterDomain, ".")) {
		errs = append(errs, fmt.Errorf("--cluster-domain %q: want the cluster's DNS domain, such as cluster.local", c.ClusterDomain))
	}
	if c.NodeLocalAddress != "" {
		ap, err := netip.ParseAddrPort(c.NodeLocalAddress)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("--node-local-address %q: want IP:port: %w", c.NodeLocalAddress, err))
		case ap.Addr().IsUnspecified() || ap.Port() == 0 || ap.Addr().Zone() != "" || ap.Addr().Is4In6():
			errs = append(errs, fmt.Errorf("--node-local-address %q: want one address (no zone, no IPv4 in IPv6) and a port, which pods are pointed at", c.NodeLocalAddress))
		case !c.RotateServerCertificates && c.TLSCertFile == "":
			errs = append(errs, errors.New("--node-local-address needs a serving certificate from the cluster CA, which in-cluster clients trust: --rotate-server-certificates or --tls-cert-file"))
		}
	}
	for _, ip := range c.NodeIPs {
		if net.ParseIP(ip) == nil {
			errs = append(errs, fmt.Errorf("--node-ip %q is not an IP address", ip))
		}
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		errs = append(errs, errors.New("--tls-cert-file and --tls-private-key-file go together"))
	}
	if c.LBMode != LBRoundRobin && c.LBMode != LBPriority {
		errs = append(errs, fmt.Errorf("--lb-mode %q: want %s or %s", c.LBMode, LBRoundRobin, LBPriority))
	}
	if c.ProbeInterval <= 0 || c.ProbeTimeout <= 0 {
		errs = append(errs, errors.New("--probe-interval and --probe-timeout must be positive"))
	}
	if c.ProbeReadyInterval < 0 {
		errs = append(errs, errors.New("--probe-ready-interval must not be negative"))
	}
	if c.FailureThreshold < 1 || c.SuccessThreshold < 1 {
		errs = append(errs, errors.New("--failure-threshold and --success-threshold must be at least 1"))
	}
	if c.FlapWindow < 0 || c.RelistRate < 1 {
		errs = append(errs, errors.New("--flap-window must not be negative and --relist-rate must be at least 1"))
	}
	switch {
	case c.WatchCacheRecheck < 0:
		errs = append(errs, errors.New("--watch-cache-recheck must not be negative"))
	case c.WatchCacheRecheck > 0 && c.WatchCacheRecheck < time.Second:
		// Shorter, every stream would be renewed and every request
		// reviewed each second: polling, not a cache.
		errs = append(errs, fmt.Errorf("--watch-cache-recheck %v: want at least 1s (0 for the default, 5m)", c.WatchCacheRecheck))
	}
	if c.ShutdownTimeout < 0 {
		errs = append(errs, errors.New("--shutdown-timeout must not be negative"))
	}
	errs = append(errs, c.Peers.Validate())
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("--log-level %q: want debug, info, warn or error", c.LogLevel))
	}
	return errors.Join(errs...)
}
