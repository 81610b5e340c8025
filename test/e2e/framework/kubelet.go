package framework

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
)

// A Node is a real node started by a test: its own containerd (with runc
// and the Debian CNI plugins) and kubelet v1.37.2, as root, with every bit of
// state under Dir, so that several nodes and test binaries can share the
// machine. It exists to prove outpost with the real kubelet — which lists
// and watches, renews its Lease, patches statuses and requests tokens the way
// no simulator does — and real containers that die in a "reboot".
//
// The machine facts it works around (cgroup v1, root without
// CAP_SYS_RESOURCE, no registry, kubelet advertising the external address)
// are described in issue 5 and at each setting below.
type Node struct {
	// Name is the node name (kubelet --hostname-override), so the kubelet's
	// credentials must be system:node:<Name>.
	Name string
	// Dir holds the node's configuration, the logs containerd.log and
	// kubelet.log, and its runtime state. It lives in the control plane's
	// Dir; Stop removes the state and keeps the logs and configuration.
	Dir string
	// Kubeconfig is the kubeconfig kubelet runs with: straight to an
	// apiserver, or through outpost.
	Kubeconfig string
	// Bridge is the CNI bridge interface of the node's pod network and
	// PodSubnet its IPv4 subnet; the host reaches pod IPs through it.
	Bridge    string
	PodSubnet string
	// ContainerdSocket is the gRPC socket of the node's containerd.
	ContainerdSocket string

	cp          *ControlPlane
	subnet      int    // N of 10.200.N.0/24, reserved in subnets
	network     string // CNI network name, the prefix of its cache files
	stateDir    string // containerd state; wiped by a "reboot", like /run
	podLogsDir  string
	kubeletRoot string
	healthzURL  string
	kubeletArgs []string

	mu             sync.Mutex  // guards the fields below
	releaseStop    func() bool // cancels the safety-net Stop of StartNode
	stopped        bool
	containerd     *process
	kubelet        *process
	holdsTunables  bool
	seenContainers map[string]bool // every container ID listed, for Leftovers
}

const (
	// kubeletGrace is how long StopKubelet waits after SIGTERM. kubelet
	// exits at once; the containers keep running, as with systemctl stop.
	kubeletGrace = 5 * time.Second
	// containerdGrace is how long containerd may take to exit after SIGTERM.
	containerdGrace = 10 * time.Second
	// nodeStopTimeout bounds the teardown steps that talk to containerd or
	// the apiserver.
	nodeStopTimeout = 30 * time.Second
)

// cniBinDir is where Debian's containernetworking-plugins installs them.
const cniBinDir = "/usr/lib/cni"

// nodeTools are the host programs a Node runs, all from Debian packages that
// hack/install-node-deps.sh installs.
var nodeTools = []string{"containerd", "containerd-shim-runc-v2", "ctr", "runc", "ip"}

// NodeSupported reports whether StartNode can work on this machine: nil when
// running as root on Linux with the privileges, cgroups and packages a real
// kubelet with containerd needs, otherwise why not. Tests that need a real
// node must say so loudly when it is not nil, and fail rather than skip
// where the machine is meant to support it (CI runs as root).
func NodeSupported() error {
	if runtime.GOOS != "linux" {
		return fmt.Errorf("a real node needs Linux, this is %s", runtime.GOOS)
	}
	if os.Geteuid() != 0 {
		return errors.New("a real node needs root (containerd, runc, mounts and network namespaces)")
	}
	// Root in an unprivileged container is not enough to mount or to
	// create network interfaces. CAP_SYS_RESOURCE is deliberately not
	// required: see restrict_oom_score_adj in containerdConfig.
	for _, capability := range []struct {
		bit  uint
		name string
	}{{21, "CAP_SYS_ADMIN"}, {12, "CAP_NET_ADMIN"}} {
		ok, err := hasCapability(capability.bit)
		if err != nil {
			return fmt.Errorf("reading capabilities: %w", err)
		}
		if !ok {
			return fmt.Errorf("a real node needs %s, which this root lacks", capability.name)
		}
	}
	var missing []string
	for _, tool := range nodeTools {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	for _, plugin := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(cniBinDir, plugin)); err != nil {
			missing = append(missing, filepath.Join(cniBinDir, plugin))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s: run hack/install-node-deps.sh as root", strings.Join(missing, ", "))
	}
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err != nil {
		if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil {
			return errors.New("no cgroup filesystem mounted at /sys/fs/cgroup")
		}
	}
	filesystems, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return fmt.Errorf("reading /proc/filesystems: %w", err)
	}
	if !strings.Contains(string(filesystems), "\toverlay\n") {
		return errors.New("the kernel lacks overlayfs, which containerd's snapshotter needs")
	}
	return nil
}

