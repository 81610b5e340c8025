package framework

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// KubeProxyMode is how kube-proxy implements Services on the host.
type KubeProxyMode string

const (
	// KubeProxyNFTables programs the nftables tables "ip kube-proxy" and
	// "ip6 kube-proxy" through the nft binary.
	KubeProxyNFTables KubeProxyMode = "nftables"
	// KubeProxyIPTables programs KUBE-* chains through iptables (Debian's
	// iptables-nft, so they also live in nftables tables of their own).
	KubeProxyIPTables KubeProxyMode = "iptables"
)

const (
	// kubeProxyLock is the file every test binary's kube-proxy holds a
	// flock on while it may have rules on the host: kube-proxy's tables and
	// chains have fixed names, so two at once would overwrite each other.
	kubeProxyLock = "/run/outpost-e2e-kube-proxy.lock"
	// kubeProxyGrace is how long kube-proxy may take to exit after SIGTERM.
	kubeProxyGrace = 5 * time.Second
	// kubeProxyTable is the name of kube-proxy's nftables tables, one in
	// the ip family and one in ip6.
	kubeProxyTable = "kube-proxy"
	// ClusterCIDR is the union of the nodes' pod subnets (10.200.N.0/24),
	// what kube-proxy takes for traffic from pods.
	ClusterCIDR = "10.200.0.0/16"
)

// A KubeProxy is kube-proxy v1.37.2 running on a Node's host, as a node
// process beside kubelet, so that Service virtual IPs work for the node's
// pods and for the host itself.
//
// kube-proxy's rules are the machine's, not the node's: one KubeProxy at a
// time may exist on the machine, across test binaries, which StartKubeProxy
// enforces with a lock (waiting for it). It is told to stay off the
// machine's external address: NodePorts only on 127.0.0.1, healthz and
// metrics on 127.0.0.1, and no conntrack sysctl written.
type KubeProxy struct {
	// Mode is the proxy mode it runs in.
	Mode KubeProxyMode
	// Kubeconfig is what it talks to the apiserver (or outpost) with.
	Kubeconfig string
	// HealthzURL answers 200 once kube-proxy has synced its rules recently.
	HealthzURL string
	// MetricsURL is its Prometheus endpoint.
	MetricsURL string

	n      *Node
	config string // path of its KubeProxyConfiguration
	// tablesBefore are the nftables tables of the host before kube-proxy
	// started in iptables mode; iptables-nft creates the tables it
	// needs (ip nat, ip filter...) and nothing removes them.
	tablesBefore []string
	tracksTables bool     // tablesBefore was taken
	pathEnv      string   // its $PATH
	lock         *os.File // holds the flock on kubeProxyLock until Close

	mu          sync.Mutex // guards the fields below
	proc        *process
	closed      bool
	leftTables  []string    // what tablesLeft said as Close released the lock
	releaseStop func() bool // cancels the safety-net Close
}

// KubeProxyKubeconfig issues the client certificate kube-proxy holds in a
// real cluster (CN=system:kube-proxy, which the bootstrap ClusterRoleBinding
// system:node-proxier authorizes) and writes a kubeconfig for it to server,
// returning its path.
func (c *ControlPlane) KubeProxyKubeconfig(server string) (string, error) {
	certFile, keyFile, err := c.IssueClientCert("kube-proxy", "system:kube-proxy")
	if err != nil {
		return "", err
	}
	path := filepath.Join(c.Dir, "kube-proxy.kubeconfig")
	if err := WriteKubeconfig(path, server, c.CAFile, certFile, keyFile, ""); err != nil {
		return "", err
	}
	return path, nil
}

