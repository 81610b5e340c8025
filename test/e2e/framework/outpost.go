package framework

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/rest"
)

// Outpost is an outpost process started by a test, in front of this
// control plane, acting for one node.
type Outpost struct {
	// Node is the node outpost acts for.
	Node string
	// URL is the secure (TLS) address clients use: https://127.0.0.1:PORT.
	URL string
	// AdminURL serves /healthz, /readyz and /metrics.
	AdminURL string
	// DataDir is outpost's --data-dir.
	DataDir string
	// ServingCAFile verifies outpost's self-signed serving certificate.
	ServingCAFile string
	// NodeCertFile and NodeKeyFile are the node's client certificate, used
	// by outpost upstream and by local clients acting as the node.
	NodeCertFile, NodeKeyFile string
	// Kubeconfig is the upstream kubeconfig outpost was started with.
	Kubeconfig string
	// LogPath is outpost's log file.
	LogPath string
	// ExtraArgs are added to outpost's arguments at the next Start.
	ExtraArgs []string

	cp   *ControlPlane
	args []string
	proc *process
}

// StartOutpost starts _output/bin/outpost for node with the node's
// credentials toward apiserver 0 (extraArgs may add --server flags) and
// waits until its admin /healthz answers and its secure port serves TLS.
func (c *ControlPlane) StartOutpost(ctx context.Context, node string, extraArgs ...string) (*Outpost, error) {
	return c.startOutpost(ctx, node, false, extraArgs)
}

// StartOutpostBootstrap starts outpost for node as a new node joins: with
// no node credential, only a kubeconfig holding BootstrapToken
// (--bootstrap-kubeconfig), so that outpost must obtain its client
// certificate by CSR. Kubeconfig names where outpost writes its own. The
// node certificate of the returned Outpost is still issued by the test CA,
// for local clients acting as the node.
func (c *ControlPlane) StartOutpostBootstrap(ctx context.Context, node string, extraArgs ...string) (*Outpost, error) {
	return c.startOutpost(ctx, node, true, extraArgs)
}

func (c *ControlPlane) startOutpost(ctx context.Context, node string, bootstrap bool, extraArgs []string) (*Outpost, error) {
	certFile, keyFile, err := c.NodeCredentials(node)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(c.Dir, "outpost-"+node+"-")
	if err != nil {
		return nil, err
	}
	o := &Outpost{Node: node, DataDir: filepath.Join(dir, "data"), cp: c,
		NodeCertFile: certFile, NodeKeyFile: keyFile,
		Kubeconfig: filepath.Join(dir, "upstream.kubeconfig"), LogPath: filepath.Join(dir, "outpost.log")}
	if bootstrap {
		boot := filepath.Join(dir, "bootstrap.kubeconfig")
		if err := WriteKubeconfig(boot, c.URL(0), c.CAFile, "", "", c.BootstrapToken); err != nil {
			return nil, err
		}
		extraArgs = append([]string{"--bootstrap-kubeconfig=" + boot}, extraArgs...)
	} else if err := WriteKubeconfig(o.Kubeconfig, c.URL(0), c.CAFile, certFile, keyFile, ""); err != nil {
		return nil, err
	}
	securePort, err := freePort()
	if err != nil {
		return nil, err
	}
	adminPort, err := freePort()
	if err != nil {
		return nil, err
	}
	o.URL = "https://127.0.0.1:" + strconv.Itoa(securePort)
	o.AdminURL = "http://127.0.0.1:" + strconv.Itoa(adminPort)
	o.ServingCAFile = filepath.Join(o.DataDir, "pki", "ca.crt")
	o.args = append([]string{"run",
		"--kubeconfig=" + o.Kubeconfig,
		"--node-name=" + node,
		"--data-dir=" + o.DataDir,
		"--secure-address=127.0.0.1:" + strconv.Itoa(securePort),
		"--admin-address=127.0.0.1:" + strconv.Itoa(adminPort),
		"--shutdown-timeout=5s",
	}, extraArgs...)
	// OUTPOST_E2E_ARGS runs every suite's outposts with more flags (space-
	// separated), e.g. --watch-cache=false to prove them all without the
	// node watch cache.
	o.args = append(o.args, strings.Fields(os.Getenv("OUTPOST_E2E_ARGS"))...)
	if err := o.Start(ctx); err != nil {
		return nil, err
	}
	return o, nil
}

