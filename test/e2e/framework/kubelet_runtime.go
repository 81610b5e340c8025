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
	"strings"
	texttemplate "text/template"
	"time"
)

// containerdConfig is the node's containerd configuration: everything it
// writes lives under the node's directory, and its CRI plugin is set up for
// this machine (see issue 5).
var containerdConfig = texttemplate.Must(texttemplate.New("containerd").Parse(`version = 2
root = "{{.Root}}"
state = "{{.State}}"
# Snapshotters that cannot work here only log errors at every start.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{{.Socket}}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{{.Dir}}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  # The test's own pause image; nothing can be pulled.
  sandbox_image = "{{.PauseImage}}"
  # kubelet asks for oom_score_adj -998 for sandboxes; root here lacks
  # CAP_SYS_RESOURCE to lower a score, and runc then fails with the
  # misleading "can't get final child's PID from pipe: EOF". Restricting
  # clamps the request to containerd's own score.
  restrict_oom_score_adj = true
  # Network namespaces under the state directory rather than /var/run/netns,
  # so that they belong to this node and go with a "reboot".
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{{.CNIBinDir}}"
    conf_dir = "{{.CNIConfDir}}"
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # cgroupfs, as kubelet's cgroupDriver; no systemd manages cgroups here.
        SystemdCgroup = false
        # runc's state with the node's, not in the shared /run/containerd/runc.
        Root = "{{.State}}/runc"
`))

// writeContainerdConfig writes containerd's configuration and the CNI
// network of the node: the static bridge network, or what cni writes.
func (n *Node) writeContainerdConfig(cni func(n *Node, confDir string) (string, error)) error {
	confDir, binDir := filepath.Join(n.Dir, "cni", "net.d"), cniBinDir
	if cni != nil {
		var err error
		if binDir, err = cni(n, confDir); err != nil {
			return err
		}
	}
	var buf bytes.Buffer
	err := containerdConfig.Execute(&buf, map[string]string{
		"Root":       filepath.Join(n.Dir, "containerd"),
		"State":      n.stateDir,
		"Socket":     n.ContainerdSocket,
		"Dir":        n.Dir,
		"PauseImage": PauseImage,
		"CNIBinDir":  binDir,
		"CNIConfDir": confDir,
	})
	if err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(n.Dir, "containerd.toml"), buf.Bytes(), 0o644); err != nil {
		return err
	}
	if cni != nil {
		return nil
	}

	// A bridge with host-local addresses on the node's own subnet. The
	// bridge holds the gateway address, so the host (kubelet's probes, the
	// test) reaches pod IPs directly; no masquerading, since pods have no
	// business outside the machine. containerd's CRI adds the loopback
	// plugin for "lo" itself. host-local keeps its leases under the run
	// directory, which a "reboot" wipes as it would /run.
	conflist, err := json.MarshalIndent(map[string]any{
		"cniVersion": "1.0.0",
		"name":       n.network,
		"plugins": []any{map[string]any{
			"type":        "bridge",
			"bridge":      n.Bridge,
			"isGateway":   true,
			"ipMasq":      false,
			"hairpinMode": true,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": n.PodSubnet}}},
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
				"dataDir": filepath.Join(n.Dir, "run", "cni-ipam"),
			},
		}},
	}, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(n.Dir, "cni", "net.d", "10-outpost.conflist"), conflist, 0o644)
}

// startContainerd starts containerd and waits until it answers and its CRI
// plugin loaded. The caller holds n.mu.
func (n *Node) startContainerd(ctx context.Context) error {
	if err := os.MkdirAll(n.stateDir, 0o755); err != nil {
		return err
	}
	p, err := startProcess("containerd", n.logPath("containerd"), "containerd",
		[]string{"--config", filepath.Join(n.Dir, "containerd.toml")}, nil)
	if err != nil {
		return err
	}
	n.containerd = p
	ctx, cancel := n.cp.withStop(ctx)
	defer cancel()
	return waitFor(ctx, p, "containerd CRI plugin", func(ctx context.Context) error {
		out, err := n.ctr(ctx, "plugins", "ls")
		if err != nil {
			return err
		}
		for line := range strings.Lines(string(out)) {
			f := strings.Fields(line)
			if len(f) >= 3 && f[0] == "io.containerd.grpc.v1" && f[1] == "cri" {
				if f[len(f)-1] != "ok" {
					return fmt.Errorf("containerd's CRI plugin did not load (%s); see %s", f[len(f)-1], p.logPath)
				}
				return nil
			}
		}
		return errors.New("containerd lists no CRI plugin")
	})
}