// StartKubeProxy starts kube-proxy for node n in mode with kubeconfig and
// returns once its rules are in place and its /healthz answers. It first
// waits, as long as ctx allows, for any other KubeProxy on the machine to
// be closed, then removes what a kube-proxy killed earlier may have left.
// The caller must Close it; a safety net closes it when the control plane
// stops.
func (n *Node) StartKubeProxy(ctx context.Context, kubeconfig string, mode KubeProxyMode) (_ *KubeProxy, err error) {
	if mode != KubeProxyNFTables && mode != KubeProxyIPTables {
		return nil, fmt.Errorf("starting kube-proxy: unknown mode %q", mode)
	}
	if _, err := Binary("kube-proxy"); err != nil {
		return nil, fmt.Errorf("starting kube-proxy: %w", err)
	}
	tool := "nft"
	if mode == KubeProxyIPTables {
		tool = "iptables"
	}
	if _, err := exec.LookPath(tool); err != nil {
		return nil, fmt.Errorf("starting kube-proxy in %s mode: %w: run hack/install-node-deps.sh as root", mode, err)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}
	ctx, cancel := n.cp.withStop(ctx)
	defer cancel()

	kp := &KubeProxy{Mode: mode, Kubeconfig: kubeconfig, n: n}
	if err := kp.writeConfig(); err != nil {
		return nil, fmt.Errorf("starting kube-proxy: %w", err)
	}
	lock, err := lockProxies(ctx)
	if err != nil {
		return nil, fmt.Errorf("starting kube-proxy: waiting for the other kube-proxy of the machine to be closed: %w", err)
	}
	kp.lock = lock
	defer func() {
		if err != nil {
			kp.Close()
		}
	}()
	// Whatever kube-proxy rules exist now were left by one that was killed.
	if err := kp.cleanRules(ctx); err != nil {
		return nil, fmt.Errorf("starting kube-proxy: removing stale rules: %w", err)
	}
	if mode == KubeProxyIPTables {
		if kp.tablesBefore, err = nftTables(ctx); err != nil {
			return nil, fmt.Errorf("starting kube-proxy: %w", err)
		}
		kp.tracksTables = true
	}
	if err := kp.Start(ctx); err != nil {
		return nil, err
	}
	kp.mu.Lock()
	kp.releaseStop = context.AfterFunc(n.cp.ctx, kp.Close)
	kp.mu.Unlock()
	return kp, nil
}

// StartKubeProxyForTest starts kube-proxy as StartKubeProxy does and closes
// it in t.Cleanup, logging the end of its log when the test failed, and
// failing the test if it left anything on the host (see Leftovers).
func (n *Node) StartKubeProxyForTest(t testing.TB, kubeconfig string, mode KubeProxyMode) *KubeProxy {
	t.Helper()
	kp, err := n.StartKubeProxy(t.Context(), kubeconfig, mode)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", kp.logPath(), kp.Log(40))
		}
		kp.Close()
		if left := kp.Leftovers(); len(left) > 0 {
			t.Errorf("kube-proxy of %s left behind:\n  %s", kp.n.Name, strings.Join(left, "\n  "))
		}
	})
	return kp
}

// writeConfig writes kube-proxy's configuration file and prepares its
// environment.
func (kp *KubeProxy) writeConfig() error {
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	healthz := "127.0.0.1:" + strconv.Itoa(ports[0])
	metrics := "127.0.0.1:" + strconv.Itoa(ports[1])
	kp.HealthzURL = "http://" + healthz + "/healthz"
	kp.MetricsURL = "http://" + metrics + "/metrics"
	// NodePorts never on the machine's external address: on 127.0.0.1 in
	// nftables mode; in iptables mode that would set the route_localnet
	// sysctl for the whole machine, so there on the node's bridge address.
	nodePorts := "127.0.0.1/32"
	if kp.Mode == KubeProxyIPTables {
		bridge, err := kp.n.BridgeIP()
		if err != nil {
			return err
		}
		nodePorts = bridge.String() + "/32"
	}
	data, err := kubeProxyConfig(kp.n.Name, kp.Mode, kp.Kubeconfig, nodePorts, healthz, metrics)
	if err != nil {
		return err
	}
	kp.config = filepath.Join(kp.n.Dir, "kube-proxy.json")
	if err := writeFileAtomic(kp.config, data, 0o644); err != nil {
		return err
	}
	kp.pathEnv = os.Getenv("PATH")
	if kp.Mode == KubeProxyNFTables {
		// In nftables mode kube-proxy also clears whatever iptables and
		// IPVS rules it finds; without iptables on its $PATH it cannot
		// touch (or, through iptables-nft, create) the host's iptables
		// tables. nft lives beside iptables in /usr/sbin, so it gets a
		// directory of its own.
		bin := filepath.Join(kp.n.Dir, "kube-proxy-bin")
		nft, err := exec.LookPath("nft")
		if err != nil {
			return err
		}
		if err := os.MkdirAll(bin, 0o755); err != nil {
			return err
		}
		link := filepath.Join(bin, "nft")
		if err := os.Remove(link); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if err := os.Symlink(nft, link); err != nil {
			return err
		}
		kp.pathEnv = bin + string(filepath.ListSeparator) + kubeletPATH()
	}
	return nil
}

