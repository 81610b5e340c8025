// Package hub assembles the outpost node hub from its configuration: the
// upstream pool, the health monitor, the authenticator, the proxy and the
// listeners, and runs them under one errgroup until the context ends.
package hub

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/internal/certs"
	"github.com/outposthq/outpost/internal/config"
	"github.com/outposthq/outpost/internal/converge"
	"github.com/outposthq/outpost/internal/health"
	"github.com/outposthq/outpost/internal/identity"
	"github.com/outposthq/outpost/internal/local"
	"github.com/outposthq/outpost/internal/memory"
	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/peer"
	"github.com/outposthq/outpost/internal/proxy"
	"github.com/outposthq/outpost/internal/reader"
	"github.com/outposthq/outpost/internal/recorder"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/rewrite"
	"github.com/outposthq/outpost/internal/seal"
	"github.com/outposthq/outpost/internal/server"
	"github.com/outposthq/outpost/internal/share"
	"github.com/outposthq/outpost/internal/store"
	"github.com/outposthq/outpost/internal/upstream"
)

// Hub is a configured outpost, ready to Run.
type Hub struct {
	cfg     config.Hub
	log     *slog.Logger
	pool    *upstream.Pool
	monitor *health.Monitor
	auth    *identity.Authenticator
	metrics *metrics.Metrics
	reg     *prometheus.Registry
	tls     *tls.Config
	store   *store.Store // set by Run
	restCfg *rest.Config // upstream address and CA

	// With --bootstrap-kubeconfig: the bootstrap credentials and the
	// rotator of the node client certificate; nil otherwise.
	bootstrap *rest.Config
	nodeCert  *certs.Rotator
	// serving renews the serving certificate by CSR with
	// --rotate-server-certificates; nil otherwise.
	serving *certs.Rotator
	// sealKey encrypts sensitive cache records (--encryption-key-file).
	sealKey *seal.Key
	// upstreamTLS carries the node's credentials upstream; with
	// --peer-address the peer checks present the same certificate.
	upstreamTLS *tls.Config
	peerMetrics *peer.Metrics

	gaugeMu sync.Mutex // orders the health gauges' updates
	probes  probeLog   // each apiserver's last probe, for /status
	// tokens are the bearer tokens callers used lately, in memory only.
	tokens identity.Tokens

	// Listeners, if set, replace listening on the configured addresses
	// (tests bind :0 themselves). Keys: "secure", "insecure", "admin".
	Listeners map[string]net.Listener
}

// New checks cfg and builds a Hub. It starts nothing.

// relistHeadStart is converge.Converger.RelistHeadStart: informers whose
// watches broke with the link re-list within a second or two of its
// return (client-go's backoff starts at 800 ms).
const relistHeadStart = 3 * time.Second

func New(cfg config.Hub, log *slog.Logger) (*Hub, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating data dir: %w", err)
	}
	if err := os.Chmod(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("securing data dir: %w", err)
	}
	h := &Hub{cfg: cfg, log: log}
	restCfg, upstreamTLS, err := h.upstreamCredentials()
	if err != nil {
		return nil, err
	}
	servers := cfg.Servers
	if len(servers) == 0 {
		servers = []string{restCfg.Host}
	}
	var urls []*url.URL
	for _, s := range servers {
		u, err := url.Parse(s)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("apiserver URL %q is not valid", s)
		}
		urls = append(urls, u)
	}
	pool, err := upstream.New(urls, upstream.Credentials{TLS: upstreamTLS, Token: restCfg.BearerToken}, cfg.LBMode)
	if err != nil {
		return nil, err
	}

	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	h.pool, h.metrics, h.reg, h.restCfg = pool, m, reg, restCfg
	h.upstreamTLS, h.peerMetrics = upstreamTLS, peer.NewMetrics(reg)

	h.monitor = &health.Monitor{
		Count:            pool.Len(),
		Probe:            pool.Probe,
		Ping:             pool.Ping,
		ReadyInterval:    cfg.ProbeReadyInterval,
		Reachable:        pool.Handshake,
		Interval:         cfg.ProbeInterval,
		Timeout:          cfg.ProbeTimeout,
		FailureThreshold: cfg.FailureThreshold,
		SuccessThreshold: cfg.SuccessThreshold,
		OnChange:         h.serverChanged,
		OnProbe: func(i int, result health.ProbeResult) {
			m.UpstreamProbes.WithLabelValues(pool.Name(i), string(result)).Inc()
			h.probes.probed(i, result)
		},
	}
	names := make([]string, pool.Len())
	for i := range names {
		names[i] = pool.Name(i)
	}
	h.probes.init(names)
	pool.SetHealth(h.monitor)
	for i := 0; i < pool.Len(); i++ {
		m.UpstreamHealthy.WithLabelValues(pool.Name(i)).Set(1)
	}
	m.Online.Set(1)

	clientCA, err := h.clientCAs(restCfg)
	if err != nil {
		return nil, err
	}
	if err := checkPeers(cfg, clientCA, upstreamTLS); err != nil {
		return nil, err
	}
	h.auth = &identity.Authenticator{NodeName: cfg.NodeName, ClientCAs: clientCA, Online: h.monitor.Online,
		Review: identity.ReviewThrough(func(token string) http.RoundTripper {
			return pool.As(request.Identity{Kind: request.BearerToken, Token: token})
		})}

	if cfg.EncryptionKeyFile != "" {
		// Checked here, so that a bad key file is a configuration error.
		if h.sealKey, err = seal.LoadKey(cfg.EncryptionKeyFile); err != nil {
			return nil, err
		}
	}
	if cfg.SecureAddress != "" {
		if h.tls, err = h.servingTLS(); err != nil {
			return nil, err
		}
	}
	return h, nil
}