// ctr runs ctr against the node's containerd, in the k8s.io namespace of
// its CRI plugin, and returns the standard output.
func (n *Node) ctr(ctx context.Context, args ...string) ([]byte, error) {
	args = append([]string{"--address", n.ContainerdSocket, "--namespace", "k8s.io"}, args...)
	cmd := exec.CommandContext(ctx, "ctr", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("ctr %s: %w: %s", strings.Join(args[4:], " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}

// removeContainers kills and deletes every task and container of the
// node's containerd — sandboxes included, since a pod sandbox is the
// container of its pause process — with their snapshots. The caller holds
// n.mu and containerd runs.
func (n *Node) removeContainers(ctx context.Context) error {
	out, err := n.ctr(ctx, "containers", "ls", "-q")
	if err != nil {
		return err
	}
	ids := strings.Fields(string(out))
	if len(ids) == 0 {
		return nil
	}
	for _, id := range ids {
		n.seenContainers[id] = true
	}
	// --force kills a running task with SIGKILL and waits for it. The CRI
	// plugin deletes the task of a container it sees exit, so a delete may
	// race it and fail with "not found": list again until none is left.
	for deadline := time.Now().Add(containerdGrace); ; {
		out, err := n.ctr(ctx, "tasks", "ls", "-q")
		if err != nil {
			return err
		}
		tasks := strings.Fields(string(out))
		if len(tasks) == 0 {
			break
		}
		_, err = n.ctr(ctx, append([]string{"tasks", "rm", "-f"}, tasks...)...)
		if err != nil {
			if time.Now().After(deadline) {
				return fmt.Errorf("tasks %v survive deletion: %w", tasks, err)
			}
			time.Sleep(pollInterval)
		}
	}
	_, err = n.ctr(ctx, append([]string{"containers", "rm"}, ids...)...)
	return err
}

// RemoveAllContainers does to the node what a reboot does, with kubelet
// stopped: every container and pod sandbox is killed and removed, the
// node's volatile state (containerd's state directory, network namespaces,
// tmpfs volumes, kubelet's bind mount, CNI leases and cache, the bridge) is
// gone, and containerd starts again, with its images and nothing running.
// What brings the pods back is kubelet, started with StartKubelet, and the
// pods it can learn from its apiserver (or outpost's cache).
func (n *Node) RemoveAllContainers(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case n.stopped:
		return fmt.Errorf("removing containers of %s: node is stopped", n.Name)
	case n.kubelet != nil:
		return fmt.Errorf("removing containers of %s: stop kubelet first, or it re-creates them as they go", n.Name)
	case n.containerd == nil:
		return fmt.Errorf("removing containers of %s: containerd is not running", n.Name)
	}
	ctx, cancel := n.cp.withStop(ctx)
	defer cancel()
	if err := n.removeContainers(ctx); err != nil {
		return fmt.Errorf("removing containers of %s: %w", n.Name, err)
	}
	n.containerd.stop(containerdGrace)
	n.containerd = nil
	var errs []error
	errs = append(errs, n.killStragglers(), n.cleanHost())
	if err := os.RemoveAll(filepath.Join(n.Dir, "run")); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("removing containers of %s: %w", n.Name, err)
	}
	if err := n.startContainerd(ctx); err != nil {
		return fmt.Errorf("removing containers of %s: restarting containerd: %w", n.Name, err)
	}
	return nil
}
