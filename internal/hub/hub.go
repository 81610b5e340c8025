// Package hub assembles the outpost node hub from its configuration: the
// upstream pool, the health monitor, the authenticator, the proxy and the
// listeners, and runs them under one errgroup until the context ends.
package hub

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/internal/cache"
	"github.com/outposthq/outpost/internal/certs"
	"github.com/outposthq/outpost/internal/config"
	"github.com/outposthq/outpost/internal/health"
	"github.com/outposthq/outpost/internal/identity"
	"github.com/outposthq/outpost/internal/memory"
	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/proxy"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/seal"
	"github.com/outposthq/outpost/internal/server"
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
	serving       *certs.Rotator
	certRotations *prometheus.CounterVec
	// sealKey encrypts sensitive cache records (--encryption-key-file).
	sealKey *seal.Key

	gaugeMu sync.Mutex        // orders the health gauges' updates
	tokenMu sync.RWMutex      // guards tokens
	tokens  map[string]string // user -> the token it last used, in memory only

	// Listeners, if set, replace listening on the configured addresses
	// (tests bind :0 themselves). Keys: "secure", "insecure", "admin".
	Listeners map[string]net.Listener
}

// New checks cfg and builds a Hub. It starts nothing.
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
	h.certRotations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "outpost_certificate_rotations_total",
		Help: "Certificates outpost renewed by CSR, by pair (node-client, node-serving).",
	}, []string{"name"})
	reg.MustRegister(h.certRotations)

	h.monitor = &health.Monitor{
		Count:            pool.Len(),
		Probe:            pool.Probe,
		Reachable:        pool.Handshake,
		Interval:         cfg.ProbeInterval,
		Timeout:          cfg.ProbeTimeout,
		FailureThreshold: cfg.FailureThreshold,
		SuccessThreshold: cfg.SuccessThreshold,
		OnChange:         h.serverChanged,
		OnProbe: func(i int, result health.ProbeResult) {
			m.UpstreamProbes.WithLabelValues(pool.Name(i), string(result)).Inc()
		},
	}
	pool.SetHealth(h.monitor)
	for i := 0; i < pool.Len(); i++ {
		m.UpstreamHealthy.WithLabelValues(pool.Name(i)).Set(1)
	}
	m.Online.Set(1)

	clientCA, err := h.clientCAs(restCfg)
	if err != nil {
		return nil, err
	}
	h.auth = &identity.Authenticator{NodeName: cfg.NodeName, ClientCAs: clientCA, Review: h.review, Online: h.monitor.Online}

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

// review asks the apiserver, through the pool, who token belongs to.
func (h *Hub) review(ctx context.Context, token string) (string, []string, bool, error) {
	body := `{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://upstream/apis/authentication.k8s.io/v1/selfsubjectreviews", strings.NewReader(body))
	if err != nil {
		return "", nil, false, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	info := &request.Info{Identity: request.Identity{Kind: request.BearerToken}, Verb: "create"}
	resp, err := h.pool.RoundTrip(req.WithContext(request.WithInfo(ctx, info)))
	if err != nil {
		return "", nil, false, err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusCreated, http.StatusOK:
	case http.StatusUnauthorized:
		return "", nil, false, nil
	default:
		return "", nil, false, fmt.Errorf("selfsubjectreview answered %s", resp.Status)
	}
	var out struct {
		Status struct {
			UserInfo struct {
				Username string   `json:"username"`
				Groups   []string `json:"groups"`
			} `json:"userInfo"`
		} `json:"status"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return "", nil, false, fmt.Errorf("decoding selfsubjectreview: %w", err)
	}
	return out.Status.UserInfo.Username, out.Status.UserInfo.Groups, true, nil
}