// RequireRealNode skips t, loudly, on a machine that cannot run a real node
// (see NodeSupported), and fails it instead when CI=true: CI is meant to run
// these tests (as root), and a CI that cannot, for whatever reason, root
// included, must say so by failing rather than pass without testing.
func RequireRealNode(t testing.TB) {
	t.Helper()
	err := NodeSupported()
	if err == nil {
		return
	}
	msg := fmt.Sprintf("REAL KUBELET NOT TESTED: %v", err)
	// Printed outside the test log, so that it shows without -v too.
	fmt.Fprintf(os.Stderr, "\n!!!!! %s !!!!!\n\n", msg)
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s; CI must run this test", msg)
	}
	t.Skip(msg)
}

// hasCapability reports whether the effective capability set holds bit.
func hasCapability(bit uint) (bool, error) {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false, err
	}
	for line := range strings.Lines(string(status)) {
		if hex, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
			if err != nil {
				return false, err
			}
			return caps&(1<<bit) != 0, nil
		}
	}
	return false, errors.New("no CapEff in /proc/self/status")
}

// StartNode starts a node called name whose kubelet uses kubeconfig: a fresh
// containerd with the test images imported, then kubelet. It returns once
// the Node object is Ready, as the admin client sees it. ctx bounds only the
// start (2 minutes when it has no deadline); the node runs until Stop, which
// the caller must call, before stopping the control plane.
//
// The node's kubelet serves on 127.0.0.1 only, and the apiserver never calls
// it: kubelet refuses a loopback node IP and advertises the machine's
// external address, so `kubectl logs/exec` cannot work. Reach a pod through
// its hostNetwork port on 127.0.0.1, or its pod IP through Bridge.
func (c *ControlPlane) StartNode(ctx context.Context, name, kubeconfig string) (*Node, error) {
	return c.startNode(ctx, name, kubeconfig, nodeOptions{})
}

// nodeOptions change how startNode sets a node up; the zero value is
// StartNode's node.
type nodeOptions struct {
	// cni, when set, writes the node's CNI network configuration into
	// confDir in place of the static bridge network, and returns the
	// directory of CNI plugins containerd runs (cniBinDir by default).
	cni func(n *Node, confDir string) (binDir string, err error)
}

// startNode is StartNode with options.
func (c *ControlPlane) startNode(ctx context.Context, name, kubeconfig string, opts nodeOptions) (_ *Node, err error) {
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return nil, fmt.Errorf("starting node %q: invalid name: %s", name, strings.Join(errs, "; "))
	}
	if err := NodeSupported(); err != nil {
		return nil, fmt.Errorf("starting node %s: %w", name, err)
	}
	if _, err := Binary("kubelet"); err != nil {
		return nil, fmt.Errorf("starting node %s: %w", name, err)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}
	ctx, cancel := c.withStop(ctx)
	defer cancel()

	archives, err := c.imageArchives(ctx)
	if err != nil {
		return nil, fmt.Errorf("starting node %s: %w", name, err)
	}
	n, err := c.newNode(name, kubeconfig, opts)
	if err != nil {
		return nil, fmt.Errorf("starting node %s: %w", name, err)
	}
	defer func() {
		if err != nil {
			n.Stop()
		}
	}()
	n.mu.Lock()
	err = n.startContainerd(ctx)
	n.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("starting node %s: %w", name, err)
	}
	if err := n.importImages(ctx, archives); err != nil {
		return nil, fmt.Errorf("starting node %s: %w", name, err)
	}
	if err := n.StartKubelet(ctx); err != nil {
		return nil, fmt.Errorf("starting node %s: %w", name, err)
	}
	if err := n.waitReady(ctx); err != nil {
		return nil, fmt.Errorf("starting node %s: %w", name, err)
	}
	// A safety net for a test that forgets Stop: containers, mounts and
	// the bridge would outlive the test binary, unlike the processes
	// themselves, which die with it.
	n.mu.Lock()
	n.releaseStop = context.AfterFunc(c.ctx, n.Stop)
	n.mu.Unlock()
	return n, nil
}