func (h *Hub) clientCAs(restCfg *rest.Config) (*x509.CertPool, error) {
	data := restCfg.CAData
	var err error
	switch {
	case h.cfg.ClientCAFile != "":
		data, err = os.ReadFile(h.cfg.ClientCAFile)
	case len(data) == 0 && restCfg.CAFile != "":
		data, err = os.ReadFile(restCfg.CAFile)
	}
	if err != nil {
		return nil, fmt.Errorf("reading client CA: %w", err)
	}
	if len(data) == 0 {
		h.log.Warn("no client CA (neither --client-ca-file nor a CA in the kubeconfig): client certificates will be refused")
		return nil, nil
	}
	pool, err := certs.LoadPool(data)
	if err != nil {
		return nil, fmt.Errorf("loading client CA: %w", err)
	}
	return pool, nil
}

func (h *Hub) servingTLS() (*tls.Config, error) {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Ask for a certificate but verify it in the authenticator, as
		// kube-apiserver does, so a wrong one gets a 401 Status and not a
		// failed handshake.
		ClientAuth: tls.RequestClientCert,
	}
	certFile, keyFile := h.cfg.TLSCertFile, h.cfg.TLSKeyFile
	if certFile == "" {
		// Self-signed, with its CA beside it: what is served until (and
		// unless) a CSR-issued certificate is held.
		var err error
		certFile, keyFile, err = certs.SelfSigned(filepath.Join(h.cfg.DataDir, "pki"), h.servingHosts())
		if err != nil {
			return nil, fmt.Errorf("creating self-signed serving certificate: %w", err)
		}
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("loading serving certificate: %w", err)
	}
	if h.cfg.TLSCertFile != "" || !h.cfg.RotateServerCertificates {
		cfg.Certificates = []tls.Certificate{pair}
		return cfg, nil
	}
	h.serving = h.servingRotator()
	if err := h.serving.Load(); err != nil {
		return nil, err
	}
	cfg.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		if c := h.serving.Current(); c != nil {
			return c, nil
		}
		return &pair, nil
	}
	return cfg, nil
}

