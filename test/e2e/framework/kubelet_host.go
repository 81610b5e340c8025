package framework

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
)

// What a Node leaves on the host outside its directory, and how Stop and
// RemoveAllContainers find and clean it.
const (
	// cniCacheDir is libcni's result cache, which containerd 1.6 cannot
	// move: one file per network, sandbox and interface, removed by a CNI
	// DEL that a killed sandbox never gets.
	cniCacheDir = "/var/lib/cni/results"
	// containerLogLinks is where kubelet links each container's log, under
	// a name that holds the container ID; kubelet removes a link only when
	// it removes the container itself.
	containerLogLinks = "/var/log/containers"
	// shimSocketDir holds the socket of every containerd 1.6 shim,
	// whatever containerd's state directory, named by the SHA-256 of
	// "<containerd address>/<namespace>/<shim id>" (a pod's containers
	// share the shim of its sandbox). A shim removes it as it exits, unless
	// killed.
	shimSocketDir = "/run/containerd/s"
)

// cleanHost removes what a node's runtime leaves on the host once its
// processes are gone: mounts under Dir, the bridge (and with it any veth
// still attached), CNI cache files and kubelet's log links. The caller
// holds n.mu.
func (n *Node) cleanHost() error {
	var errs []error
	errs = append(errs, unmountUnder(n.Dir))
	if _, err := net.InterfaceByName(n.Bridge); err == nil {
		if out, err := exec.Command("ip", "link", "delete", n.Bridge).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("deleting bridge %s: %v: %s", n.Bridge, err, bytes.TrimSpace(out)))
		}
	}
	for _, f := range n.hostFiles() {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	// runc removes a container's cgroup but not their common parent,
	// which the CRI plugin names after its namespace for every node of the
	// machine: it goes when it is empty, which rmdir checks.
	for _, d := range n.cgroupDirs() {
		if err := syscall.Rmdir(d); err != nil && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("removing cgroup %s: %w", d, err))
		}
	}
	for _, parent := range cgroupHierarchies(criCgroupParent) {
		_ = syscall.Rmdir(parent)
	}
	return errors.Join(errs...)
}

// criCgroupParent is where containerd's CRI plugin puts containers whose
// sandbox names no parent cgroup, as kubelet does without cgroupsPerQOS.
const criCgroupParent = "k8s.io"

// cgroupHierarchies returns path (relative to a cgroup root) in every
// mounted hierarchy where it exists: /sys/fs/cgroup/<controller>/path for
// cgroup v1, /sys/fs/cgroup/path for v2.
func cgroupHierarchies(path string) []string {
	dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", path))
	if v2 := filepath.Join("/sys/fs/cgroup", path); isDir(v2) {
		dirs = append(dirs, v2)
	}
	return dirs
}

// cgroupDirs returns the cgroups left of the node's containers.
func (n *Node) cgroupDirs() []string {
	var dirs []string
	for id := range n.seenContainers {
		dirs = append(dirs, cgroupHierarchies(filepath.Join(criCgroupParent, id))...)
	}
	return dirs
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func isDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}

// hostFiles lists the node's CNI cache files, the sockets of its killed
// shims and kubelet's log links to its pod logs.
func (n *Node) hostFiles() []string {
	var files []string
	entries, _ := os.ReadDir(cniCacheDir)
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, n.network+"-") {
			files = append(files, filepath.Join(cniCacheDir, name))
			continue
		}
		// containerd names its loopback network "cni-loopback".
		if id, ok := strings.CutPrefix(name, "cni-loopback-"); ok && n.seenContainers[strings.TrimSuffix(id, "-lo")] {
			files = append(files, filepath.Join(cniCacheDir, name))
		}
	}
	for id := range n.seenContainers {
		sum := sha256.Sum256([]byte(n.ContainerdSocket + "/k8s.io/" + id))
		if socket := filepath.Join(shimSocketDir, hex.EncodeToString(sum[:])); exists(socket) {
			files = append(files, socket)
		}
	}
	links, _ := os.ReadDir(containerLogLinks)
	for _, l := range links {
		path := filepath.Join(containerLogLinks, l.Name())
		if target, err := os.Readlink(path); err == nil && strings.HasPrefix(target, n.podLogsDir+"/") {
			files = append(files, path)
		}
	}
	return files
}

// stragglers returns the processes of the node that outlive containerd:
// its shims (each started detached, in its own process group) and any
// process still in the cgroup of one of its containers. Containers of other
// nodes share the cgroup parent, so only known IDs count.
func (n *Node) stragglers() map[int]string {
	found := map[int]string{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		if slices.Contains(args, n.ContainerdSocket) {
			found[pid] = strings.Join(args, " ")
			continue
		}
		cgroups, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
		if err != nil {
			continue
		}
		for id := range n.seenContainers {
			if bytes.Contains(cgroups, []byte(id)) {
				found[pid] = strings.Join(args, " ")
				break
			}
		}
	}
	return found
}

// killStragglers waits a moment for the node's processes that outlive
// containerd to exit, then SIGKILLs them and waits for them to go.
// Normally there are none: a shim exits once its tasks are deleted, though
// not always before containerd does, and it removes its socket on the way.
func (n *Node) killStragglers() error { return killLingering("processes", n.stragglers) }