// StartNodeForTest starts a node for one test, as StartNode does, and tears
// it down in t.Cleanup: when the test failed it logs the end of kubelet's
// log first, and it fails the test if the node left anything on the host
// (see Leftovers). A node that cannot start fails the test.
func (c *ControlPlane) StartNodeForTest(t testing.TB, name, kubeconfig string) *Node {
	t.Helper()
	return c.startNodeForTest(t, name, kubeconfig, nodeOptions{})
}

// startNodeForTest is StartNodeForTest with options.
func (c *ControlPlane) startNodeForTest(t testing.TB, name, kubeconfig string, opts nodeOptions) *Node {
	t.Helper()
	n, err := c.startNode(t.Context(), name, kubeconfig, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", n.logPath("kubelet"), n.KubeletLog(60))
		}
		n.Stop()
		if left := n.Leftovers(); len(left) > 0 {
			t.Errorf("node %s left behind:\n  %s", n.Name, strings.Join(left, "\n  "))
		}
	})
	return n
}

// newNode creates the node's directories and configuration files.
func (c *ControlPlane) newNode(name, kubeconfig string, opts nodeOptions) (_ *Node, err error) {
	dir := filepath.Join(c.Dir, "node-"+name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating node directory: %w", err)
	}
	n := &Node{
		Name:             name,
		Dir:              dir,
		Kubeconfig:       kubeconfig,
		ContainerdSocket: filepath.Join(dir, "run", "containerd.sock"),
		cp:               c,
		stateDir:         filepath.Join(dir, "run", "containerd"),
		podLogsDir:       filepath.Join(dir, "pod-logs"),
		kubeletRoot:      filepath.Join(dir, "kubelet"),
		seenContainers:   map[string]bool{},
	}
	// A unix socket path must fit in sun_path (108 bytes), and the
	// ".ttrpc" socket containerd puts next to it is longer still.
	if len(n.ContainerdSocket)+len(".ttrpc") >= 108 {
		return nil, fmt.Errorf("containerd socket path %s is too long for a unix socket", n.ContainerdSocket)
	}
	subnet, err := reserveSubnet()
	if err != nil {
		return nil, err
	}
	n.subnet = subnet
	defer func() {
		if err != nil {
			releaseSubnet(subnet)
		}
	}()
	id := randomID()
	n.Bridge = "opb" + id // at most 15 bytes, the kernel's limit
	n.network = "outpost-" + id
	n.PodSubnet = fmt.Sprintf("10.200.%d.0/24", subnet)
	for _, d := range []string{n.stateDir, n.podLogsDir, n.kubeletRoot, filepath.Join(dir, "cni", "net.d")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := n.writeContainerdConfig(opts.cni); err != nil {
		return nil, err
	}
	if err := n.writeKubeletConfig(); err != nil {
		return nil, err
	}
	return n, nil
}

// writeKubeletConfig writes kubelet's configuration file (JSON, which kubelet
// reads as YAML) and its command line.
func (n *Node) writeKubeletConfig() error {
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	n.healthzURL = "http://127.0.0.1:" + strconv.Itoa(ports[1]) + "/healthz"
	cfg := map[string]any{
		"apiVersion": "kubelet.config.k8s.io/v1beta1",
		"kind":       "KubeletConfiguration",
		// Loopback only: nothing off the machine, and no test, calls it.
		"address":            "127.0.0.1",
		"port":               ports[0],
		"readOnlyPort":       0,
		"healthzBindAddress": "127.0.0.1",
		"healthzPort":        ports[1],
		// The apiserver never calls this kubelet, so there is nobody to
		// authorize with a webhook; client certificates of the cluster CA
		// are accepted and anonymous requests are not.
		"authentication": map[string]any{
			"anonymous": map[string]any{"enabled": false},
			"webhook":   map[string]any{"enabled": false},
			"x509":      map[string]any{"clientCAFile": n.cp.CAFile},
		},
		"authorization":            map[string]any{"mode": "AlwaysAllow"},
		"containerRuntimeEndpoint": "unix://" + n.ContainerdSocket,
		// cgroup v1 without systemd managing the test's cgroups: kubelet
		// and runc write cgroupfs directly, with no QoS hierarchy and no
		// node allocatable enforcement to set up. Kubelet v1.35+ refuses
		// cgroup v1 unless told otherwise.
		"cgroupDriver":           "cgroupfs",
		"cgroupsPerQOS":          false,
		"enforceNodeAllocatable": []string{},
		"failCgroupV1":           false,
		"failSwapOn":             false,
		// The test images cannot be pulled again, so image GC must never
		// delete them, and a busy disk must not evict the test's pods.
		"imageGCHighThresholdPercent": 100,
		"imageGCLowThresholdPercent":  99,
		"evictionHard": map[string]string{
			"memory.available":  "1Mi",
			"nodefs.available":  "1%",
			"nodefs.inodesFree": "1%",
			"imagefs.available": "1%",
		},
		// The kubeconfig's client certificate is all the node has: no TLS
		// bootstrap, no rotation, a self-signed serving certificate.
		"rotateCertificates": false,
		"serverTLSBootstrap": false,
		// Keep kubelet's files under Dir rather than /var/log/pods and
		// /usr/libexec.
		"podLogsDir":      n.podLogsDir,
		"volumePluginDir": filepath.Join(n.kubeletRoot, "volume-plugins"),
		"clusterDomain":   "cluster.local",
	}
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(n.Dir, "kubelet.json")
	if err := writeFileAtomic(path, data, 0o644); err != nil {
		return err
	}
	n.kubeletArgs = []string{
		"--config=" + path,
		"--kubeconfig=" + n.Kubeconfig,
		"--hostname-override=" + n.Name,
		"--root-dir=" + n.kubeletRoot,
		"--cert-dir=" + filepath.Join(n.kubeletRoot, "pki"),
		"--v=2",
	}
	return nil
}

// StartKubelet starts kubelet (again, after StopKubelet) with the same
// configuration and waits until its own /healthz answers. It does not wait
// for the apiserver to see the node, which may be unreachable on purpose.
func (n *Node) StartKubelet(ctx context.Context) error {
	bin, err := Binary("kubelet")
	if err != nil {
		return fmt.Errorf("starting kubelet of %s: %w", n.Name, err)
	}
	n.mu.Lock()
	if n.stopped {
		n.mu.Unlock()
		return fmt.Errorf("starting kubelet of %s: node is stopped", n.Name)
	}
	if n.kubelet != nil {
		n.mu.Unlock()
		return fmt.Errorf("starting kubelet of %s: already running", n.Name)
	}
	if n.containerd == nil {
		n.mu.Unlock()
		return fmt.Errorf("starting kubelet of %s: containerd is not running", n.Name)
	}
	if !n.holdsTunables {
		if err := holdKernelTunables(); err != nil {
			n.mu.Unlock()
			return fmt.Errorf("starting kubelet of %s: %w", n.Name, err)
		}
		n.holdsTunables = true
	}
	p, err := startProcess("kubelet", n.logPath("kubelet"), bin, n.kubeletArgs, []string{"PATH=" + kubeletPATH()})
	if err == nil {
		n.kubelet = p
	}
	n.mu.Unlock()
	if err != nil {
		return fmt.Errorf("starting kubelet of %s: %w", n.Name, err)
	}

	ctx, cancel := n.cp.withStop(ctx)
	defer cancel()
	err = waitFor(ctx, p, "kubelet /healthz", func(ctx context.Context) error {
		return probeOK(ctx, nil, n.healthzURL)
	})
	if err != nil {
		return fmt.Errorf("starting kubelet of %s: %w", n.Name, err)
	}
	return nil
}

// kubeletPATH is $PATH without the directories that hold iptables. Where
// iptables exists (Debian's CNI plugins depend on it), kubelet adds canary
// chains and a KUBE-FIREWALL rule dropping non-local traffic to 127.0.0.0/8
// to the host's firewall and never removes them; the bridge network needs
// none of it, and without iptables kubelet just logs that it skips it
// (pkg/kubelet/kubelet_network_linux.go). Nothing else kubelet runs for
// these pods (mount, umount) lives only in those directories.
func kubeletPATH() string {
	var keep []string
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if _, err := os.Stat(filepath.Join(dir, "iptables")); err == nil {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, "ip6tables")); err == nil {
			continue
		}
		keep = append(keep, dir)
	}
	return strings.Join(keep, string(filepath.ListSeparator))
}

