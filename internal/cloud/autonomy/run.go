package autonomy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/record"

	"github.com/outposthq/outpost/internal/cloud/autonomy/webhook"
	"github.com/outposthq/outpost/internal/cloud/csrapproval"
	"github.com/outposthq/outpost/internal/cloud/peerhealth"
	"github.com/outposthq/outpost/internal/peer"
	"github.com/outposthq/outpost/internal/server"
)

// Webhook paths, as in deploy/webhook.yaml.
const (
	PathMutatePods           = "/mutate/pods"
	PathMutateEndpointSlices = "/mutate/endpointslices"
)

// Run runs outpost-controller until ctx is done: informers on nodes and
// bound pods, the webhook server with its certificates, the metrics and
// health server, the peers' verdicts on unreachable autonomous nodes
// (package peerhealth, on the reports' Leases, whose informer alone waits
// for them: readiness and the webhooks do not), and — in the replica holding the leader Lease — the
// toleration controller and, unless disabled, the approval of outposts'
// serving CSRs (package csrapproval). Each runs under one errgroup; the first to fail
// stops the others. Run returns nil after a clean shutdown, and
// ErrLeadershipLost if the Lease was lost while ctx was live.
func Run(ctx context.Context, cfg Config, logger *slog.Logger) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("invalid configuration: %w", err)
	}
	cfg = cfg.withDefaults()

	restCfg, err := restConfig(cfg)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("building client: %w", err)
	}

	factory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(stripManagedFields))
	nodes := factory.Core().V1().Nodes()
	pods := boundPods(factory)

	// Not bound to ctx: the Lease release on shutdown records an event too.
	events := record.NewBroadcaster()
	defer events.Shutdown()
	events.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	recorder := events.NewRecorder(scheme.Scheme, corev1.EventSource{Component: DefaultName})

	ctrl, err := NewController(client, nodes, pods, recorder, logger.With("component", "controller"))
	if err != nil {
		return err
	}
	certs := &webhook.Certs{
		Client:       client,
		Namespace:    cfg.Namespace,
		SecretName:   cfg.Webhook.SecretName,
		ConfigName:   cfg.Webhook.ConfigName,
		Hosts:        cfg.Webhook.Hosts,
		CAValidity:   cfg.Webhook.CAValidity,
		CertValidity: cfg.Webhook.CertValidity,
		Interval:     cfg.Webhook.CertCheckInterval,
		Logger:       logger.With("component", "certs"),
	}
	m := newMetrics(nodes.Lister(), ctrl.queueLen, certs.NotAfter)
	ctrl.metrics = m

	// The peers' verdicts: evaluated in every replica, since every replica
	// answers admission reviews; announced as Events by the leader only.
	var leading atomic.Bool
	var reports informers.SharedInformerFactory
	var tracker *peerhealth.Tracker
	if !cfg.Peers.Disabled {
		reports = informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(cfg.Peers.Namespace), informers.WithTransform(stripManagedFields))
		tracker = &peerhealth.Tracker{
			Nodes:     nodes.Lister(),
			Reports:   reports.Coordination().V1().Leases().Lister().Leases(cfg.Peers.Namespace),
			SiteLabel: cfg.Peers.SiteLabel,
			Grace:     cfg.Peers.GracePeriod,
			Validity:  cfg.Peers.ReportValidity,
			Interval:  cfg.Peers.Interval,
			Candidate: peerCandidate,
			Changed:   ctrl.enqueueNodePods,
			Recorder:  recorder,
			Announce:  leading.Load,
			Metrics:   m.peers,
			Log:       logger.With("component", "peerhealth"),
		}
		ctrl.peers = tracker
		warnPeers(cfg.Peers, logger)
	}
	var approver *csrapproval.Controller
	if !cfg.CSRApproval.Disabled {
		approver = csrapproval.New(client, cfg.CSRApproval.ClusterDomain, recorder, logger.With("component", "csrapproval"), m.observeCSR)
		for _, v := range []csrapproval.Verdict{csrapproval.Approve, csrapproval.Deny} {
			m.csrDecisions.WithLabelValues(v.String()) // exported as 0 from the start
		}
	}

	var synced atomic.Bool
	admission := &Admission{
		Nodes:     nodes.Lister(),
		Pods:      pods.Lister(),
		GetNode:   getNodeFunc(client.CoreV1().Nodes().Get),
		Synced:    synced.Load,
		KeptReady: m.endpointsKept.Inc,
		Logger:    logger.With("component", "webhook"),
	}
	if tracker != nil {
		admission.Peers = tracker
	}
	hooks := http.NewServeMux()
	hooks.Handle(PathMutatePods, &webhook.Handler{Mutator: admission.MutatePod, Logger: admission.Logger, Observe: m.observeReview("pods")})
	hooks.Handle(PathMutateEndpointSlices, &webhook.Handler{Mutator: admission.MutateEndpointSlice, Logger: admission.Logger, Observe: m.observeReview("endpointslices")})

	health := leaderelection.NewLeaderHealthzAdaptor(20 * time.Second)
	gate := newNamespaceGate(client, cfg.Namespace, logger)

	// Listen before starting anything, so that a taken port fails fast.
	hookLn, err := net.Listen("tcp", cfg.Webhook.Address)
	if err != nil {
		return fmt.Errorf("webhook server: %w", err)
	}
	hookSrv := &server.Server{
		Name:            "webhook",
		Listener:        hookLn,
		Handler:         hooks,
		TLS:             &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: certs.GetCertificate},
		ShutdownTimeout: cfg.ShutdownTimeout,
		Log:             logger,
	}
	var metricsSrv *server.Server
	if cfg.MetricsAddress != "" {
		metricsLn, err := net.Listen("tcp", cfg.MetricsAddress)
		if err != nil {
			hookLn.Close()
			return fmt.Errorf("metrics server: %w", err)
		}
		metricsSrv = &server.Server{
			Name:            "metrics",
			Listener:        metricsLn,
			Handler:         adminMux(m, health, gate.Problem, synced.Load, certs.Ready),
			ShutdownTimeout: cfg.ShutdownTimeout,
			Log:             logger,
		}
	}

	g, ctx := errgroup.WithContext(ctx)
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if reports != nil {
		watchReportErrors(reports, cfg.Peers.Namespace, logger)
		reports.Start(ctx.Done())
		defer reports.Shutdown()
	}
	cachesSynced := syncCaches(ctx, g, factory, &synced, logger)
	if tracker != nil {
		g.Go(func() error { return runTracker(ctx, tracker, reports, cachesSynced, cfg.Peers.Namespace, logger) })
	}
	g.Go(func() error { return gate.Run(ctx) })
	g.Go(func() error {
		select {
		case <-ctx.Done():
			return nil
		case <-gate.Open():
		}
		return certs.Run(ctx)
	})
	g.Go(func() error { return hookSrv.Run(ctx) })
	if metricsSrv != nil {
		g.Go(func() error { return metricsSrv.Run(ctx) })
	}
	g.Go(func() error {
		for _, ready := range []<-chan struct{}{cachesSynced, gate.Open()} {
			select {
			case <-ctx.Done():
				return nil
			case <-ready:
			}
		}
		// What only one replica may do: patch pods, decide CSRs.
		work := func(ctx context.Context) error {
			g, ctx := errgroup.WithContext(ctx)
			g.Go(func() error { return ctrl.Run(ctx, cfg.Workers) })
			if approver != nil {
				g.Go(func() error { return approver.Run(ctx) })
			}
			return g.Wait()
		}
		if cfg.LeaderElection.Disabled {
			m.leader.Set(1)
			leading.Store(true)
			return work(ctx)
		}
		return lead(ctx, cfg.LeaderElection, client, recorder, health, logger, func(ctx context.Context) error {
			m.leader.Set(1)
			leading.Store(true)
			defer m.leader.Set(0)
			defer leading.Store(false)
			return work(ctx)
		})
	})
	logger.Info("outpost-controller running", "webhook", hookLn.Addr().String(), "hosts", cfg.Webhook.Hosts,
		"metrics", cfg.MetricsAddress, "leaderElection", !cfg.LeaderElection.Disabled,
		"approveServingCSRs", !cfg.CSRApproval.Disabled, "clusterDomain", cfg.CSRApproval.ClusterDomain,
		"peerVerdicts", !cfg.Peers.Disabled, "peerGracePeriod", cfg.Peers.GracePeriod, "peerReportValidity", cfg.Peers.ReportValidity)
	return g.Wait()
}

