package peer

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// Defaults shared with outpost-controller and the manifests under deploy/.
const (
	// DefaultNamespace holds the reports, one Lease per node.
	DefaultNamespace = "outpost-peers"
	// DefaultSiteLabel is the Node label whose value names a node's site.
	DefaultSiteLabel = corev1.LabelTopologyZone
)

// Config is the plain configuration of a node's peer checks. The zero value
// of each field is documented; an empty Address turns the checks off.
type Config struct {
	// Address is the IP:port where this node serves its peers' probes and
	// that it advertises to them; empty means off. It must be an address
	// the site's other nodes reach over the local network.
	Address string
	// Namespace holds the reports; empty means DefaultNamespace.
	Namespace string
	// SiteLabel names the Node label whose value is the site; empty means
	// DefaultSiteLabel.
	SiteLabel string
	// ProbeInterval is the time between rounds of probes; zero means 2 s.
	ProbeInterval time.Duration
	// ProbeTimeout bounds one probe, TLS handshake included; zero means 1 s.
	ProbeTimeout time.Duration
	// Fanout is how many peers are probed per round; zero means 3.
	Fanout int
	// FailureThreshold consecutive failed probes make a peer unreachable;
	// zero means 3. One good probe makes it reachable again.
	FailureThreshold int
	// ReportInterval is the time between reports; zero means 10 s. A report
	// is valid for three intervals (the Lease's leaseDurationSeconds).
	ReportInterval time.Duration
}

// Enabled reports whether the node takes part in its site's peer checks.
func (c Config) Enabled() bool { return c.Address != "" }

// WithDefaults returns c with every zero value replaced by its default.
func (c Config) WithDefaults() Config {
	if c.Namespace == "" {
		c.Namespace = DefaultNamespace
	}
	if c.SiteLabel == "" {
		c.SiteLabel = DefaultSiteLabel
	}
	if c.ProbeInterval == 0 {
		c.ProbeInterval = 2 * time.Second
	}
	if c.ProbeTimeout == 0 {
		c.ProbeTimeout = time.Second
	}
	if c.Fanout == 0 {
		c.Fanout = 3
	}
	if c.FailureThreshold == 0 {
		c.FailureThreshold = 3
	}
	if c.ReportInterval == 0 {
		c.ReportInterval = 10 * time.Second
	}
	return c
}

// Validate reports every problem of c, after defaults, with the flag names
// of `outpost run`.
func (c Config) Validate() error {
	if !c.Enabled() {
		return nil
	}
	c = c.WithDefaults()
	var errs []error
	if ap, err := netip.ParseAddrPort(c.Address); err != nil || ap.Addr().IsUnspecified() || ap.Port() == 0 {
		errs = append(errs, fmt.Errorf("--peer-address %q: want the IP:port this node's peers reach it at (not 0.0.0.0, not port 0)", c.Address))
	}
	if c.ProbeInterval < 0 || c.ProbeTimeout < 0 || c.ReportInterval < 0 {
		errs = append(errs, errors.New("--peer-probe-interval, --peer-probe-timeout and --peer-report-interval must be positive"))
	}
	if c.Fanout < 0 || c.FailureThreshold < 0 {
		errs = append(errs, errors.New("--peer-fanout and --peer-failure-threshold must be at least 1"))
	}
	return errors.Join(errs...)
}

// NodeMaySetLabel reports whether kubelet may set the Node label key on its
// own Node under the NodeRestriction admission plugin: any label outside
// the kubernetes.io and k8s.io domains, and within them only kubelet's
// well-known labels (hostname, zone, region, instance type, os, arch) and
// those under kubelet.kubernetes.io and node.kubernetes.io. A site label a
// node may set lets a node move itself into another site
// (node-restriction.kubernetes.io/<name> is one it may not).
func NodeMaySetLabel(key string) bool {
	switch key {
	case corev1.LabelHostname, corev1.LabelTopologyZone, corev1.LabelTopologyRegion,
		corev1.LabelFailureDomainBetaZone, corev1.LabelFailureDomainBetaRegion,
		corev1.LabelInstanceType, corev1.LabelInstanceTypeStable,
		corev1.LabelOSStable, corev1.LabelArchStable, "beta.kubernetes.io/os", "beta.kubernetes.io/arch":
		return true
	}
	prefix, _, ok := strings.Cut(key, "/")
	if !ok {
		return true // no domain: not restricted
	}
	under := func(domain string) bool { return prefix == domain || strings.HasSuffix(prefix, "."+domain) }
	if under("kubelet.kubernetes.io") || under("node.kubernetes.io") {
		return true
	}
	return !under("kubernetes.io") && !under("k8s.io")
}
