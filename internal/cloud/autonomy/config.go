package autonomy

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/outposthq/outpost/internal/cloud/csrapproval"
	"github.com/outposthq/outpost/internal/cloud/peerhealth"
	"github.com/outposthq/outpost/internal/peer"
)

// Config is the configuration of Run. It is plain data; the zero value of
// each field is documented, and Run applies the defaults.
type Config struct {
	// Kubeconfig is the path of a kubeconfig file. If empty, the in-cluster
	// configuration (service account token) is used.
	Kubeconfig string
	// QPS and Burst limit requests to the apiserver; zero means 20 and 40.
	QPS   float32
	Burst int
	// Namespace holds the leader Lease (unless LeaderElection.Namespace
	// says otherwise) and the webhook CA Secret. If empty, "outpost-system".
	Namespace string
	// Workers is the number of pods synced in parallel; zero means 2.
	Workers int

	LeaderElection LeaderElection
	Webhook        Webhook
	CSRApproval    CSRApproval
	Peers          Peers

	// MetricsAddress is where /metrics, /healthz and /readyz are served,
	// over plain HTTP. If empty, they are not served.
	MetricsAddress string
	// ShutdownTimeout bounds the graceful stop of each HTTP server; zero
	// means 5 s.
	ShutdownTimeout time.Duration
}

// LeaderElection configures the Lease that picks the one replica running
// the toleration controller and the CSR approval. Every replica serves the
// webhooks.
type LeaderElection struct {
	// Disabled runs the controllers without a Lease: for a single replica
	// only, since two would patch the same pods.
	Disabled bool
	// Namespace and Name of the Lease; empty means Config.Namespace and
	// "outpost-controller".
	Namespace string
	Name      string
	// LeaseDuration, RenewDeadline and RetryPeriod are as in every
	// Kubernetes controller; zero means 15 s, 10 s and 2 s.
	LeaseDuration time.Duration
	RenewDeadline time.Duration
	RetryPeriod   time.Duration
}

// Webhook configures the admission webhook server and its certificates.
type Webhook struct {
	// Address is the HTTPS listen address; empty means ":9443".
	Address string
	// Hosts are the names and IP addresses the apiserver uses to reach us,
	// put in the serving certificate. Empty means the in-cluster name of
	// the Service: "outpost-controller.<Namespace>.svc".
	Hosts []string
	// ConfigName is our MutatingWebhookConfiguration, whose caBundle we
	// keep current; empty means "outpost-controller".
	ConfigName string
	// SecretName is the Secret in Namespace holding the webhook CA; empty
	// means "outpost-controller-webhook-ca".
	SecretName string
	// CAValidity and CertValidity are the lifetimes of the CA and of the
	// serving certificates, each renewed with a third of it left; zero
	// means one year and seven days.
	CAValidity   time.Duration
	CertValidity time.Duration
	// CertCheckInterval is how often certificates are checked; zero means
	// one minute.
	CertCheckInterval time.Duration
}

// CSRApproval configures the approval of outposts' serving certificates
// for the in-cluster names of the apiserver (package csrapproval), which
// runs in the leader.
type CSRApproval struct {
	// Disabled leaves those CSRs to another approver.
	Disabled bool
	// ClusterDomain is the cluster's DNS domain, for the name
	// kubernetes.default.svc.<ClusterDomain>; empty means "cluster.local".
	ClusterDomain string
}

// Peers configures the peers' verdicts (package peerhealth): a quorum of
// the nodes at an unreachable autonomous node's site reporting it
// unreachable for GracePeriod withdraws its autonomy.
type Peers struct {
	// Disabled ignores the reports: autonomy as declared, always.
	Disabled bool
	// Namespace holds the reports; empty means peer.DefaultNamespace.
	Namespace string
	// SiteLabel names the Node label of a node's site; empty means
	// peer.DefaultSiteLabel. It must be the label the outposts use.
	SiteLabel string
	// GracePeriod is how long a quorum must report a node unreachable
	// before its autonomy is withdrawn; zero means 5 minutes.
	GracePeriod time.Duration
	// ReportValidity is how long a report counts after outpost-controller
	// saw it written, on its own clock; a node's leaseDurationSeconds only
	// shortens it. Zero means peerhealth.DefaultValidity (30 s, three of
	// the outposts' default --peer-report-interval); keep it above the
	// outposts' interval.
	ReportValidity time.Duration
	// Interval is the time between evaluations; zero means one second.
	Interval time.Duration
}