// syncCaches waits in g for the informers of nodes and pods, which readiness,
// the webhooks and the toleration controller need, and then sets synced and
// closes the channel it returns. It does not wait for the reports' informer:
// a cluster without the reports' RBAC must not stop the rest.
func syncCaches(ctx context.Context, g *errgroup.Group, factory informers.SharedInformerFactory, synced *atomic.Bool, logger *slog.Logger) <-chan struct{} {
	done := make(chan struct{})
	g.Go(func() error {
		for _, ok := range factory.WaitForCacheSync(ctx.Done()) {
			if !ok {
				return nil // ctx is done
			}
		}
		synced.Store(true)
		close(done)
		logger.Info("informer caches synced")
		return nil
	})
	return done
}

// runTracker runs the peers' verdicts once the nodes' cache and the
// reports' have synced. Until then every verdict is unknown (the Tracker
// holds none, so Withdrawn says false): autonomy as declared.
func runTracker(ctx context.Context, tracker *peerhealth.Tracker, reports informers.SharedInformerFactory, nodesSynced <-chan struct{}, namespace string, logger *slog.Logger) error {
	select {
	case <-ctx.Done():
		return nil
	case <-nodesSynced:
	}
	for _, ok := range reports.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return nil
		}
	}
	logger.Info("peer reports synced: peer verdicts on", "namespace", namespace)
	return tracker.Run(ctx)
}