func (h *Hub) serverChanged(i int, healthy bool, err error) {
	name := h.pool.Name(i)
	h.probes.changed(i, healthy, err)
	state := "unhealthy"
	if healthy {
		state = "healthy"
		h.log.Info("apiserver healthy", "server", name)
	} else {
		h.log.Warn("apiserver unhealthy; closing its connections", "server", name, "err", err)
		// Open watches on it end now, and their clients re-watch through
		// a healthy server instead of waiting on a dead connection.
		h.pool.CloseConnections(i)
	}
	h.metrics.UpstreamTransitions.WithLabelValues(name, state).Inc()
	// Changes of several servers are reported concurrently: the gauges
	// are set from the monitor's current state, one report at a time, so
	// that the last one written is never an older state.
	h.gaugeMu.Lock()
	defer h.gaugeMu.Unlock()
	h.metrics.UpstreamHealthy.WithLabelValues(name).Set(boolGauge(h.monitor.Healthy(i)))
	h.metrics.Online.Set(boolGauge(h.monitor.Online()))
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Run serves until ctx is done, then drains and stops everything it started.
func (h *Hub) Run(ctx context.Context) (err error) {
	opts := store.Options{Logger: h.log}
	if h.sealKey != nil {
		opts.Sealer = h.sealKey
		opts.Sealed = recorder.SealRule()
	}
	st, err := store.Open(filepath.Join(h.cfg.DataDir, "cache.db"), opts)
	if err != nil {
		return fmt.Errorf("opening cache: %w", err)
	}
	defer func() {
		if cerr := st.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("closing cache: %w", cerr)
		}
	}()
	h.store = st
	defer h.pool.ClosePings()
	mem := &memory.Releaser{Released: func(reason string) { h.metrics.MemoryReleases.WithLabelValues(reason).Inc() }}
	writes := &local.Writer{Store: st, Log: h.log, Metrics: h.metrics, Node: h.cfg.NodeName}
	writes.Load()
	rec := &recorder.Recorder{Store: st, Log: h.log, Metrics: h.metrics, Record: recordFilter(h.cfg.RecordIdentities),
		RecordsToken: writes.Records, LargeAnswer: mem.Large, MaxBuffered: h.cfg.RecordingBudget, UpstreamAs: h.upstreamAs}
	if err := h.reg.Register(statusCollector{h: h, writes: writes}); err != nil {
		return fmt.Errorf("registering the status metrics: %w", err)
	}
	cache := &reader.Reader{Store: st, Local: writes, Online: h.monitor.Online, Changed: h.monitor.Changed, LargeAnswer: mem.Large}
	conv := &converge.Converger{Local: writes, Relist: rec.Relist, Upstream: h.pool.As, Node: h.auth.Node(), Online: h.monitor.Online, Changed: h.monitor.Changed,
		FlapWindow: h.cfg.FlapWindow, RelistRate: h.cfg.RelistRate, RelistHeadStart: relistHeadStart, Tokens: h.tokens.All, Metrics: h.metrics, Log: h.log}
	remembered := identity.Memory{Store: st, Log: h.log}
	h.auth.Remember, h.auth.Recall, h.auth.Seen = remembered.Remember, remembered.Recall, h.tokens.Seen
	issuer := &identity.IssuerKeeper{Store: st, Auth: h.auth, Upstream: h.pool.As, Node: h.auth.Node(), Tokens: h.tokens.All,
		Audiences: h.cfg.APIAudiences, Online: h.monitor.Online, Changed: h.monitor.Changed, Log: h.log}
	issuer.Load()

	site, err := h.peerSite()
	if err != nil {
		return fmt.Errorf("peer checks: %w", err)
	}

	g, gctx := errgroup.WithContext(ctx)
	if site != nil {
		g.Go(func() error { return site.Run(gctx) })
	}
	if h.nodeCert != nil {
		g.Go(func() error { return h.nodeCert.Run(gctx) })
		g.Go(func() error {
			select {
			case <-gctx.Done():
			case <-h.nodeCert.Ready():
				if err := h.writeKubeconfig(h.restCfg.Host, h.restCfg.CAData, h.restCfg.CAFile); err != nil {
					h.log.Warn("cannot write --kubeconfig for the obtained node certificate", "err", err)
				}
			}
			return nil
		})
	}
	if h.serving != nil {
		g.Go(func() error { return h.serving.Run(gctx) })
	}
	var shared proxy.Sharer
	if h.cfg.WatchCache {
		records := recordFilter(h.cfg.RecordIdentities)
		wc := &share.Cache{As: h.pool.As, UpstreamAs: h.upstreamAs, Credential: h.credential, Record: rec.Tee,
			Recorded: func(id string) bool { return records(request.Identity{User: id}) }, Online: h.monitor.Online, Changed: h.monitor.Changed,
			MaxBytes: h.cfg.WatchCacheSize, Recheck: h.cfg.WatchCacheRecheck, Metrics: h.metrics, Log: h.log,
			Grant: func(identity string, asked, source store.ViewKey, rv uint64, allowed bool) {
				var err error
				if allowed {
					err = reader.PutGrant(st, identity, asked, source, rv)
				} else {
					err = reader.DeleteGrant(st, identity, asked)
				}
				if err != nil {
					h.log.Warn("watch cache: cannot record what a caller may read offline", "identity", identity, "err", err)
				}
			},
			Pins:   func(pins []reader.Grant, current func(int) bool) error { return reader.PutGrants(st, pins, current) },
			Grants: func(fn func(string, store.ViewKey) error) error { return reader.Grants(st, fn) }}
		g.Go(func() error { return wc.Run(gctx) })
		shared = wc
		// Before the recorder and the converger run: both read it.
		rec.KeptFresh = wc.KeepsFresh
	}
	g.Go(func() error { return h.monitor.Run(gctx) })
	// A page of the file damaged at runtime is healed by a rebuild; the
	// views it cost are fetched again through the recorder.
	g.Go(func() error { return st.Run(gctx, rec.Lost) })
	g.Go(func() error { return rec.Run(gctx) })
	g.Go(func() error { return mem.Run(gctx) })
	g.Go(func() error { return conv.Run(gctx) })
	g.Go(func() error { return issuer.Run(gctx) })

	newProxy := func(auth proxy.Authenticate) http.Handler {
		p := &proxy.Handler{Authenticate: auth, Upstream: h.pool, Record: rec.Tee, Cache: cache, Local: writes, Share: shared, Online: h.monitor.Online,
			Metrics: h.metrics, Log: h.log, Stopping: gctx, Activity: mem, Rewrite: h.rewriteRules()}
		p.Init()
		return p
	}
	start := func(name, addr string, handler http.Handler, tlsCfg *tls.Config) {
		if addr == "" && h.Listeners[name] == nil {
			return
		}
		s := &server.Server{Name: name, Addr: addr, Listener: h.Listeners[name], Handler: handler, TLS: tlsCfg,
			ShutdownTimeout: h.cfg.ShutdownTimeout, Log: h.log}
		g.Go(func() error { return s.Run(gctx) })
	}
	start("secure", h.cfg.SecureAddress, newProxy(h.auth.Authenticate), h.tls)
	// In-cluster clients of this node: the same authentication, answers
	// and certificate as the secure port.
	start("node-local", h.cfg.NodeLocalAddress, newProxy(h.auth.Authenticate), h.tls)
	// Everything on the plain-HTTP port is this node's kubelet: that is the
	// contract of the port, which is why it is off by default and meant for
	// loopback only.
	start("insecure", h.cfg.InsecureAddress, newProxy(func(*http.Request) (request.Identity, error) { return h.auth.Node(), nil }), nil)
	start("admin", h.cfg.AdminAddress, h.adminHandler(conv, writes, rec), nil)
	if ln, err := listenInspect(h.cfg.DataDir); err != nil {
		// Only `outpost cache` on a running outpost needs it.
		h.log.Warn("outpost cache will not read this running outpost's cache", "err", err)
	} else {
		s := &server.Server{Name: "inspect", Listener: ln, Handler: h.inspectHandler(st), ShutdownTimeout: h.cfg.ShutdownTimeout, Log: h.log}
		g.Go(func() error { return s.Run(gctx) })
	}

	err = g.Wait()
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

// rewriteRules points this node's in-cluster clients at the node-local
// address (package rewrite), or nil when there is none.
func (h *Hub) rewriteRules() *rewrite.Rules {
	if h.cfg.NodeLocalAddress == "" {
		return nil
	}
	return &rewrite.Rules{Address: netip.MustParseAddrPort(h.cfg.NodeLocalAddress), NodeUser: identity.NodeUser(h.cfg.NodeName), Proxies: h.cfg.ServiceProxies}
}

// recordFilter turns --record-identities into the cache's Record hook.
func recordFilter(patterns []string) func(request.Identity) bool {
	return func(id request.Identity) bool {
		key := id.Key()
		for _, p := range patterns {
			if p == "*" || p == key || (strings.HasSuffix(p, "*") && strings.HasPrefix(key, strings.TrimSuffix(p, "*"))) {
				return true
			}
		}
		return false
	}
}

// credential names the credentials upstreamAs sends as identity now:
// "cert" for the node's certificate, the hash of its latest token, or "".
func (h *Hub) credential(id string) string {
	if id == h.auth.Node().Key() {
		return share.NodeCredential
	}
	if token, ok := h.tokens.All()[id]; ok {
		return identity.TokenHash(token)
	}
	return ""
}

// upstreamAs sends requests as the identity whose key is identity: the node
// with its own credentials, a token caller with the token it last used
// (kept in memory only), nobody else (nil).
func (h *Hub) upstreamAs(identity string) http.RoundTripper {
	if node := h.auth.Node(); identity == node.Key() {
		return h.pool.As(node)
	}
	if token, ok := h.tokens.All()[identity]; ok {
		return h.pool.As(request.Identity{Kind: request.BearerToken, User: identity, Token: token})
	}
	return nil
}