// Names of the defaults, shared with the manifests under deploy/.
const (
	DefaultNamespace  = "outpost-system"
	DefaultName       = "outpost-controller"
	DefaultSecretName = "outpost-controller-webhook-ca"
)

// withDefaults returns cfg with every zero value replaced by its default.
func (cfg Config) withDefaults() Config {
	set := func(v *string, def string) {
		if *v == "" {
			*v = def
		}
	}
	setD := func(v *time.Duration, def time.Duration) {
		if *v == 0 {
			*v = def
		}
	}
	if cfg.QPS == 0 {
		cfg.QPS = 20
	}
	if cfg.Burst == 0 {
		cfg.Burst = 40
	}
	set(&cfg.Namespace, DefaultNamespace)
	if cfg.Workers == 0 {
		cfg.Workers = 2
	}
	le := &cfg.LeaderElection
	set(&le.Namespace, cfg.Namespace)
	set(&le.Name, DefaultName)
	setD(&le.LeaseDuration, 15*time.Second)
	setD(&le.RenewDeadline, 10*time.Second)
	setD(&le.RetryPeriod, 2*time.Second)
	wh := &cfg.Webhook
	set(&wh.Address, ":9443")
	if len(wh.Hosts) == 0 {
		wh.Hosts = []string{DefaultName + "." + cfg.Namespace + ".svc"}
	}
	set(&wh.ConfigName, DefaultName)
	set(&wh.SecretName, DefaultSecretName)
	set(&cfg.CSRApproval.ClusterDomain, csrapproval.DefaultClusterDomain)
	set(&cfg.Peers.Namespace, peer.DefaultNamespace)
	set(&cfg.Peers.SiteLabel, peer.DefaultSiteLabel)
	setD(&cfg.Peers.GracePeriod, 5*time.Minute)
	setD(&cfg.Peers.ReportValidity, peerhealth.DefaultValidity)
	setD(&cfg.Peers.Interval, time.Second)
	setD(&cfg.ShutdownTimeout, 5*time.Second)
	return cfg
}

// Validate reports every problem with cfg, after defaults.
func (cfg Config) Validate() error {
	cfg = cfg.withDefaults()
	var errs []error
	if cfg.QPS < 0 || cfg.Burst < 0 {
		errs = append(errs, errors.New("QPS and burst must not be negative"))
	}
	if cfg.Workers < 0 {
		errs = append(errs, fmt.Errorf("workers %d: must be positive", cfg.Workers))
	}
	le := cfg.LeaderElection
	if !le.Disabled && !(le.RetryPeriod < le.RenewDeadline && le.RenewDeadline < le.LeaseDuration) {
		errs = append(errs, fmt.Errorf("leader election: want retry period (%v) < renew deadline (%v) < lease duration (%v)", le.RetryPeriod, le.RenewDeadline, le.LeaseDuration))
	}
	if _, _, err := net.SplitHostPort(cfg.Webhook.Address); err != nil {
		errs = append(errs, fmt.Errorf("webhook address: %w", err))
	}
	if cfg.MetricsAddress != "" {
		if _, _, err := net.SplitHostPort(cfg.MetricsAddress); err != nil {
			errs = append(errs, fmt.Errorf("metrics address: %w", err))
		}
	}
	if bad := validation.IsDNS1123Subdomain(cfg.CSRApproval.ClusterDomain); len(bad) > 0 {
		errs = append(errs, fmt.Errorf("cluster domain %q: %s", cfg.CSRApproval.ClusterDomain, strings.Join(bad, "; ")))
	}
	if bad := validation.IsQualifiedName(cfg.Peers.SiteLabel); len(bad) > 0 {
		errs = append(errs, fmt.Errorf("peer site label %q: %s", cfg.Peers.SiteLabel, strings.Join(bad, "; ")))
	}
	if bad := validation.IsDNS1123Label(cfg.Peers.Namespace); len(bad) > 0 {
		errs = append(errs, fmt.Errorf("peer namespace %q: %s", cfg.Peers.Namespace, strings.Join(bad, "; ")))
	}
	for _, d := range []time.Duration{cfg.Webhook.CAValidity, cfg.Webhook.CertValidity, cfg.Webhook.CertCheckInterval, cfg.ShutdownTimeout, cfg.Peers.GracePeriod, cfg.Peers.ReportValidity, cfg.Peers.Interval} {
		if d < 0 {
			errs = append(errs, fmt.Errorf("negative duration %v", d))
		}
	}
	return errors.Join(errs...)
}