// LenientProbes are outpost flags that keep it online through probe
// timeouts caused by a loaded test machine, for tests that are not about
// health: there a timed-out probe would send reads to the cache.
var LenientProbes = []string{"--probe-timeout=2s", "--failure-threshold=3"}

// StartOutpostT starts outpost for node with args (see StartOutpost) and
// stops it when t ends, logging its last lines if t failed.
func (c *ControlPlane) StartOutpostT(t testing.TB, node string, args ...string) *Outpost {
	t.Helper()
	return c.startOutpostT(t, node, false, args)
}

// StartOutpostBootstrapT starts outpost for node as StartOutpostBootstrap
// does, with no node credential, and stops it as StartOutpostT does.
func (c *ControlPlane) StartOutpostBootstrapT(t testing.TB, node string, args ...string) *Outpost {
	t.Helper()
	return c.startOutpostT(t, node, true, args)
}

func (c *ControlPlane) startOutpostT(t testing.TB, node string, bootstrap bool, args []string) *Outpost {
	t.Helper()
	o, err := c.startOutpost(t.Context(), node, bootstrap, args)
	if err != nil {
		t.Fatalf("starting outpost: %v", err)
	}
	t.Cleanup(func() {
		o.Stop()
		if t.Failed() {
			t.Logf("last lines of outpost's log %s:\n%s", o.LogPath, o.Log(80))
		}
	})
	return o
}