// Start starts kube-proxy (again, after Stop) and waits until its rules are
// in place and /healthz answers.
func (kp *KubeProxy) Start(ctx context.Context) error {
	bin, err := Binary("kube-proxy")
	if err != nil {
		return fmt.Errorf("starting kube-proxy: %w", err)
	}
	kp.mu.Lock()
	switch {
	case kp.closed:
		kp.mu.Unlock()
		return errors.New("starting kube-proxy: it is closed")
	case kp.proc != nil:
		kp.mu.Unlock()
		return errors.New("starting kube-proxy: already running")
	}
	args := []string{"--config=" + kp.config, "--hostname-override=" + kp.n.Name, "--v=2"}
	p, err := startProcess("kube-proxy", kp.logPath(), bin, args, []string{"PATH=" + kp.pathEnv})
	if err == nil {
		kp.proc = p
	}
	kp.mu.Unlock()
	if err != nil {
		return fmt.Errorf("starting kube-proxy: %w", err)
	}
	ctx, cancel := kp.n.cp.withStop(ctx)
	defer cancel()
	err = waitFor(ctx, p, "kube-proxy /healthz", func(ctx context.Context) error {
		if kp.Mode == KubeProxyNFTables {
			tables, err := kubeProxyTables(ctx)
			if err != nil {
				return err
			}
			if len(tables) == 0 {
				return errors.New("no kube-proxy nftables table yet")
			}
		}
		return probeOK(ctx, nil, kp.HealthzURL)
	})
	if err != nil {
		return fmt.Errorf("starting kube-proxy of %s: %w", kp.n.Name, err)
	}
	return nil
}

// Stop does to kube-proxy what a reboot does: the process is stopped and
// its rules are gone, as if the kernel had started afresh. Start brings it
// back. The KubeProxy keeps the machine's lock.
func (kp *KubeProxy) Stop() error {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	return kp.stop()
}

// stop is Stop; the caller holds kp.mu. A closed KubeProxy no longer holds
// the lock, so the rules on the host belong to somebody else.
func (kp *KubeProxy) stop() error {
	if kp.closed {
		return nil
	}
	if kp.proc != nil {
		kp.proc.stop(kubeProxyGrace)
		kp.proc = nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), nodeStopTimeout)
	defer cancel()
	if err := kp.cleanRules(ctx); err != nil {
		return fmt.Errorf("stopping kube-proxy: %w", err)
	}
	return nil
}

// Close stops kube-proxy, removes its rules and releases the machine's
// lock for the next one. What cannot be cleaned is printed, and Leftovers
// lists it. Close is idempotent.
func (kp *KubeProxy) Close() {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	if kp.closed {
		return
	}
	err := kp.stop()
	kp.closed = true
	if kp.releaseStop != nil {
		kp.releaseStop()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: closing kube-proxy of %s: %v\n", kp.n.Name, err)
	}
	// Once the lock is released, tables on the host may be the next
	// kube-proxy's: see what is left while they can only be ours.
	kp.leftTables = kp.tablesLeft()
	if kp.lock != nil {
		unlockProxies(kp.lock)
		kp.lock = nil
	}
}

// Leftovers describes what kube-proxy still holds on the host: its process
// and its nftables tables, including in iptables mode the empty tables
// iptables-nft created for it (after Close, those seen as it released the
// machine's lock). After Close it must be empty.
func (kp *KubeProxy) Leftovers() []string {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	var left []string
	if kp.proc != nil && !kp.proc.exited() {
		left = append(left, fmt.Sprintf("kube-proxy process %d", kp.proc.cmd.Process.Pid))
	}
	if kp.closed {
		return append(left, kp.leftTables...)
	}
	return append(left, kp.tablesLeft()...)
}

// tablesLeft describes kube-proxy's nftables tables on the host.
func (kp *KubeProxy) tablesLeft() []string {
	ctx, cancel := context.WithTimeout(context.Background(), nodeStopTimeout)
	defer cancel()
	tables, err := kubeProxyTables(ctx)
	if err != nil {
		return []string{err.Error()}
	}
	var left []string
	for _, t := range tables {
		left = append(left, "nftables table "+t)
	}
	for _, t := range kp.iptablesTables(ctx) {
		left = append(left, "nftables table "+t+", created by iptables-nft for kube-proxy")
	}
	return left
}

