package framework

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Options say which parts of the control plane to start. The zero value
// starts one etcd and one kube-apiserver.
type Options struct {
	// APIServers is the number of kube-apiserver processes sharing one etcd,
	// each on its own port; 0 means 1.
	APIServers int
	// ControllerManager starts kube-controller-manager: CSR signing with the
	// cluster CA and approval of kubelet client CSRs, service accounts and
	// their tokens, node lifecycle, endpointslices, garbage collection...
	// Without it a new namespace gets no default ServiceAccount.
	ControllerManager bool
	// Scheduler starts kube-scheduler.
	Scheduler bool
	// APIServerArgs are extra flags appended to every kube-apiserver; a
	// flag given twice takes the last value, so these override the defaults.
	APIServerArgs []string
	// ControllerManagerArgs are extra flags appended to kube-controller-manager.
	ControllerManagerArgs []string
}

// startTimeout bounds the start of one component when the caller's context
// has no deadline of its own; a healthy one is ready in seconds.
const startTimeout = 2 * time.Minute

// apiserverGrace is how long StopAPIServer lets kube-apiserver drain after
// SIGTERM before killing it; a graceful exit can take 10-15 s, which tests
// should not pay for.
const apiserverGrace = 5 * time.Second

// ControlPlane is a running local control plane. Its exported fields are set
// by Start and never change afterwards.
type ControlPlane struct {
	// Dir holds the PKI, kubeconfigs, etcd data and one log file per
	// process (etcd.log, kube-apiserver-0.log, kube-controller-manager.log,
	// kube-scheduler.log, kwok.log).
	Dir string
	// CAFile is the cluster CA certificate (PEM); CAKeyFile is its key. The
	// CA verifies every client certificate and signs the serving
	// certificate and, through kube-controller-manager, approved CSRs.
	CAFile    string
	CAKeyFile string
	// AdminKubeconfig is a kubeconfig for a system:masters user whose
	// server is the first apiserver.
	AdminKubeconfig string
	// BootstrapToken is a valid bootstrap token ("abcdef.0123456789abcdef")
	// in the groups system:bootstrappers and system:bootstrappers:outpost,
	// allowed to create node client CSRs that kube-controller-manager
	// approves, as kubelet TLS bootstrap needs.
	BootstrapToken string
	// ServiceAccountKeyFile is the private key with which the apiservers
	// sign service account tokens and kube-controller-manager signs legacy
	// token secrets; ServiceAccountPublicKeyFile verifies them.
	ServiceAccountKeyFile       string
	ServiceAccountPublicKeyFile string
	// EtcdURL is the client URL of etcd (plain HTTP on 127.0.0.1).
	EtcdURL string

	opts       Options
	ca         *authority
	servingCrt string
	servingKey string
	adminCrt   string
	adminKey   string
	ports      []int  // apiserver secure ports, fixed for the control plane's life
	etcdPorts  [2]int // etcd client and peer ports
	probe      *http.Client
	client     kubernetes.Interface

	// ctx is cancelled by Stop, so that a wait in progress elsewhere (a
	// restart, a signal-triggered Stop) does not hold Stop up.
	ctx    context.Context
	cancel context.CancelFunc

	mu         sync.Mutex // guards the fields below
	stopped    bool
	failed     bool
	etcd       *process
	apiservers []*process // nil entries are stopped apiservers
	kcm        *process
	scheduler  *process
	kwok       *process
}

