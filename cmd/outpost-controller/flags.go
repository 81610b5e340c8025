package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/outposthq/outpost/internal/cloud/autonomy"
	"github.com/outposthq/outpost/internal/cloud/csrapproval"
	"github.com/outposthq/outpost/internal/cloud/peerhealth"
	"github.com/outposthq/outpost/internal/peer"
)

const usage = `outpost-controller: keeps pods of autonomous edge nodes from being evicted,
and behind their Services, while the nodes are cut off from the cloud.

Usage:
  outpost-controller run [flags]   run the controller and its webhooks
  outpost-controller [flags]       the same
  outpost-controller version       print the version
  outpost-controller help          print this help; "outpost-controller run --help" lists the flags

A node is autonomous with the annotation outpost.io/autonomy-duration (a
duration such as 72h; 0 means never evict); node.openyurt.io/autonomy-duration
and node.beta.openyurt.io/autonomy=true are honoured too, in that order.

The leader also approves the serving certificates that outposts request
(signer kubernetes.io/kubelet-serving) for the names by which pods reach the
apiserver, kubernetes.default.svc and the kubernetes Service's ClusterIP, when
the rest of the request names only the requesting node's own names and
addresses; any other request for those names is denied, with the reason.

Outposts at one site (--peer-site-label, topology.kubernetes.io/zone by
default) probe each other and report what they see. When a quorum of a
silent node's peers (a majority, at least 2) cannot reach it for
--peer-grace-period, its autonomy is withdrawn and Kubernetes evicts its pods
as on any node; one peer that reaches it keeps them.
`

// options are the parsed command line: the controller's configuration and
// the logging, which belongs to the process.
type options struct {
	autonomy.Config
	logLevel slog.Level
	logJSON  bool
}

// parseRun parses the flags of run. Help goes to stdout; errors are
// returned, for the caller to print once.
func parseRun(args []string, stdout io.Writer) (options, error) {
	var o options
	c := &o.Config
	fs := flag.NewFlagSet("outpost-controller run", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster service account)")
	qps := fs.Float64("kube-api-qps", 20, "queries per second to the apiserver")
	fs.IntVar(&c.Burst, "kube-api-burst", 40, "burst of queries to the apiserver")
	fs.StringVar(&c.Namespace, "namespace", autonomy.DefaultNamespace, "namespace of the leader Lease and the webhook CA Secret")
	fs.IntVar(&c.Workers, "workers", 2, "pods synced in parallel")

	leaderElect := fs.Bool("leader-elect", true, "run the toleration controller and the CSR approval only in the replica holding the Lease (disable only with one replica)")
	le := &c.LeaderElection
	fs.StringVar(&le.Namespace, "leader-elect-namespace", "", "namespace of the leader Lease (default: --namespace)")
	fs.StringVar(&le.Name, "leader-elect-name", autonomy.DefaultName, "name of the leader Lease")
	fs.DurationVar(&le.LeaseDuration, "leader-elect-lease-duration", 15*time.Second, "how long non-leaders wait before taking over an unrenewed Lease")
	fs.DurationVar(&le.RenewDeadline, "leader-elect-renew-deadline", 10*time.Second, "how long the leader retries renewing before giving up")
	fs.DurationVar(&le.RetryPeriod, "leader-elect-retry-period", 2*time.Second, "time between attempts to acquire or renew the Lease")

	wh := &c.Webhook
	fs.StringVar(&wh.Address, "webhook-address", ":9443", "HTTPS listen address of the admission webhooks")
	fs.Func("webhook-host", "DNS name or IP address by which the apiserver reaches the webhooks, for the serving certificate; repeat or separate with commas (default: outpost-controller.<namespace>.svc)", func(s string) error {
		for h := range strings.SplitSeq(s, ",") {
			if h = strings.TrimSpace(h); h == "" {
				return fmt.Errorf("empty host in %q", s)
			}
			wh.Hosts = append(wh.Hosts, h)
		}
		return nil
	})
	fs.StringVar(&wh.ConfigName, "webhook-config-name", autonomy.DefaultName, "MutatingWebhookConfiguration whose caBundle the controller keeps current")
	fs.StringVar(&wh.SecretName, "webhook-secret-name", autonomy.DefaultSecretName, "Secret in --namespace holding the webhook CA (created if missing)")
	fs.DurationVar(&wh.CAValidity, "webhook-ca-validity", 365*24*time.Hour, "lifetime of the webhook CA; rotated with a third left")
	fs.DurationVar(&wh.CertValidity, "webhook-cert-validity", 7*24*time.Hour, "lifetime of the serving certificate; renewed with a third left")

	approveCSRs := fs.Bool("approve-outpost-serving-csrs", true, "in the leader, approve outposts' kubelet-serving CSRs for their own node and the in-cluster names of the apiserver, and deny any other CSR claiming those names")
	fs.StringVar(&c.CSRApproval.ClusterDomain, "cluster-domain", csrapproval.DefaultClusterDomain, "the cluster's DNS domain, for the name kubernetes.default.svc.<domain> in outposts' serving certificates")

	peerVerdicts := fs.Bool("peer-verdicts", true, "withdraw the autonomy of an unreachable node when a quorum of the nodes at its site (a majority, at least 2) report it unreachable for --peer-grace-period; with no such quorum autonomy holds")
	fs.StringVar(&c.Peers.Namespace, "peer-namespace", peer.DefaultNamespace, "namespace of the outposts' peer reports (one Lease per node)")
	fs.StringVar(&c.Peers.SiteLabel, "peer-site-label", peer.DefaultSiteLabel, "Node label whose value names a node's site; the outposts' --peer-site-label")
	fs.DurationVar(&c.Peers.GracePeriod, "peer-grace-period", 5*time.Minute, "how long a quorum of a node's peers must report it unreachable before its autonomy is withdrawn and Kubernetes evicts its pods")
	fs.DurationVar(&c.Peers.ReportValidity, "peer-report-validity", peerhealth.DefaultValidity, "how long a peer report counts after outpost-controller saw it written, on its own clock (a node's leaseDurationSeconds may only shorten it); keep it above the outposts' --peer-report-interval")

	fs.StringVar(&c.MetricsAddress, "metrics-address", ":8080", "HTTP listen address of /metrics, /healthz and /readyz (empty: off)")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", 5*time.Second, "how long the servers drain requests on SIGTERM")
	fs.TextVar(&o.logLevel, "log-level", slog.LevelInfo, "debug, info, warn or error")
	logFormat := fs.String("log-format", "text", "text or json")

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, "Usage: outpost-controller run [flags]\n\nFlags:\n")
			fs.SetOutput(stdout)
			fs.PrintDefaults()
		}
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	c.QPS = float32(*qps)
	le.Disabled = !*leaderElect
	c.CSRApproval.Disabled = !*approveCSRs
	c.Peers.Disabled = !*peerVerdicts
	switch *logFormat {
	case "text":
	case "json":
		o.logJSON = true
	default:
		return o, fmt.Errorf("invalid value %q for flag -log-format: want text or json", *logFormat)
	}
	return o, c.Validate()
}
