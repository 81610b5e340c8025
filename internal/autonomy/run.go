package autonomy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/client-go/tools/record"

	"github.com/outposthq/outpost/internal/autonomy/webhook"
)

// Webhook paths, as in deploy/webhook.yaml.
const (
	PathMutatePods           = "/mutate/pods"
	PathMutateEndpointSlices = "/mutate/endpointslices"
)

// Run runs outpost-controller until ctx is done: informers on nodes and
// bound pods, the webhook server with its certificates, the metrics and
// health server, and — in the replica holding the leader Lease — the
// toleration controller. Each runs under one errgroup; the first to fail
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

	events := record.NewBroadcaster(record.WithContext(ctx))
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

	var synced atomic.Bool
	admission := &Admission{
		Nodes:     nodes.Lister(),
		Pods:      pods.Lister(),
		GetNode:   getNodeFunc(client.CoreV1().Nodes().Get),
		Synced:    synced.Load,
		KeptReady: m.endpointsKept.Inc,
		Logger:    logger.With("component", "webhook"),
	}
	hooks := http.NewServeMux()
	hooks.Handle(PathMutatePods, &webhook.Handler{Mutator: admission.MutatePod, Logger: admission.Logger, Observe: m.observeReview("pods")})
	hooks.Handle(PathMutateEndpointSlices, &webhook.Handler{Mutator: admission.MutateEndpointSlice, Logger: admission.Logger, Observe: m.observeReview("endpointslices")})

	// Listen before starting anything, so that a taken port fails fast.
	hookLn, err := net.Listen("tcp", cfg.Webhook.Address)
	if err != nil {
		return fmt.Errorf("webhook server: %w", err)
	}
	hookSrv := &http.Server{
		Handler:           hooks,
		ReadHeaderTimeout: 10 * time.Second,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: certs.GetCertificate},
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelDebug), // TLS handshake noise
	}
	var metricsLn net.Listener
	if cfg.MetricsAddress != "" {
		if metricsLn, err = net.Listen("tcp", cfg.MetricsAddress); err != nil {
			hookLn.Close()
			return fmt.Errorf("metrics server: %w", err)
		}
	}

	health := leaderelection.NewLeaderHealthzAdaptor(20 * time.Second)
	g, ctx := errgroup.WithContext(ctx)
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	cachesSynced := make(chan struct{})
	g.Go(func() error {
		for _, ok := range factory.WaitForCacheSync(ctx.Done()) {
			if !ok {
				return nil // ctx is done
			}
		}
		synced.Store(true)
		close(cachesSynced)
		logger.Info("informer caches synced")
		return nil
	})
	g.Go(func() error { return certs.Run(ctx) })
	g.Go(func() error {
		return serve(ctx, hookSrv, hookLn, true, cfg.ShutdownTimeout)
	})
	if metricsLn != nil {
		g.Go(func() error {
			srv := &http.Server{Handler: adminMux(m, health, synced.Load, certs.Ready), ReadHeaderTimeout: 10 * time.Second}
			return serve(ctx, srv, metricsLn, false, cfg.ShutdownTimeout)
		})
	}
	g.Go(func() error {
		select {
		case <-ctx.Done():
			return nil
		case <-cachesSynced:
		}
		if cfg.LeaderElection.Disabled {
			m.leader.Set(1)
			return ctrl.Run(ctx, cfg.Workers)
		}
		return lead(ctx, cfg.LeaderElection, client, recorder, health, logger, func(ctx context.Context) error {
			m.leader.Set(1)
			defer m.leader.Set(0)
			return ctrl.Run(ctx, cfg.Workers)
		})
	})
	logger.Info("outpost-controller running", "webhook", hookLn.Addr().String(), "hosts", cfg.Webhook.Hosts,
		"metrics", cfg.MetricsAddress, "leaderElection", !cfg.LeaderElection.Disabled)
	return g.Wait()
}