// Start starts etcd and the apiservers, then the optional components, and
// returns once each is ready: /readyz answers on every apiserver, the
// bootstrap token authenticates, and with ControllerManager the default
// namespace has its default ServiceAccount. ctx bounds only the start; the
// processes run until Stop. On error everything started is stopped again.
func Start(ctx context.Context, opts Options) (cp *ControlPlane, err error) {
	if opts.APIServers < 0 {
		return nil, fmt.Errorf("starting control plane: negative APIServers %d", opts.APIServers)
	}
	if opts.APIServers == 0 {
		opts.APIServers = 1
	}
	// Fail before creating anything when a binary is missing.
	needed := []string{"etcd", "kube-apiserver"}
	if opts.ControllerManager {
		needed = append(needed, "kube-controller-manager")
	}
	if opts.Scheduler {
		needed = append(needed, "kube-scheduler")
	}
	for _, name := range needed {
		if _, err := Binary(name); err != nil {
			return nil, fmt.Errorf("starting control plane: %w", err)
		}
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}

	dir, err := os.MkdirTemp("", "outpost-e2e-")
	if err != nil {
		return nil, fmt.Errorf("creating control plane directory: %w", err)
	}
	c := &ControlPlane{
		Dir:                         dir,
		CAFile:                      filepath.Join(dir, "pki", "ca.crt"),
		CAKeyFile:                   filepath.Join(dir, "pki", "ca.key"),
		AdminKubeconfig:             filepath.Join(dir, "admin.kubeconfig"),
		ServiceAccountKeyFile:       filepath.Join(dir, "pki", "sa.key"),
		ServiceAccountPublicKeyFile: filepath.Join(dir, "pki", "sa.pub"),
		opts:                        opts,
		apiservers:                  make([]*process, opts.APIServers),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			c.MarkFailed()
			c.Stop()
		}
	}()

	if err := c.writePKI(); err != nil {
		return nil, fmt.Errorf("starting control plane: %w", err)
	}
	if err := c.allocatePorts(); err != nil {
		return nil, fmt.Errorf("starting control plane: %w", err)
	}
	if err := c.initClients(); err != nil {
		return nil, fmt.Errorf("starting control plane: %w", err)
	}
	if err := c.startEtcd(ctx); err != nil {
		return nil, fmt.Errorf("starting control plane: %w", err)
	}
	if err := c.startAPIServers(ctx); err != nil {
		return nil, fmt.Errorf("starting control plane: %w", err)
	}
	if err := c.bootstrap(ctx); err != nil {
		return nil, fmt.Errorf("starting control plane: %w", err)
	}
	if opts.ControllerManager {
		if err := c.startControllerManager(ctx); err != nil {
			return nil, fmt.Errorf("starting control plane: %w", err)
		}
	}
	if opts.Scheduler {
		if err := c.startScheduler(ctx); err != nil {
			return nil, fmt.Errorf("starting control plane: %w", err)
		}
	}
	return c, nil
}

// writePKI writes the CA, the certificates of the framework's own clients
// and the apiservers, and the service account keys.
func (c *ControlPlane) writePKI() error {
	ca, err := newAuthority(c.CAFile, c.CAKeyFile)
	if err != nil {
		return err
	}
	c.ca = ca
	c.servingCrt = filepath.Join(c.Dir, "pki", "apiserver.crt")
	c.servingKey = filepath.Join(c.Dir, "pki", "apiserver.key")
	// One serving certificate for all apiservers: they share 127.0.0.1 and
	// the in-cluster names, and clients fail over between them.
	err = ca.issueServing("kube-apiserver",
		[]net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, net.ParseIP(serviceIP)},
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		c.servingCrt, c.servingKey)
	if err != nil {
		return fmt.Errorf("issuing apiserver serving certificate: %w", err)
	}
	if c.adminCrt, c.adminKey, err = c.IssueClientCert("admin", "outpost-e2e-admin", "system:masters"); err != nil {
		return err
	}
	return writeServiceAccountKeys(c.ServiceAccountKeyFile, c.ServiceAccountPublicKeyFile)
}

// allocatePorts fixes the etcd and apiserver ports up front, so that URL(i)
// is stable even across StopAPIServer/StartAPIServer.
func (c *ControlPlane) allocatePorts() error {
	ports, err := freePorts(2 + c.opts.APIServers)
	if err != nil {
		return err
	}
	c.etcdPorts = [2]int{ports[0], ports[1]}
	c.ports = ports[2:]
	return nil
}

// initClients writes the admin kubeconfig and builds the admin clients.
func (c *ControlPlane) initClients() error {
	if err := WriteKubeconfig(c.AdminKubeconfig, c.URL(0), c.CAFile, c.adminCrt, c.adminKey, ""); err != nil {
		return err
	}
	probe, err := rest.HTTPClientFor(c.AdminConfig())
	if err != nil {
		return fmt.Errorf("building probe client: %w", err)
	}
	c.probe = probe
	client, err := kubernetes.NewForConfig(c.AdminConfig())
	if err != nil {
		return fmt.Errorf("building admin client: %w", err)
	}
	c.client = client
	return nil
}

