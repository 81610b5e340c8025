package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"

	"github.com/outposthq/outpost/internal/setup"
)

// Exit codes of outpost setup-node.
const (
	setupOK         = 0 // done, or nothing to do
	setupFailed     = 1 // a step failed; the ones before it were made
	setupUsage      = 2
	setupKubeconfig = 3 // kubelet's kubeconfig cannot be used
)

// setupNode runs `outpost setup-node`.
func setupNode(args []string, stdout, stderr io.Writer) int {
	host, _ := os.Hostname()
	cfg := setup.DefaultConfig(host)
	if self, err := os.Executable(); err == nil {
		cfg.Binary = self
	}
	var undo, dryRun bool
	var manager string
	fs := flag.NewFlagSet("outpost setup-node", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&cfg.KubeletKubeconfig, "kubelet-kubeconfig", cfg.KubeletKubeconfig, "kubelet's kubeconfig (kubeadm's); saved once, then pointed at outpost")
	fs.StringVar(&cfg.OutpostKubeconfig, "outpost-kubeconfig", cfg.OutpostKubeconfig, "where outpost's upstream kubeconfig is written (from kubelet's: its server, cluster CA and rotating client certificate)")
	fs.StringVar(&cfg.DataDir, "data-dir", cfg.DataDir, "outpost's state directory, as outpost run takes it")
	fs.StringVar(&cfg.UnitFile, "unit-file", cfg.UnitFile, "outpost's systemd unit")
	fs.StringVar(&cfg.Binary, "binary", cfg.Binary, "the outpost binary the unit runs (default: this one)")
	fs.StringVar(&cfg.NodeName, "node-name", cfg.NodeName, "name of this node (default: hostname)")
	fs.StringVar(&cfg.SecureAddress, "secure-address", cfg.SecureAddress, "outpost's TLS listener, which kubelet is pointed at")
	fs.StringVar(&cfg.AdminAddress, "admin-address", cfg.AdminAddress, "outpost's admin listener")
	fs.StringVar(&cfg.NodeLocalAddress, "node-local-address", cfg.NodeLocalAddress, `outpost's address for the node's pods, put on lo by the unit ("" for none; see README "Putting a node behind outpost")`)
	fs.StringVar(&manager, "service-manager", "systemd", `"systemd", or "none" to only write the files (then start outpost with the unit's command line and restart kubelet yourself)`)
	fs.BoolVar(&undo, "undo", false, "take the node out from behind outpost: restore kubelet's kubeconfig, stop and remove outpost's unit (its cache stays in --data-dir)")
	fs.BoolVar(&cfg.Remove, "remove", false, "with --undo: also stop and remove outpost, though pods started behind it still reach the apiserver through its node-local address (restart them first)")
	fs.BoolVar(&dryRun, "dry-run", false, "print every change, make none")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, "Usage: outpost setup-node [--undo] [--dry-run] [flags]\n\nPuts this kubeadm node behind outpost, or (--undo) takes it out again. Idempotent.\n\nFlags:\n")
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return setupOK
		}
		fmt.Fprintf(stderr, "outpost setup-node: %v\nSee 'outpost setup-node --help'.\n", err)
		return setupUsage
	}
	if problem := setupUsageProblem(&cfg, fs.NArg(), manager); problem != "" {
		fmt.Fprintf(stderr, "outpost setup-node: %s\nSee 'outpost setup-node --help'.\n", problem)
		return setupUsage
	}
	if manager == "systemd" {
		cfg.Services, cfg.Ready = setup.Systemd{}, setup.WaitReady
	}

	plan, verb := cfg.Plan, "put this node behind outpost"
	if undo {
		plan, verb = cfg.UndoPlan, "take this node out from behind outpost"
	}
	steps, err := plan()
	if errors.Is(err, setup.ErrKubeconfig) {
		fmt.Fprintf(stderr, "outpost setup-node: %v\n", err)
		return setupKubeconfig
	}
	if err != nil {
		fmt.Fprintf(stderr, "outpost setup-node: %v\n", err)
		return setupFailed
	}
	if len(steps) == 0 {
		fmt.Fprintf(stdout, "nothing to do: already done (%s)\n", verb)
		if undo && cfg.KeptForPods() {
			fmt.Fprintln(stdout, "outpost still runs for the pods started behind it; restart them, then run outpost setup-node --undo --remove")
		}
		return setupOK
	}
	if dryRun {
		fmt.Fprintf(stdout, "would %s in %d steps:\n", verb, len(steps))
		for i, s := range steps {
			fmt.Fprintf(stdout, "  %d. %s\n", i+1, s.What)
		}
		return setupOK
	}
	if err := setup.Apply(steps, stdout); err != nil {
		fmt.Fprintf(stderr, "outpost setup-node: %v\n(the steps before it were made; run it again once that is fixed)\n", err)
		return setupFailed
	}
	fmt.Fprintf(stdout, "done: %s\n", verb)
	return setupOK
}

// setupUsageProblem says what is wrong with the command line, or "".
func setupUsageProblem(cfg *setup.Config, args int, manager string) string {
	switch {
	case args > 0:
		return "unexpected arguments"
	case manager != "systemd" && manager != "none":
		return fmt.Sprintf("--service-manager %q: want systemd or none", manager)
	case cfg.NodeName == "":
		return "--node-name is empty and the hostname is unknown"
	case cfg.Binary == "":
		return "--binary is empty and this program's path is unknown"
	}
	if cfg.NodeLocalAddress != "" {
		if ap, err := netip.ParseAddrPort(cfg.NodeLocalAddress); err != nil || ap.Port() == 0 {
			return fmt.Sprintf("--node-local-address %q: want IP:port", cfg.NodeLocalAddress)
		}
	}
	for _, f := range []struct{ name, v string }{{"--kubelet-kubeconfig", cfg.KubeletKubeconfig}, {"--outpost-kubeconfig", cfg.OutpostKubeconfig},
		{"--data-dir", cfg.DataDir}, {"--unit-file", cfg.UnitFile}, {"--secure-address", cfg.SecureAddress}, {"--admin-address", cfg.AdminAddress}} {
		if f.v == "" {
			return f.name + " is required"
		}
	}
	if manager == "systemd" && (strings.HasPrefix(cfg.Binary, "/tmp/") || strings.HasPrefix(cfg.Binary, "/home/") || strings.HasPrefix(cfg.Binary, "/root/")) {
		return fmt.Sprintf("--binary %s: the unit cannot run a program under /tmp, /home or /root (it runs with PrivateTmp and ProtectHome); install outpost as /usr/local/bin/outpost", cfg.Binary)
	}
	return ""
}
