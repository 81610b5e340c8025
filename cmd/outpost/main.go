// Command outpost is the node-side gateway of Outpost: node components
// (kubelet, kube-proxy, CNI agents, coredns, operators) point their
// kubeconfig at it instead of at the cloud kube-apiserver.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/klog/v2"

	"github.com/outposthq/outpost/internal/config"
	"github.com/outposthq/outpost/internal/hub"
	"github.com/outposthq/outpost/internal/peer"
	"github.com/outposthq/outpost/internal/version"
)

const usage = `outpost: a caching gateway between node components and kube-apiserver.

Usage:
  outpost run [flags]      serve local clients, proxying to the apiserver(s)
  outpost status [flags]   show a running outpost's state (exit 0 online, 3 offline, 4 not ready)
  outpost cache ls|get|verify [flags]
                           read outpost's cache, running or not: its views, what it would
                           answer offline, its integrity ("outpost cache --help")
  outpost setup-node [--undo] [--dry-run] [flags]
                           put this kubeadm node behind outpost (systemd unit, kubelet's
                           kubeconfig), or take it out again
  outpost version          print the version
  outpost help             print this help; "outpost run --help" lists the flags
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run returns the process exit code: 0 done, 1 failed while running,
// 2 bad command line or configuration.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "version", "--version":
		fmt.Fprintf(stdout, "outpost %s\n", version.Version)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	case "run":
		cfg, err := parseRun(args[1:], stdout)
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		if err != nil {
			fmt.Fprintf(stderr, "outpost run: %v\nSee 'outpost run --help'.\n", err)
			return 2
		}
		return serve(cfg, stderr)
	case "status":
		return status(args[1:], stdout, stderr)
	case "cache":
		return cacheCmd(args[1:], stdout, stderr)
	case "setup-node":
		return setupNode(args[1:], stdout, stderr)
	default:
		fmt.Fprintf(stderr, "outpost: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

// parseRun parses the flags of `outpost run`. With --help it prints them to
// stdout and returns flag.ErrHelp; a bad flag is only returned, for the
// caller to report once.
func parseRun(args []string, stdout io.Writer) (config.Hub, error) {
	cfg := config.DefaultHub()
	cfg.NodeName, _ = os.Hostname()
	fs := flag.NewFlagSet("outpost run", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.StringVar(&cfg.Kubeconfig, "kubeconfig", cfg.Kubeconfig, "kubeconfig with the upstream apiserver(s) and this node's credentials (required)")
	fs.StringVar(&cfg.BootstrapKubeconfig, "bootstrap-kubeconfig", "", "kubeconfig with a bootstrap token: when --kubeconfig holds no valid node certificate, request one by CSR (kubelet TLS bootstrap), write --kubeconfig and rotate the certificate before expiry")
	fs.Func("server", "apiserver URL; repeat for several. Replaces the kubeconfig's server", func(s string) error {
		cfg.Servers = append(cfg.Servers, strings.TrimSpace(s))
		return nil
	})
	fs.StringVar(&cfg.NodeName, "node-name", cfg.NodeName, "name of this node (default: hostname)")
	fs.StringVar(&cfg.DataDir, "data-dir", cfg.DataDir, "state directory, created 0700")
	fs.StringVar(&cfg.SecureAddress, "secure-address", cfg.SecureAddress, "TLS listener for every client")
	fs.StringVar(&cfg.TLSCertFile, "tls-cert-file", "", "serving certificate of --secure-address (default: self-signed into --data-dir/pki, CA beside it)")
	fs.StringVar(&cfg.TLSKeyFile, "tls-private-key-file", "", "private key of --tls-cert-file")
	fs.BoolVar(&cfg.RotateServerCertificates, "rotate-server-certificates", false, "obtain and renew the serving certificate by a kubernetes.io/kubelet-serving CSR instead of self-signing (someone must approve it, as for kubelet)")
	fs.Func("node-ip", "an address of this node for the serving certificate's SANs; repeat or comma-separate", func(s string) error {
		cfg.NodeIPs = append(cfg.NodeIPs, splitList(s)...)
		return nil
	})
	fs.StringVar(&cfg.NodeLocalAddress, "node-local-address", "", "IP:port of a second TLS listener for in-cluster clients of this node, e.g. 169.254.2.1:10269 on lo (default off): kubelet then sees the kubernetes Service there and --service-proxies its endpoints; needs --rotate-server-certificates or --tls-cert-file from the cluster CA")
	fs.Func("service-proxies", `users whose view of the kubernetes Service's endpoints points at --node-local-address: comma-separated names or prefixes ending in "*" (default kube-proxy's service account and system:kube-proxy)`, func(s string) error {
		cfg.ServiceProxies = splitList(s)
		return nil
	})
	fs.StringVar(&cfg.ClusterDomain, "cluster-domain", cfg.ClusterDomain, "the cluster's DNS domain, for the serving certificate's kubernetes.default.svc.<domain> (with --node-local-address)")
	fs.Func("api-audiences", "audiences a never-seen service-account token must carry to be accepted offline (default: the cluster's token issuer); comma-separated", func(s string) error {
		cfg.APIAudiences = splitList(s)
		return nil
	})
	fs.StringVar(&cfg.EncryptionKeyFile, "encryption-key-file", "", "file with a 32-byte AES key (raw or base64): encrypts cached Secret data and recorded service-account tokens at rest")
	fs.StringVar(&cfg.ClientCAFile, "client-ca-file", "", "CA bundle that verifies client certificates (default: the kubeconfig's cluster CA)")
	fs.StringVar(&cfg.InsecureAddress, "insecure-address", "",
		"plain-HTTP listener, e.g. 127.0.0.1:10261 (default off). WARNING: everything arriving there is treated as this node's kubelet and forwarded with the node's credentials; bind it to loopback only")
	fs.StringVar(&cfg.AdminAddress, "admin-address", cfg.AdminAddress, "listener for /healthz, /readyz, /status, /metrics, /debug/cache/*, /debug/pprof (empty: off)")
	fs.StringVar(&cfg.LBMode, "lb-mode", cfg.LBMode, "choice among healthy apiservers: round-robin or priority (first healthy in --server order)")
	fs.DurationVar(&cfg.ProbeInterval, "probe-interval", cfg.ProbeInterval, "time between health probes of each apiserver")
	fs.DurationVar(&cfg.ProbeTimeout, "probe-timeout", cfg.ProbeTimeout, "timeout of one health probe")
	fs.DurationVar(&cfg.ProbeReadyInterval, "probe-ready-interval", cfg.ProbeReadyInterval, "time between /readyz probes of a healthy apiserver; the probes between them are HTTP/2 PINGs on a connection of their own, which cost the apiserver no request (0: every probe asks /readyz)")
	fs.IntVar(&cfg.FailureThreshold, "failure-threshold", cfg.FailureThreshold, "consecutive failed probes that mark an apiserver unhealthy (a failed real request marks it at once)")
	fs.IntVar(&cfg.SuccessThreshold, "success-threshold", cfg.SuccessThreshold, "consecutive good probes that mark an apiserver healthy again")
	fs.DurationVar(&cfg.ShutdownTimeout, "shutdown-timeout", cfg.ShutdownTimeout, "how long SIGTERM waits for in-flight requests before closing connections")
	fs.Func("record-identities", `whose answers are recorded into the cache: comma-separated user names or prefixes ending in "*" (default "*": every authenticated caller; "" records nobody)`, func(s string) error {
		cfg.RecordIdentities = splitList(s)
		return nil
	})
	fs.DurationVar(&cfg.FlapWindow, "flap-window", cfg.FlapWindow, "after an outage shorter than this, resume without re-listing cached views")
	fs.IntVar(&cfg.RelistRate, "relist-rate", cfg.RelistRate, "views re-listed per second after a reconnect")
	fs.Func("recording-budget", "bound on the bytes of answers held at once while they are copied for recording, e.g. 64Mi (past it copies are dropped and their views re-listed later); default 64Mi", func(s string) error {
		return parseSize(s, 1<<20, &cfg.RecordingBudget)
	})
	fs.BoolVar(&cfg.WatchCache, "watch-cache", cfg.WatchCache, "answer online, from one upstream list+watch per scope shared by this node's clients, what kube-apiserver answers from its watch cache (LIST at resourceVersion 0, watches from a known resourceVersion, WatchList); each caller is served only after an access review with its own credentials; --watch-cache=false sends every request upstream")
	fs.Func("watch-cache-size", "bound on the memory the watch cache holds, e.g. 64Mi (a scope that would pass it goes upstream); default 64Mi", func(s string) error {
		return parseSize(s, 1<<20, &cfg.WatchCacheSize)
	})
	fs.DurationVar(&cfg.WatchCacheRecheck, "watch-cache-recheck", 0, "how long the apiserver's answer to a caller's access review holds before it is asked again, at least 1s; a revoked caller stops being served within it (default 5m, as long as kube-apiserver's webhook authorizer keeps an allowed answer)")
	cfg.MemoryLimit = -1 // unset: --memory-limit's default, unless GOMEMLIMIT is set
	fs.Func("memory-limit", "soft limit of outpost's Go memory, e.g. 100Mi: past it the garbage collector works harder, so bursts of answers leave less garbage resident (default 100Mi, or $GOMEMLIMIT when set; 0: none)", func(s string) error {
		return parseSize(s, 0, &cfg.MemoryLimit)
	})
	pc := &cfg.Peers
	fs.StringVar(&pc.Address, "peer-address", "", "IP:port on the site's network where this node answers its peers' probes, over mutual TLS with node certificates (default off): nodes of one site check each other and report to the cloud, which tells a dead node from a cut link")
	fs.StringVar(&pc.SiteLabel, "peer-site-label", peer.DefaultSiteLabel, "Node label whose value names this node's site; its peers are the nodes with the same value")
	fs.StringVar(&pc.Namespace, "peer-namespace", peer.DefaultNamespace, "namespace of the peer reports (one Lease per node)")
	fs.DurationVar(&pc.ProbeInterval, "peer-probe-interval", 2*time.Second, "time between rounds of peer probes")
	fs.DurationVar(&pc.ProbeTimeout, "peer-probe-timeout", time.Second, "timeout of one peer probe")
	fs.IntVar(&pc.Fanout, "peer-fanout", 3, "peers probed per round, in turn: the site's load is its size times this, per round")
	fs.IntVar(&pc.FailureThreshold, "peer-failure-threshold", 3, "consecutive failed probes that make a peer unreachable")
	fs.DurationVar(&pc.ReportInterval, "peer-report-interval", 10*time.Second, "time between reports to the cloud; a report holds for three")
	fs.StringVar(&cfg.LogLevel, "log-level", cfg.LogLevel, "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, "Usage: outpost run [flags]\n\nFlags:\n")
			fs.SetOutput(stdout)
			fs.PrintDefaults()
		}
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	return cfg, cfg.Validate()
}

// parseSize reads a size flag (a Kubernetes quantity, such as 128Mi) of at
// least least bytes (or 0 when least is 0) into v.
func parseSize(s string, least int64, v *int64) error {
	q, err := resource.ParseQuantity(s)
	switch {
	case err != nil || q.Sign() < 0:
		return fmt.Errorf("want a size such as 128Mi")
	case least == 0 && q.IsZero():
	case q.Value() < max(least, 1):
		return fmt.Errorf("want a size of at least %s", resource.NewQuantity(max(least, 1), resource.BinarySI))
	}
	*v = q.Value()
	return nil
}

// splitList splits a comma-separated flag value, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func cond[T any](c bool, a, b T) T {
	if c {
		return a
	}
	return b
}

func serve(cfg config.Hub, stderr io.Writer) int {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	klog.SetSlogLogger(log.With("source", "client-go"))

	switch {
	case cfg.MemoryLimit >= 0:
		debug.SetMemoryLimit(cond(cfg.MemoryLimit == 0, math.MaxInt64, cfg.MemoryLimit))
	case os.Getenv("GOMEMLIMIT") == "":
		debug.SetMemoryLimit(config.DefaultMemoryLimit)
	}
	h, err := hub.New(cfg, log)
	if err != nil {
		log.Error("invalid configuration", "err", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// The first signal drains; a second one ends the process at once, as
	// the default action of the signal does.
	context.AfterFunc(ctx, stop)
	log.Info("outpost starting", "version", version.Version, "node", cfg.NodeName)
	if err := h.Run(ctx); err != nil {
		log.Error("outpost stopped", "err", err)
		return 1
	}
	log.Info("outpost stopped")
	return 0
}