// lead campaigns for the Lease and runs work while holding it. It returns
// nil when ctx is done and ErrLeadershipLost when the Lease is lost first;
// either way work has returned.
func lead(ctx context.Context, cfg LeaderElection, client kubernetes.Interface, recorder record.EventRecorder,
	health *leaderelection.HealthzAdaptor, logger *slog.Logger, work func(context.Context) error) error {
	id, err := identity()
	if err != nil {
		return err
	}
	leading := make(chan context.Context, 1)
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock: &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Namespace: cfg.Namespace, Name: cfg.Name},
			Client:     client.CoordinationV1(),
			LockConfig: resourcelock.ResourceLockConfig{Identity: id, EventRecorder: recorder},
		},
		LeaseDuration: cfg.LeaseDuration,
		RenewDeadline: cfg.RenewDeadline,
		RetryPeriod:   cfg.RetryPeriod,
		// Release on shutdown, so that the next leader need not wait for
		// the Lease to expire.
		ReleaseOnCancel: true,
		WatchDog:        health,
		Name:            DefaultName,
		Callbacks: leaderelection.LeaderCallbacks{
			// Only a signal: the work runs below, where we can wait for it.
			OnStartedLeading: func(ctx context.Context) { leading <- ctx },
			OnStoppedLeading: func() {},
			OnNewLeader: func(who string) {
				logger.Info("leader", "identity", who, "self", who == id)
			},
		},
	})
	if err != nil {
		return fmt.Errorf("leader election: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		le.Run(ctx)
	}()
	var workErr error
	select {
	case <-done:
	case lctx := <-leading:
		logger.Info("acquired leader lease", "lease", cfg.Namespace+"/"+cfg.Name, "identity", id)
		workErr = work(lctx)
		<-done
	}
	if ctx.Err() != nil {
		return workErr
	}
	return errors.Join(ErrLeadershipLost, workErr)
}

// identity names this replica in the Lease: the host (the pod name in a
// cluster) and a random suffix, so that a restarted process does not take
// over the Lease of its previous life.
func identity() (string, error) {
	host, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("leader election identity: %w", err)
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return host + "_" + hex.EncodeToString(b), nil
}

// serve runs srv on ln until ctx is done, then shuts it down, forcing the
// stop after timeout.
func serve(ctx context.Context, srv *http.Server, ln net.Listener, useTLS bool, timeout time.Duration) error {
	errc := make(chan error, 1)
	go func() {
		if useTLS {
			errc <- srv.ServeTLS(ln, "", "")
		} else {
			errc <- srv.Serve(ln)
		}
	}()
	select {
	case err := <-errc:
		return fmt.Errorf("serving on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	<-errc // http.ErrServerClosed
	return nil
}

// adminMux serves /metrics, /healthz and /readyz.
//
// /healthz fails only when this replica holds the Lease but has not renewed
// it in time (a wedged leader should be restarted). /readyz succeeds once
// the caches have synced and a serving certificate exists: only then may
// the Service send us admission reviews.
func adminMux(m *metrics, health *leaderelection.HealthzAdaptor, synced, certReady func() bool) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if err := health.Check(r); err != nil {
			http.Error(w, "unhealthy: "+err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		switch {
		case !synced():
			http.Error(w, "not ready: informer caches not synced", http.StatusServiceUnavailable)
		case !certReady():
			http.Error(w, "not ready: no webhook serving certificate", http.StatusServiceUnavailable)
		default:
			fmt.Fprintln(w, "ok")
		}
	})
	return mux
}

func restConfig(cfg Config) (*rest.Config, error) {
	var rc *rest.Config
	var err error
	if cfg.Kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("loading client configuration: %w", err)
	}
	rc.QPS, rc.Burst = cfg.QPS, cfg.Burst
	rc.UserAgent = DefaultName
	return rc, nil
}

// boundPods returns the factory's pod informer, restricted to pods bound to
// a node: unbound pods are none of our business, and a large cluster may
// have many pending ones.
func boundPods(factory informers.SharedInformerFactory) coreinformers.PodInformer {
	return &podInformer{factory: factory}
}

// podInformer is coreinformers.PodInformer with a field selector.
type podInformer struct {
	factory informers.SharedInformerFactory
}

func (p *podInformer) Informer() cache.SharedIndexInformer {
	return p.factory.InformerFor(&corev1.Pod{}, func(client kubernetes.Interface, resync time.Duration) cache.SharedIndexInformer {
		return coreinformers.NewFilteredPodInformer(client, metav1.NamespaceAll, resync, cache.Indexers{}, func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermNotEqualSelector("spec.nodeName", "").String()
		})
	})
}

func (p *podInformer) Lister() corelisters.PodLister {
	return corelisters.NewPodLister(p.Informer().GetIndexer())
}

// stripManagedFields drops managedFields from cached objects: we never read
// them, and they are a large part of every object.
func stripManagedFields(obj any) (any, error) {
	if a, err := meta.Accessor(obj); err == nil {
		a.SetManagedFields(nil)
	}
	return obj, nil
}