// Log returns the last lines of kube-proxy's log.
func (kp *KubeProxy) Log(lines int) string {
	return tailFile(kp.logPath(), lines)
}

func (kp *KubeProxy) logPath() string { return kp.n.logPath("kube-proxy") }

// cleanRules removes every kube-proxy rule from the host: its nftables
// tables, and in iptables mode its chains, through `kube-proxy --cleanup`
// (which clears every mode's rules). The caller holds the machine's lock
// and kube-proxy is not running.
func (kp *KubeProxy) cleanRules(ctx context.Context) error {
	var errs []error
	if kp.Mode == KubeProxyIPTables {
		bin, err := Binary("kube-proxy")
		if err != nil {
			return err
		}
		cmd := exec.CommandContext(ctx, bin, "--cleanup", "--v=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("kube-proxy --cleanup: %w: %s", err, bytes.TrimSpace(out)))
		}
		errs = append(errs, removeFirewallChain(ctx))
	}
	tables, err := kubeProxyTables(ctx)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, t := range tables {
		errs = append(errs, deleteTable(ctx, t))
	}
	for _, t := range kp.iptablesTables(ctx) {
		errs = append(errs, deleteTable(ctx, t))
	}
	return errors.Join(errs...)
}

// kubeletFirewallChain is kubelet's chain that kube-proxy in iptables mode
// creates too (and its --cleanup leaves, as kubelet's): jumped to from
// INPUT and OUTPUT of the filter table. The framework's kubelets never
// create it (see kubeletPATH).
const kubeletFirewallChain = "KUBE-FIREWALL"

// removeFirewallChain removes kubeletFirewallChain and the jumps to it, for
// IPv4 and IPv6, where it exists.
func removeFirewallChain(ctx context.Context) error {
	var errs []error
	for _, tool := range []string{"iptables", "ip6tables"} {
		run := func(args ...string) error {
			args = append([]string{"-w", "-t", "filter"}, args...)
			out, err := exec.CommandContext(ctx, tool, args...).CombinedOutput()
			if err != nil {
				return fmt.Errorf("%s %s: %w: %s", tool, strings.Join(args, " "), err, bytes.TrimSpace(out))
			}
			return nil
		}
		if run("-S", kubeletFirewallChain) != nil {
			continue // no such chain
		}
		for _, hook := range []string{"INPUT", "OUTPUT"} {
			for run("-C", hook, "-j", kubeletFirewallChain) == nil {
				if err := run("-D", hook, "-j", kubeletFirewallChain); err != nil {
					errs = append(errs, err)
					break
				}
			}
		}
		errs = append(errs, run("-F", kubeletFirewallChain), run("-X", kubeletFirewallChain))
	}
	return errors.Join(errs...)
}

// iptablesTables returns the tables iptables-nft created for kube-proxy in
// iptables mode that hold no rule now: those that did not exist before it
// started. A table with rules is somebody else's too (another program that
// uses iptables, such as flannel), and stays.
func (kp *KubeProxy) iptablesTables(ctx context.Context) []string {
	if !kp.tracksTables {
		return nil
	}
	now, err := nftTables(ctx)
	if err != nil {
		return nil
	}
	var created []string
	for _, t := range now {
		if slices.Contains(kp.tablesBefore, t) {
			continue
		}
		family, name, _ := strings.Cut(t, " ")
		if !slices.Contains([]string{"nat", "filter", "mangle", "raw", "security"}, name) {
			continue
		}
		out, err := exec.CommandContext(ctx, "nft", "list", "table", family, name).Output()
		if err == nil && !hasRules(string(out)) {
			created = append(created, t)
		}
	}
	return created
}

// hasRules reports whether the listing of an nftables table (nft list
// table) holds anything but chains without rules.
func hasRules(listing string) bool {
	for line := range strings.Lines(listing) {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "table", "chain", "type", "}":
		default:
			return true
		}
	}
	return false
}

// deleteTable deletes nftables table t ("family name").
func deleteTable(ctx context.Context, t string) error {
	family, name, _ := strings.Cut(t, " ")
	if out, err := exec.CommandContext(ctx, "nft", "delete", "table", family, name).CombinedOutput(); err != nil {
		return fmt.Errorf("nft delete table %s: %w: %s", t, err, bytes.TrimSpace(out))
	}
	return nil
}