// StopKubelet stops kubelet only and waits for it to exit; the containers
// keep running. Stopping a stopped kubelet does nothing.
func (n *Node) StopKubelet() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.kubelet != nil {
		n.kubelet.stop(kubeletGrace)
		n.kubelet = nil
	}
	return nil
}

// KubeletLog returns the last lines of kubelet's log, for failure messages.
func (n *Node) KubeletLog(lines int) string {
	return tailFile(n.logPath("kubelet"), lines)
}

// ContainerdLog returns the last lines of containerd's log.
func (n *Node) ContainerdLog(lines int) string {
	return tailFile(n.logPath("containerd"), lines)
}

func (n *Node) logPath(name string) string {
	return filepath.Join(n.Dir, name+".log")
}

// waitReady waits until the Node object exists and is Ready.
func (n *Node) waitReady(ctx context.Context) error {
	n.mu.Lock()
	p := n.kubelet
	n.mu.Unlock()
	return waitFor(ctx, p, "node "+n.Name+" Ready", func(ctx context.Context) error {
		node, err := n.cp.client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range node.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				if cond.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("node not ready (Ready=%s): %s: %s", cond.Status, cond.Reason, cond.Message)
			}
		}
		return errors.New("no Ready condition yet")
	})
}

// Stop tears the node down completely and waits for it: kubelet, every
// container and sandbox, containerd, the shims, every mount under Dir
// (kubelet bind-mounts its root directory onto itself and mounts tmpfs
// volumes), the bridge, CNI cache files, kubelet's log symlinks and, as the
// last node of the process stops, the kernel settings kubelet changed. Then
// it force-deletes the node's pods and its Node object from the apiserver,
// if it still answers. What cannot be cleaned is printed, and Leftovers
// lists it. Stop is idempotent.
func (n *Node) Stop() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.stopped {
		return
	}
	n.stopped = true
	if n.releaseStop != nil {
		n.releaseStop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), nodeStopTimeout)
	defer cancel()

	var errs []error
	if n.kubelet != nil {
		n.kubelet.stop(kubeletGrace)
		n.kubelet = nil
	}
	if n.containerd != nil {
		errs = append(errs, n.removeContainers(ctx))
		n.containerd.stop(containerdGrace)
		n.containerd = nil
	}
	errs = append(errs, n.killStragglers(), n.cleanHost())
	if n.holdsTunables {
		errs = append(errs, releaseKernelTunables())
		n.holdsTunables = false
	}
	for _, d := range []string{filepath.Join(n.Dir, "run"), n.kubeletRoot, n.podLogsDir, filepath.Join(n.Dir, "containerd")} {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, err)
		}
	}
	releaseSubnet(n.subnet)
	// After a Stop of the control plane there is nobody to tell.
	if n.cp.ctx.Err() == nil {
		errs = append(errs, n.deleteAPIObjects(ctx))
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: stopping node %s: %v\n", n.Name, err)
	}
}

// deleteAPIObjects force-deletes the pods bound to the node and the Node,
// so that a control plane shared by several tests shows no ghost pods.
func (n *Node) deleteAPIObjects(ctx context.Context) error {
	client := n.cp.client
	pods, err := client.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + n.Name})
	if err != nil {
		return fmt.Errorf("listing pods of the node: %w", err)
	}
	force := metav1.DeleteOptions{GracePeriodSeconds: new(int64)}
	var errs []error
	for _, pod := range pods.Items {
		if err := client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, force); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("deleting pod %s/%s: %w", pod.Namespace, pod.Name, err))
		}
	}
	if err := client.CoreV1().Nodes().Delete(ctx, n.Name, metav1.DeleteOptions{}); err != nil && !isNotFound(err) {
		errs = append(errs, fmt.Errorf("deleting node: %w", err))
	}
	return errors.Join(errs...)
}