func (h *Hub) serverChanged(i int, healthy bool, err error) {
	name := h.pool.Name(i)
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
		opts.Sealed = store.SealRule{Resources: []string{"/v1/secrets", "/v1/secrets#meta"}, DocPrefixes: []string{"sa-token\x00", "table\x00"}}
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
	h.auth.Remember, h.auth.Recall = h.rememberToken, h.recallToken
	h.auth.Seen = h.sawToken
	h.loadIssuer()
	mem := &memory.Releaser{Released: func(reason string) { h.metrics.MemoryReleases.WithLabelValues(reason).Inc() }}
	c := &cache.Cache{Store: st, Log: h.log, Metrics: h.metrics, Record: recordFilter(h.cfg.RecordIdentities),
		Online: h.monitor.Online, Changed: h.monitor.Changed, Node: h.cfg.NodeName, LargeAnswer: mem.Large}

	g, gctx := errgroup.WithContext(ctx)
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
	g.Go(func() error { return h.monitor.Run(gctx) })
	g.Go(func() error { return c.Run(gctx) })
	g.Go(func() error { return mem.Run(gctx) })
	g.Go(func() error { return h.reconnect(gctx, c) })
	g.Go(func() error { return h.runIssuer(gctx) })

	newProxy := func(auth proxy.Authenticate) http.Handler {
		p := &proxy.Handler{Authenticate: auth, Upstream: h.pool, Cache: c, Online: h.monitor.Online,
			Metrics: h.metrics, Log: h.log, Stopping: gctx, Activity: mem}
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
	// Everything on the plain-HTTP port is this node's kubelet: that is the
	// contract of the port, which is why it is off by default and meant for
	// loopback only.
	start("insecure", h.cfg.InsecureAddress, newProxy(func(*http.Request) (request.Identity, error) { return h.auth.Node(), nil }), nil)
	start("admin", h.cfg.AdminAddress, h.adminHandler(c), nil)

	err = g.Wait()
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

// reconnect follows the online/offline state. When the cloud returns it
// drops the local overlays, replays the event journal and, after an outage
// longer than the flap window, re-lists the views of this node.
func (h *Hub) reconnect(ctx context.Context, c *cache.Cache) error {
	wasOnline := h.monitor.Online()
	offlineSince := time.Now() // a start offline counts as a long outage
	for {
		changed := h.monitor.Changed()
		online := h.monitor.Online()
		switch {
		case online == wasOnline:
		case !online:
			offlineSince = time.Now()
			h.log.Warn("cloud unreachable: answering from the cache")
		default:
			outage := time.Since(offlineSince)
			h.log.Info("cloud reachable again", "outage", outage.Round(time.Millisecond))
			if n, err := c.ReplayStatus(ctx, h.sendAsNode); err != nil {
				h.log.Warn("re-sending local statuses stopped", "sent", n, "err", err)
			} else if n > 0 {
				h.log.Info("local node and pod statuses sent to the apiserver", "count", n)
			}
			c.DropOverlays()
			n, err := c.ReplayJournal(ctx, 20, h.replayEvent)
			h.metrics.JournalReplayed.Add(float64(n))
			if err != nil {
				h.log.Warn("event journal replay stopped; the rest waits for the next reconnect", "replayed", n, "err", err)
			} else if n > 0 {
				h.log.Info("event journal replayed", "events", n)
			}
			if outage >= h.cfg.FlapWindow {
				start := time.Now()
				n, err := c.Relist(ctx, identity.NodeUser(h.cfg.NodeName), h.cfg.RelistRate, h.fetchAsNode)
				// Token callers' views, with the token each last used
				// (kept in memory only), so quiet callers converge too.
				for user, token := range h.tokensSeen() {
					if err != nil {
						break
					}
					var m int
					m, err = c.Relist(ctx, user, h.cfg.RelistRate, h.fetchWithToken(token))
					n += m
				}
				if err != nil && ctx.Err() == nil {
					h.log.Warn("re-listing after reconnect stopped", "views", n, "err", err)
				} else {
					h.log.Info("re-listed cached views after reconnect", "views", n, "took", time.Since(start).Round(time.Millisecond))
				}
			}
		}
		wasOnline = online
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

// fetchAsNode sends r upstream with the node's credentials.
func (h *Hub) fetchAsNode(ctx context.Context, r *http.Request) (*http.Response, error) {
	return nodeTransport{h}.RoundTrip(r.WithContext(ctx))
}

func (h *Hub) sawToken(user, token string) {
	// Called on every token request: a read lock while nothing changes.
	h.tokenMu.RLock()
	same := h.tokens[user] == token
	h.tokenMu.RUnlock()
	if same {
		return
	}
	h.tokenMu.Lock()
	defer h.tokenMu.Unlock()
	if h.tokens == nil || len(h.tokens) > 10000 {
		h.tokens = map[string]string{}
	}
	h.tokens[user] = token
}

func (h *Hub) tokensSeen() map[string]string {
	h.tokenMu.Lock()
	defer h.tokenMu.Unlock()
	out := make(map[string]string, len(h.tokens))
	for u, t := range h.tokens {
		out[u] = t
	}
	return out
}

// fetchWithToken sends a re-list upstream as the caller whose token it is.
func (h *Hub) fetchWithToken(token string) cache.Fetch {
	return func(ctx context.Context, r *http.Request) (*http.Response, error) {
		r.Header.Set("Authorization", "Bearer "+token)
		info := &request.Info{Identity: request.Identity{Kind: request.BearerToken}, Verb: "list"}
		return h.pool.RoundTrip(r.WithContext(request.WithInfo(ctx, info)))
	}
}

// sendAsNode sends a write upstream with the node's credentials.
func (h *Hub) sendAsNode(ctx context.Context, method, path, contentType string, body []byte) (int, error) {
	r, err := http.NewRequestWithContext(ctx, method, "https://upstream"+path, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	r.Header.Set("Content-Type", contentType)
	resp, err := nodeTransport{h}.RoundTrip(r)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// replayEvent posts one journaled event with the node's credentials.
func (h *Hub) replayEvent(ctx context.Context, path string, body []byte) (int, error) {
	return h.sendAsNode(ctx, http.MethodPost, path, "application/json", body)
}

// rememberedToken is how a confirmed token identity is kept in the store,
// under its hash; the token itself is never stored.
type rememberedToken struct {
	User    string    `json:"user"`
	Groups  []string  `json:"groups,omitempty"`
	Expires time.Time `json:"expires"`
}

func (h *Hub) rememberToken(hash string, id request.Identity, expires time.Time) {
	body, _ := json.Marshal(rememberedToken{User: id.User, Groups: id.Groups, Expires: expires})
	if err := h.store.PutDoc("identity\x00"+hash, "application/json", body); err != nil {
		h.log.Warn("cannot remember a token identity; it will not be known offline after a restart", "user", id.User, "err", err)
	}
}

func (h *Hub) recallToken(hash string) (request.Identity, time.Time, bool) {
	_, body, ok, err := h.store.Doc("identity\x00" + hash)
	if err != nil || !ok {
		return request.Identity{}, time.Time{}, false
	}
	var r rememberedToken
	if json.Unmarshal(body, &r) != nil || r.User == "" {
		return request.Identity{}, time.Time{}, false
	}
	return request.Identity{User: r.User, Groups: r.Groups}, r.Expires, true
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

func (h *Hub) adminHandler(c *cache.Cache) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		// Ready once outpost can serve: online (an apiserver answered a
		// probe), or offline with a cache.
		if h.monitor.Online() && h.monitor.Reached() {
			_, _ = w.Write([]byte("ok: online\n"))
			return
		}
		if _, views, err := h.store.Stats(); err == nil && views > 0 {
			_, _ = fmt.Fprintf(w, "ok: offline, serving %d cached views\n", views)
			return
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		if h.monitor.Online() {
			_, _ = w.Write([]byte("starting: no apiserver has answered a probe yet, and nothing cached\n"))
			return
		}
		_, _ = w.Write([]byte("offline: no apiserver healthy and nothing cached\n"))
	})
	mux.Handle("/metrics", promhttp.HandlerFor(h.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/debug/cache/views", func(w http.ResponseWriter, _ *http.Request) {
		views, err := h.store.AllViews()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(views)
	})
	// Resources whose answers could not be recorded lately, and so will
	// not be served offline (the views endpoint keeps its list of views).
	mux.HandleFunc("/debug/cache/unrecorded", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(c.Unrecorded())
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}