// nftTables lists the host's nftables tables, as "family name".
func nftTables(ctx context.Context) ([]string, error) {
	out, err := exec.CommandContext(ctx, "nft", "list", "tables").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("nft list tables: %w: %s", err, bytes.TrimSpace(out))
	}
	var tables []string
	for line := range strings.Lines(string(out)) {
		// table ip kube-proxy
		if f := strings.Fields(line); len(f) == 3 && f[0] == "table" {
			tables = append(tables, f[1]+" "+f[2])
		}
	}
	return tables, nil
}

// kubeProxyTables lists kube-proxy's nftables tables ("ip kube-proxy",
// "ip6 kube-proxy") that exist on the host. Without nft there are none
// that this framework could have made.
func kubeProxyTables(ctx context.Context) ([]string, error) {
	if _, err := exec.LookPath("nft"); err != nil {
		return nil, nil
	}
	all, err := nftTables(ctx)
	if err != nil {
		return nil, err
	}
	var tables []string
	for _, t := range all {
		if t == "ip "+kubeProxyTable || t == "ip6 "+kubeProxyTable {
			tables = append(tables, t)
		}
	}
	return tables, nil
}

// kubeProxyConfig is the KubeProxyConfiguration of every kube-proxy the
// framework runs: in mode, for node, with kubeconfig ("": its in-cluster
// config), NodePorts on nodePorts, health and metrics on loopback.
func kubeProxyConfig(node string, mode KubeProxyMode, kubeconfig, nodePorts, healthz, metrics string) ([]byte, error) {
	const zero = "0s"
	cfg := map[string]any{
		"apiVersion":         "kubeproxy.config.k8s.io/v1alpha1",
		"kind":               "KubeProxyConfiguration",
		"hostnameOverride":   node,
		"mode":               string(mode),
		"clusterCIDR":        ClusterCIDR,
		"nodePortAddresses":  []string{nodePorts},
		"healthzBindAddress": healthz,
		"metricsBindAddress": metrics,
		// Lowering its OOM score needs CAP_SYS_RESOURCE, which root here
		// lacks (kube-proxy only logs the failure, but says so each start),
		// privileged container or not.
		"oomScoreAdj": 0,
		// Zeros leave the kernel's conntrack settings as they are, instead
		// of raising nf_conntrack_max and the timeouts for the machine.
		"conntrack": map[string]any{
			"maxPerCore":            0,
			"min":                   0,
			"tcpEstablishedTimeout": zero,
			"tcpCloseWaitTimeout":   zero,
			"udpTimeout":            zero,
			"udpStreamTimeout":      zero,
		},
		// Never the route_localnet sysctl, whatever the addresses above.
		"iptables": map[string]any{"localhostNodePorts": false},
	}
	if kubeconfig != "" {
		cfg["clientConnection"] = map[string]any{"kubeconfig": kubeconfig}
	}
	return json.MarshalIndent(cfg, "", "  ")
}

// lockProxies takes the machine's kube-proxy lock and, while it is held,
// routes the service CIDR to lo: a connection to a Service VIP that
// kube-proxy has no rule for yet (or any more) then goes nowhere on this
// machine, instead of following the default route off it. (The route must
// exist: a host connection needs one before kube-proxy's OUTPUT rules
// rewrite its destination. Forwarded pod traffic is rewritten before
// routing.) It waits for the lock as long as ctx allows.
func lockProxies(ctx context.Context) (*os.File, error) {
	f, err := lockFile(ctx, kubeProxyLock)
	if err != nil {
		return nil, err
	}
	if out, err := exec.Command("ip", "route", "replace", serviceCIDR, "dev", "lo").CombinedOutput(); err != nil {
		f.Close()
		return nil, fmt.Errorf("routing the service CIDR %s to lo: %v: %s", serviceCIDR, err, bytes.TrimSpace(out))
	}
	return f, nil
}

// unlockProxies removes the route lockProxies made and releases the lock.
func unlockProxies(f *os.File) {
	if out, err := exec.Command("ip", "route", "del", serviceCIDR, "dev", "lo").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: removing the route of the service CIDR %s: %v: %s\n", serviceCIDR, err, bytes.TrimSpace(out))
	}
	// Closing the file releases the flock.
	f.Close()
}

// lockFile takes an exclusive flock on path, creating it, and waits for it
// until ctx ends. Closing the returned file releases the lock, as does the
// death of the process.
func lockFile(ctx context.Context, path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	err = waitFor(ctx, nil, "lock "+path, func(context.Context) error {
		return syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	})
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