// URL returns the base URL (https://127.0.0.1:PORT) of apiserver i. The URL
// stays the same when the apiserver is stopped and started again.
func (c *ControlPlane) URL(i int) string {
	return "https://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(c.ports[i]))
}

// URLs returns the base URLs of all apiservers, in order.
func (c *ControlPlane) URLs() []string {
	urls := make([]string, len(c.ports))
	for i := range c.ports {
		urls[i] = c.URL(i)
	}
	return urls
}

// AdminConfig returns a new system:masters client config for the first
// apiserver; set Host to reach another one. Client-side rate limiting is
// raised because tests create objects in bursts.
func (c *ControlPlane) AdminConfig() *rest.Config {
	return &rest.Config{
		Host: c.URL(0),
		TLSClientConfig: rest.TLSClientConfig{
			CAFile:   c.CAFile,
			CertFile: c.adminCrt,
			KeyFile:  c.adminKey,
		},
		QPS:   100,
		Burst: 200,
	}
}

// Client returns the admin clientset for the first apiserver.
func (c *ControlPlane) Client() kubernetes.Interface {
	return c.client
}

// MarkFailed records that the run using this control plane failed. With
// OUTPOST_E2E_KEEP=1 in the environment, Stop then keeps Dir and prints
// where it is, for reading the logs. Run calls it when a test failed.
func (c *ControlPlane) MarkFailed() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.failed = true
}

// Stop kills every process the control plane started, waits for each to
// exit, and removes Dir (see MarkFailed). It is idempotent and safe to call
// from another goroutine, such as a signal handler.
//
// Everything is SIGKILLed without a grace period: the cluster is thrown
// away, and a graceful kube-apiserver exit costs 10-15 s per test package.
func (c *ControlPlane) Stop() {
	c.cancel()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return
	}
	c.stopped = true

	var wg sync.WaitGroup
	kill := func(p *process) {
		if p != nil {
			wg.Go(func() { p.stop(0) })
		}
	}
	// Clients of the apiservers first, so that none logs a storm of
	// connection errors while the apiservers go away.
	kill(c.kwok)
	kill(c.scheduler)
	kill(c.kcm)
	wg.Wait()
	for _, p := range c.apiservers {
		kill(p)
	}
	wg.Wait()
	kill(c.etcd)
	wg.Wait()
	c.kwok, c.scheduler, c.kcm, c.etcd = nil, nil, nil, nil
	clear(c.apiservers)
	if c.probe != nil {
		c.probe.CloseIdleConnections()
	}

	if c.failed && os.Getenv("OUTPOST_E2E_KEEP") == "1" {
		fmt.Fprintf(os.Stderr, "e2e: OUTPOST_E2E_KEEP=1: keeping control plane directory %s\n", c.Dir)
		return
	}
	if err := os.RemoveAll(c.Dir); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: removing control plane directory: %v\n", err)
	}
}

// errStopped is returned by methods called after Stop.
var errStopped = errors.New("control plane is stopped")

// launch starts component name, with its log in Dir (see logPath), and
// records it in *slot, one of the fields c.mu guards, so that Stop kills
// it even while it is still starting.
func (c *ControlPlane) launch(name, bin string, args, env []string, slot **process) (*process, error) {
	p, err := startProcess(name, c.logPath(name), bin, args, env)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	*slot = p
	c.mu.Unlock()
	return p, nil
}

// logPath returns the log file of a component in Dir.
func (c *ControlPlane) logPath(name string) string {
	return filepath.Join(c.Dir, name+".log")
}

// boundedContext returns a context that ends after d, or when Stop is
// called, for waits inside methods that take no context.
func (c *ControlPlane) boundedContext(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(c.ctx, d)
}

// withStop returns ctx, additionally cancelled when Stop is called.
func (c *ControlPlane) withStop(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(c.ctx, cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}