// killLingering waits up to 2 s for the processes find returns (by pid) to
// exit, then SIGKILLs those left and waits up to 5 s for them to go; it
// fails naming what (what) survives.
func killLingering(what string, find func() map[int]string) error {
	procs := find()
	for deadline := time.Now().Add(2 * time.Second); len(procs) > 0 && time.Now().Before(deadline); {
		time.Sleep(pollInterval)
		procs = find()
	}
	for pid := range procs {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	for deadline := time.Now().Add(5 * time.Second); len(procs) > 0 && time.Now().Before(deadline); {
		time.Sleep(pollInterval)
		procs = find()
	}
	if len(procs) > 0 {
		return fmt.Errorf("%s survive SIGKILL: %v", what, procs)
	}
	return nil
}

// Leftovers describes what the node still holds on the host: running
// processes, mounts under Dir, its bridge, CNI cache files, log links and
// cgroups.
// After Stop it must be empty; tests check that teardown leaves nothing.
func (n *Node) Leftovers() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var left []string
	for _, p := range []*process{n.kubelet, n.containerd} {
		if p != nil && !p.exited() {
			left = append(left, fmt.Sprintf("%s process %d", p.name, p.cmd.Process.Pid))
		}
	}
	for pid, cmd := range n.stragglers() {
		left = append(left, fmt.Sprintf("process %d: %s", pid, cmd))
	}
	mounts, err := mountsUnder(n.Dir)
	if err != nil {
		left = append(left, err.Error())
	}
	for _, m := range mounts {
		left = append(left, "mount "+m)
	}
	if _, err := net.InterfaceByName(n.Bridge); err == nil {
		left = append(left, "bridge "+n.Bridge)
	}
	for _, f := range n.hostFiles() {
		left = append(left, "file "+f)
	}
	for _, d := range n.cgroupDirs() {
		left = append(left, "cgroup "+d)
	}
	return left
}

// mountsUnder returns the mount points at or below dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("reading mounts: %w", err)
	}
	var mounts []string
	for line := range strings.Lines(string(data)) {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountPath(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			mounts = append(mounts, mp)
		}
	}
	slices.SortFunc(mounts, func(a, b string) int { return len(b) - len(a) })
	return mounts, nil
}

// unescapeMountPath undoes the octal escapes (\040 for a space...) of
// /proc/self/mountinfo.
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountUnder detaches every mount at or below dir. kubelet makes its root
// directory a shared bind mount of itself, so unmounting can take a few
// rounds as mounts propagate between peers.
func unmountUnder(dir string) error {
	for range 10 {
		mounts, err := mountsUnder(dir)
		if err != nil || len(mounts) == 0 {
			return err
		}
		for _, mp := range mounts {
			// EINVAL: no longer a mount point, gone with a peer.
			if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
				return fmt.Errorf("unmounting %s: %w", mp, err)
			}
		}
	}
	mounts, _ := mountsUnder(dir)
	if len(mounts) > 0 {
		return fmt.Errorf("mounts remain under %s: %v", dir, mounts)
	}
	return nil
}

// kubelet with protectKernelDefaults off (the default, and the only way it
// starts on a machine whose settings differ) rewrites these sysctls at
// start (pkg/kubelet/cm/container_manager_linux.go, setupKernelTunables).
// The first node of the process to start kubelet saves them and the last
// one to stop restores them, so that tests leave the machine as they found
// it — kernel.panic_on_oops=1 would turn any oops into a reboot.
var kernelTunables = []string{
	"vm/overcommit_memory",
	"vm/panic_on_oom",
	"kernel/panic",
	"kernel/panic_on_oops",
	"kernel/keys/root_maxkeys",
	"kernel/keys/root_maxbytes",
}

var tunables struct {
	mu    sync.Mutex // guards the fields below
	users int
	saved map[string][]byte
}

func holdKernelTunables() error {
	tunables.mu.Lock()
	defer tunables.mu.Unlock()
	if tunables.users == 0 {
		saved := map[string][]byte{}
		for _, t := range kernelTunables {
			v, err := os.ReadFile(filepath.Join("/proc/sys", t))
			if err != nil {
				return fmt.Errorf("saving kernel settings: %w", err)
			}
			saved[t] = v
		}
		tunables.saved = saved
	}
	tunables.users++
	return nil
}

func releaseKernelTunables() error {
	tunables.mu.Lock()
	defer tunables.mu.Unlock()
	tunables.users--
	if tunables.users > 0 {
		return nil
	}
	var errs []error
	for t, v := range tunables.saved {
		path := filepath.Join("/proc/sys", t)
		if now, err := os.ReadFile(path); err == nil && bytes.Equal(now, v) {
			continue
		}
		if err := os.WriteFile(path, v, 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restoring kernel setting %s: %w", t, err))
		}
	}
	tunables.saved = nil
	return errors.Join(errs...)
}

// Pod subnets are 10.200.N.0/24, one N per node: reserved in this process,
// and chosen at random among those no interface of the machine uses, so
// that test binaries running at once rarely collide.
var subnets struct {
	mu   sync.Mutex // guards used
	used map[int]bool
}

func reserveSubnet() (int, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return 0, fmt.Errorf("choosing a pod subnet: %w", err)
	}
	subnets.mu.Lock()
	defer subnets.mu.Unlock()
	if subnets.used == nil {
		subnets.used = map[int]bool{}
	}
	start := mathrand.IntN(254)
next:
	for i := range 254 {
		n := (start+i)%254 + 1
		if subnets.used[n] {
			continue
		}
		subnet := &net.IPNet{IP: net.IPv4(10, 200, byte(n), 0), Mask: net.CIDRMask(24, 32)}
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && subnet.Contains(ipn.IP) {
				continue next
			}
		}
		subnets.used[n] = true
		return n, nil
	}
	return 0, errors.New("choosing a pod subnet: every 10.200.N.0/24 is in use")
}

func releaseSubnet(n int) {
	subnets.mu.Lock()
	defer subnets.mu.Unlock()
	delete(subnets.used, n)
}

// randomID returns 8 random hex digits, to name a node's bridge and network.
func randomID() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func isNotFound(err error) bool { return apierrors.IsNotFound(err) }