// watchReportErrors logs, once, why the reports' informer cannot list or
// watch them (most often: deploy/rbac.yaml not applied, or an older one).
// It must be called before the factory starts.
func watchReportErrors(reports informers.SharedInformerFactory, namespace string, logger *slog.Logger) {
	var once sync.Once
	inf := reports.Coordination().V1().Leases().Informer()
	_ = inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		cache.DefaultWatchErrorHandler(ctx, r, err)
		if errors.Is(err, io.EOF) || apierrors.IsResourceExpired(err) || apierrors.IsGone(err) {
			return // the ordinary end of a watch
		}
		once.Do(func() {
			msg := "cannot read the peer reports: peer verdicts stay unknown (autonomy as declared) until they can be read; retrying"
			if apierrors.IsForbidden(err) {
				msg = "cannot read the peer reports (forbidden: is deploy/rbac.yaml applied?): peer verdicts stay unknown (autonomy as declared) until they can be read; retrying"
			}
			logger.Error(msg, "namespace", namespace, "err", err)
		})
	})
}

// warnPeers says at startup what weakens the peers' verdicts in cfg.
func warnPeers(cfg Peers, logger *slog.Logger) {
	if peer.NodeMaySetLabel(cfg.SiteLabel) {
		logger.Warn("the peer site label is one a node may set on its own Node (NodeRestriction allows it): nodes could move themselves into a site and make a quorum there; "+
			"label sites with node-restriction.kubernetes.io/<name> and pass it as --peer-site-label here and on the outposts", "peerSiteLabel", cfg.SiteLabel)
	}
	if cfg.Namespace != peer.DefaultNamespace {
		logger.Warn("the admission policy binding of deploy/peer-reports.yaml names namespace "+peer.DefaultNamespace+
			": bind it to --peer-namespace too, or nodes may write each other's reports", "peerNamespace", cfg.Namespace)
	}
}

// peerCandidate is whom the peers' verdicts are for: a node autonomous by
// its annotations that the cloud no longer hears from.
func peerCandidate(node *corev1.Node) bool {
	p, _ := NodePolicy(node)
	return p.Autonomous && unreachable(node)
}