// StartOutpostWithLinkT starts a FaultProxy to apiserver 0 and outpost for
// node behind it (--server=the proxy, then args), both stopped when t ends,
// and returns once outpost is online. The proxy is outpost's link to the
// cloud, for the test to cut, while the test itself keeps reaching the
// apiserver directly.
func (c *ControlPlane) StartOutpostWithLinkT(t testing.TB, node string, args ...string) (*Outpost, *FaultProxy) {
	t.Helper()
	link, err := StartFaultProxy(c.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { link.Close() })
	o := c.StartOutpostT(t, node, append([]string{"--server=" + link.URL()}, args...)...)
	if _, err := o.WaitState(t.Context(), "online", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	return o, link
}

// Start starts the outpost process again with the same arguments (after
// Stop), and waits until it serves.
func (o *Outpost) Start(ctx context.Context) error {
	bin, err := OutpostBinary()
	if err != nil {
		return err
	}
	p, err := startProcess("outpost", o.LogPath, bin, append(o.args[:len(o.args):len(o.args)], o.ExtraArgs...), nil)
	if err != nil {
		return err
	}
	o.proc = p
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	hc := &http.Client{Timeout: time.Second}
	return waitFor(ctx, p, "outpost to serve", func(ctx context.Context) error {
		resp, err := hc.Get(o.AdminURL + "/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		pool, err := readCertPool(o.ServingCAFile)
		if err != nil {
			return err
		}
		conn, err := tls.Dial("tcp", o.URL[len("https://"):], &tls.Config{RootCAs: pool})
		if err != nil {
			return err
		}
		return conn.Close()
	})
}

// Stop sends SIGTERM and waits for outpost to exit (SIGKILL after 10 s).
func (o *Outpost) Stop() {
	if o.proc != nil {
		o.proc.stop(10 * time.Second)
	}
}

// Kill ends outpost with SIGKILL, as a crash or power loss would.
func (o *Outpost) Kill() {
	if o.proc != nil {
		o.proc.stop(0)
	}
}

// Log returns the last n lines of outpost's log.
func (o *Outpost) Log(n int) string { return tailFile(o.LogPath, n) }

// ClientConfig returns a client-go config for a local client of outpost:
// with certFile/keyFile, or with token, or with neither. Client-side rate
// limiting is off, as tests make bursts of calls.
func (o *Outpost) ClientConfig(certFile, keyFile, token string) *rest.Config {
	return &rest.Config{
		Host:            o.URL,
		TLSClientConfig: rest.TLSClientConfig{CAFile: o.ServingCAFile, CertFile: certFile, KeyFile: keyFile},
		BearerToken:     token,
		QPS:             -1,
	}
}

// WriteClientKubeconfig writes a kubeconfig for a local client of outpost
// to path: with certFile/keyFile, or with token, or with neither.
func (o *Outpost) WriteClientKubeconfig(path, certFile, keyFile, token string) error {
	return WriteKubeconfig(path, o.URL, o.ServingCAFile, certFile, keyFile, token)
}

// NodeKubeconfig writes (once) and returns a kubeconfig through outpost
// with the node's client certificate, as kubelet would use.
func (o *Outpost) NodeKubeconfig() (string, error) {
	path := filepath.Join(filepath.Dir(o.DataDir), "node-via-outpost.kubeconfig")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	return path, o.WriteClientKubeconfig(path, o.NodeCertFile, o.NodeKeyFile, "")
}

// PID is the process id of the running outpost, or 0.
func (o *Outpost) PID() int {
	if o.proc == nil || o.proc.exited() {
		return 0
	}
	return o.proc.cmd.Process.Pid
}

var outpostBuild struct {
	once sync.Once
	path string
	err  error
}

// OutpostBinary returns the outpost binary the tests run: $OUTPOST_BIN when
// set, else one built once per test process from the working tree with
// `go build`, so that a test never runs a stale _output/bin/outpost. It is
// static (CGO_ENABLED=0) like the one `make build` ships, so that the
// benchmarks' RSS is the shipped binary's.
func OutpostBinary() (string, error) {
	if p := os.Getenv("OUTPOST_BIN"); p != "" {
		return p, nil
	}
	b := &outpostBuild
	b.once.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			b.err = err
			return
		}
		dir, err := os.MkdirTemp("", "outpost-bin-")
		if err != nil {
			b.err = err
			return
		}
		b.path = filepath.Join(dir, "outpost")
		cmd := exec.Command("go", "build", "-o", b.path, "./cmd/outpost")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("building outpost: %v\n%s", err, out)
		}
	})
	return b.path, b.err
}

// RemoveBuiltBinaries deletes the binaries OutpostBinary and
// ControllerBinary built, for programs outside Run (the demo) to call
// when they end.
func RemoveBuiltBinaries() {
	removeOutpostBinary()
	removeControllerBinary()
}

// removeOutpostBinary deletes the binary OutpostBinary built, once the
// tests that ran it are done.
func removeOutpostBinary() {
	b := &outpostBuild
	if b.path != "" && os.Getenv("OUTPOST_BIN") == "" {
		_ = os.RemoveAll(filepath.Dir(b.path))
	}
}

// State is what outpost's /readyz says: "online", "offline" (serving a
// cache), or else the answer or error as it is.
func (o *Outpost) State(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, o.AdminURL+"/readyz", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	switch s := string(body); {
	case strings.HasPrefix(s, "ok: online"):
		return "online"
	case strings.HasPrefix(s, "ok: offline"):
		return "offline"
	default:
		return strings.TrimSpace(s)
	}
}

// WaitState waits until outpost's /readyz says want (see State), polling
// every 20 ms, and returns how long that took.
func (o *Outpost) WaitState(ctx context.Context, want string, timeout time.Duration) (time.Duration, error) {
	d, err := Poll(ctx, 20*time.Millisecond, timeout, func(ctx context.Context) (bool, string) {
		got := o.State(ctx)
		return got == want, fmt.Sprintf("/readyz says %q", got)
	})
	if err != nil {
		return 0, fmt.Errorf("outpost of %s not %s: %w", o.Node, want, err)
	}
	return d, nil
}
