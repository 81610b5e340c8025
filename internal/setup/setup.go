// Package setup puts a kubeadm node behind outpost, and takes it out again
// (`outpost setup-node [--undo] [--dry-run]`). It plans every change first
// as a list of steps, each saying what it changes, so that a dry run prints
// exactly what a real run would do; a real run applies them in order and
// stops at the first that fails. Every step looks at the node first and does
// nothing when its change is already there, so running it twice is safe.
//
// Setting up: outpost's upstream kubeconfig is written from kubelet's
// (kubelet's server, cluster CA and rotating client certificate, which
// outpost then uses as the node's credential); the systemd unit is written
// and started (and with it the node-local address on lo); kubelet's
// kubeconfig is saved once, then pointed at outpost (trusting the cluster CA
// and outpost's own, which it serves until its CSR is approved); kubelet is
// restarted. Its pods keep running: a kubelet restart does not touch them.
// Undoing: kubelet's saved kubeconfig is put back and kubelet restarted,
// outpost stopped, its unit, kubeconfig and the saved copy removed, and the
// node-local address taken off lo. outpost's cache stays in its data
// directory.
package setup

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/outposthq/outpost/internal/atomicfile"
	"github.com/outposthq/outpost/internal/certs"
)

// Config is what setup-node is told about the node and outpost.
type Config struct {
	// KubeletKubeconfig is kubelet's kubeconfig, kubeadm's
	// /etc/kubernetes/kubelet.conf.
	KubeletKubeconfig string
	// OutpostKubeconfig is where outpost's upstream kubeconfig is written.
	OutpostKubeconfig string
	// DataDir is outpost's --data-dir; the saved kubelet kubeconfig and the
	// CA bundle kubelet trusts live in DataDir/setup.
	DataDir string
	// UnitFile is outpost's systemd unit.
	UnitFile string
	// Binary is the outpost binary the unit runs.
	Binary string
	// NodeName is the node's name.
	NodeName string
	// SecureAddress and AdminAddress are outpost's listeners.
	SecureAddress, AdminAddress string
	// NodeLocalAddress, when set, is outpost's node-local address for
	// in-cluster clients; the unit puts its IP on lo before starting, and
	// outpost then obtains a serving certificate from the cluster CA
	// (--rotate-server-certificates, approved by outpost-controller).
	NodeLocalAddress string
	// Services starts, stops and restarts outpost and kubelet. Nil: nothing
	// is started or restarted; the plan says what the operator must do.
	Services Services
	// Ready waits until outpost at AdminAddress is ready. Nil: not waited
	// for.
	Ready func(adminAddress string, timeout time.Duration) error
	// Remove, with UndoPlan, also stops and removes outpost when pods may
	// still depend on its node-local address.
	Remove bool
}

// DefaultConfig is the Config of a kubeadm node with outpost installed as
// /usr/local/bin/outpost, whose name is node.
func DefaultConfig(node string) Config {
	return Config{
		KubeletKubeconfig: "/etc/kubernetes/kubelet.conf",
		OutpostKubeconfig: "/etc/outpost/node.kubeconfig",
		DataDir:           "/var/lib/outpost",
		UnitFile:          "/etc/systemd/system/" + OutpostUnit,
		Binary:            "/usr/local/bin/outpost",
		NodeName:          node,
		SecureAddress:     "127.0.0.1:10268",
		AdminAddress:      "127.0.0.1:10267",
		NodeLocalAddress:  "169.254.2.1:10269",
	}
}

// Services is the node's service manager (systemd).
type Services interface {
	// Reload makes it read unit files again.
	Reload() error
	// Active reports whether unit is running.
	Active(unit string) bool
	// EnableStart enables and starts unit; Restart restarts it;
	// DisableStop stops and disables it.
	EnableStart(unit string) error
	Restart(unit string) error
	DisableStop(unit string) error
}

// Units named by setup.
const (
	OutpostUnit = "outpost.service"
	KubeletUnit = "kubelet.service"
)

// A Step is one change to the node.
type Step struct {
	// What says what it changes, for a person.
	What string
	// Do makes the change.
	Do func() error
	// note: the step changes nothing by itself, it tells the operator.
	note bool
}

// ErrKubeconfig marks a kubelet kubeconfig that cannot be used (missing,
// unreadable, or without a server, CA or client credential).
var ErrKubeconfig = errors.New("kubelet's kubeconfig cannot be used")

// Paths derived from Config.
func (c *Config) backupPath() string {
	return filepath.Join(c.DataDir, "setup", "kubelet.kubeconfig.orig")
}
func (c *Config) bundlePath() string {
	return filepath.Join(c.DataDir, "setup", "kubelet-trusted-ca.crt")
}
func (c *Config) outpostURL() string { return "https://" + c.SecureAddress }

// Plan returns the steps that put the node behind outpost; none when it
// already is.
func (c *Config) Plan() ([]Step, error) {
	orig, err := c.originalKubeconfig()
	if err != nil {
		return nil, err
	}
	var steps []Step
	if _, err := os.Stat(c.backupPath()); err != nil {
		steps = append(steps, Step{
			What: fmt.Sprintf("save kubelet's kubeconfig %s as %s", c.KubeletKubeconfig, c.backupPath()),
			Do:   func() error { return copyFile(c.KubeletKubeconfig, c.backupPath()) },
		})
	}
	upstream, err := c.outpostKubeconfig(orig)
	if err != nil {
		return nil, err
	}
	steps = append(steps, writeStep(c.OutpostKubeconfig, upstream, "outpost's upstream kubeconfig (kubelet's server, cluster CA and client certificate)")...)
	unitSteps := writeStep(c.UnitFile, []byte(c.Unit()), "outpost's systemd unit")
	steps = append(steps, unitSteps...)
	if c.Services != nil {
		switch {
		case len(unitSteps) > 0:
			steps = append(steps,
				Step{What: "systemctl daemon-reload", Do: c.Services.Reload},
				Step{What: "systemctl enable " + OutpostUnit + " and (re)start it", Do: func() error {
					if err := c.Services.EnableStart(OutpostUnit); err != nil {
						return err
					}
					return c.Services.Restart(OutpostUnit)
				}},
			)
		case !c.Services.Active(OutpostUnit):
			steps = append(steps, Step{What: "systemctl enable --now " + OutpostUnit, Do: func() error { return c.Services.EnableStart(OutpostUnit) }})
		}
		if len(steps) > 0 && c.Ready != nil {
			steps = append(steps, Step{What: "wait until outpost is ready (" + c.AdminAddress + "/readyz)", Do: func() error { return c.Ready(c.AdminAddress, time.Minute) }})
		}
	}
	const trusted = "the CAs kubelet trusts for outpost (the cluster CA, and outpost's own until its serving CSR is approved)"
	if _, err := os.Stat(c.ownCAPath()); errors.Is(err, os.ErrNotExist) {
		// Made now so that kubelet can trust it before outpost first
		// starts (--service-manager none); outpost reuses it.
		steps = append(steps, Step{What: "create outpost's serving CA in " + filepath.Dir(c.ownCAPath()) + " and write " + c.bundlePath() + ": " + trusted, Do: func() error {
			if _, _, err := certs.SelfSigned(filepath.Dir(c.ownCAPath()), c.servingHosts()); err != nil {
				return fmt.Errorf("creating outpost's serving CA: %w", err)
			}
			bundle, err := c.trustBundle(orig)
			if err != nil {
				return err
			}
			return writeFile(c.bundlePath(), bundle)
		}})
	} else {
		bundle, err := c.trustBundle(orig)
		if err != nil {
			return nil, err
		}
		steps = append(steps, writeStep(c.bundlePath(), bundle, trusted)...)
	}
	redirected, err := c.redirectedKubeconfig()
	if err != nil {
		return nil, err
	}
	changed := false
	if cur, err := os.ReadFile(c.KubeletKubeconfig); err != nil || !bytes.Equal(cur, redirected) {
		changed = true
		steps = append(steps, Step{What: "write " + c.KubeletKubeconfig + ": kubelet's kubeconfig, now pointing at outpost " + c.outpostURL(),
			Do: func() error { return c.changeKubeletKubeconfig(redirected) }})
	}
	if changed && c.Services == nil {
		steps = append(steps, Step{What: "(no service manager) start outpost with the unit's command line", note: true, Do: func() error { return nil }})
	}
	steps = append(steps, c.restartKubelet(changed)...)
	return onlyNotes(steps), nil
}

// UndoPlan returns the steps that take the node out from behind outpost;
// none when it is not behind it.
func (c *Config) UndoPlan() ([]Step, error) {
	var steps []Step
	orig, err := os.ReadFile(c.backupPath())
	switch {
	case err == nil:
		current, _ := os.ReadFile(c.KubeletKubeconfig)
		if !bytes.Equal(current, orig) {
			steps = append(steps, Step{What: fmt.Sprintf("restore kubelet's kubeconfig %s from %s", c.KubeletKubeconfig, c.backupPath()),
				Do: func() error { return c.changeKubeletKubeconfig(orig) }})
		}
	case errors.Is(err, os.ErrNotExist):
		if kc, err := clientcmd.LoadFromFile(c.KubeletKubeconfig); err == nil {
			if cluster, _, err := current(kc); err == nil && cluster.Server == c.outpostURL() {
				return nil, fmt.Errorf("%w: %s points at outpost and its saved original %s is gone: point it back at the apiserver by hand", ErrKubeconfig, c.KubeletKubeconfig, c.backupPath())
			}
		}
	default:
		return nil, fmt.Errorf("reading the saved kubelet kubeconfig: %w", err)
	}
	steps = append(steps, c.restartKubelet(len(steps) > 0)...)

	unit, err := os.ReadFile(c.UnitFile)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	ip := unitNodeLocalIP(string(unit))
	if ip.IsValid() && !c.Remove {
		// Pods started while the node was behind outpost have its
		// node-local address in their environment: outpost must go on
		// serving them until they restart.
		steps = append(steps, Step{What: fmt.Sprintf("keep outpost running for now: pods started behind it reach the apiserver through %s until they restart; "+
			"restart them, then run outpost setup-node --undo --remove", ip), note: true, Do: func() error { return nil }})
		return onlyNotes(steps), nil
	}
	if unit != nil {
		if c.Services != nil {
			steps = append(steps, Step{What: "systemctl disable --now " + OutpostUnit, Do: func() error { return c.Services.DisableStop(OutpostUnit) }})
		}
		steps = append(steps, removeStep(c.UnitFile))
		if c.Services != nil {
			steps = append(steps, Step{What: "systemctl daemon-reload", Do: c.Services.Reload})
		}
	}
	if !ip.IsValid() {
		ip = c.nodeLocalIP()
	}
	if ip.IsValid() && hasAddress(ip) {
		steps = append(steps, Step{What: "remove " + ip.String() + "/32 from lo", Do: func() error { return run("ip", "addr", "del", ip.String()+"/32", "dev", "lo") }})
	}
	for _, f := range []string{c.OutpostKubeconfig, c.bundlePath(), c.backupPath()} {
		if _, err := os.Stat(f); err == nil {
			steps = append(steps, removeStep(f))
		}
	}
	return onlyNotes(steps), nil
}

// KeptForPods reports whether outpost was left running by --undo for the
// pods that still reach the apiserver through its node-local address.
func (c *Config) KeptForPods() bool {
	unit, err := os.ReadFile(c.UnitFile)
	return err == nil && unitNodeLocalIP(string(unit)).IsValid() && !c.Remove
}

// onlyNotes returns nil when steps change nothing (notes alone), so that
// a plan with nothing to do says so.
func onlyNotes(steps []Step) []Step {
	for _, s := range steps {
		if !s.note {
			return steps
		}
	}
	return nil
}

// restartKubelet is the step that restarts kubelet after its kubeconfig
// changed (changed), or after an earlier run changed it and the restart
// failed (the pending marker remains).
func (c *Config) restartKubelet(changed bool) []Step {
	if _, err := os.Stat(c.restartPendingPath()); err != nil && !changed {
		return nil
	}
	if c.Services == nil {
		return []Step{{What: "(no service manager) restart kubelet yourself", note: true, Do: func() error {
			return removeIfExists(c.restartPendingPath())
		}}}
	}
	return []Step{{What: "systemctl restart " + KubeletUnit + " (its pods keep running)", Do: func() error {
		if err := c.Services.Restart(KubeletUnit); err != nil {
			return err
		}
		return removeIfExists(c.restartPendingPath())
	}}}
}

// changeKubeletKubeconfig writes kubelet's kubeconfig, noting first that
// kubelet must be restarted for it to count.
func (c *Config) changeKubeletKubeconfig(data []byte) error {
	if err := writeFile(c.restartPendingPath(), nil); err != nil {
		return err
	}
	return atomicfile.WriteFile(c.KubeletKubeconfig, data, 0o600)
}

func (c *Config) restartPendingPath() string {
	return filepath.Join(c.DataDir, "setup", "kubelet-restart-pending")
}

// unitNodeLocalIP is the node-local address a unit written by setup-node
// serves, if any.
func unitNodeLocalIP(unit string) netip.Addr {
	_, rest, ok := strings.Cut(unit, "--node-local-address=")
	if !ok {
		return netip.Addr{}
	}
	ap, err := netip.ParseAddrPort(strings.Fields(rest + " ")[0])
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr()
}

func removeIfExists(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Apply runs steps in order, telling out about each, and stops at the
// first that fails.
func Apply(steps []Step, out io.Writer) error {
	for i, s := range steps {
		fmt.Fprintf(out, "[%d/%d] %s\n", i+1, len(steps), s.What)
		if err := s.Do(); err != nil {
			return fmt.Errorf("%s: %w", s.What, err)
		}
	}
	return nil
}

// originalKubeconfig returns kubelet's kubeconfig as it was before setup:
// the saved copy once there is one.
func (c *Config) originalKubeconfig() (*clientcmdapi.Config, error) {
	path := c.KubeletKubeconfig
	if _, err := os.Stat(c.backupPath()); err == nil {
		path = c.backupPath()
	}
	kc, err := clientcmd.LoadFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKubeconfig, err)
	}
	cluster, user, err := current(kc)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrKubeconfig, path, err)
	}
	if cluster.Server == c.outpostURL() {
		return nil, fmt.Errorf("%w: %s already points at outpost, and no saved original is in %s", ErrKubeconfig, path, c.backupPath())
	}
	if len(cluster.CertificateAuthorityData) == 0 && cluster.CertificateAuthority == "" {
		return nil, fmt.Errorf("%w: %s names no cluster CA", ErrKubeconfig, path)
	}
	if user.ClientCertificate == "" && len(user.ClientCertificateData) == 0 {
		return nil, fmt.Errorf("%w: %s has no client certificate, which outpost needs as the node's credential", ErrKubeconfig, path)
	}
	// Relative paths are relative to kubelet's kubeconfig (the saved copy
	// is byte for byte the same): make them absolute, since outpost's copy
	// lives elsewhere.
	for _, cl := range kc.Clusters {
		cl.LocationOfOrigin = c.KubeletKubeconfig
	}
	for _, u := range kc.AuthInfos {
		u.LocationOfOrigin = c.KubeletKubeconfig
	}
	if err := clientcmd.ResolveLocalPaths(kc); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKubeconfig, err)
	}
	return kc, nil
}

func current(kc *clientcmdapi.Config) (*clientcmdapi.Cluster, *clientcmdapi.AuthInfo, error) {
	ctx := kc.Contexts[kc.CurrentContext]
	if ctx == nil {
		return nil, nil, fmt.Errorf("no current context %q", kc.CurrentContext)
	}
	cluster, user := kc.Clusters[ctx.Cluster], kc.AuthInfos[ctx.AuthInfo]
	if cluster == nil || cluster.Server == "" {
		return nil, nil, fmt.Errorf("context %q has no cluster with a server", kc.CurrentContext)
	}
	if user == nil {
		return nil, nil, fmt.Errorf("context %q has no user", kc.CurrentContext)
	}
	return cluster, user, nil
}

// outpostKubeconfig is kubelet's original kubeconfig as it is: outpost goes
// upstream as the node, with kubelet's rotating client certificate.
func (c *Config) outpostKubeconfig(orig *clientcmdapi.Config) ([]byte, error) {
	return clientcmd.Write(*orig)
}

// redirectedKubeconfig is kubelet's original kubeconfig with the server
// replaced by outpost and the CA by the bundle.
func (c *Config) redirectedKubeconfig() ([]byte, error) {
	kc, err := c.originalKubeconfig()
	if err != nil {
		return nil, err
	}
	cluster, _, _ := current(kc)
	cluster.Server = c.outpostURL()
	cluster.CertificateAuthority, cluster.CertificateAuthorityData = c.bundlePath(), nil
	// TLS names from the apiserver's certificate do not apply to outpost's.
	cluster.TLSServerName = ""
	return clientcmd.Write(*kc)
}

// trustBundle is the cluster CA followed by outpost's own serving CA.
func (c *Config) trustBundle(orig *clientcmdapi.Config) ([]byte, error) {
	cluster, _, _ := current(orig)
	clusterCA := cluster.CertificateAuthorityData
	if len(clusterCA) == 0 {
		b, err := os.ReadFile(cluster.CertificateAuthority)
		if err != nil {
			return nil, fmt.Errorf("%w: reading the cluster CA: %v", ErrKubeconfig, err)
		}
		clusterCA = b
	}
	own, err := os.ReadFile(c.ownCAPath())
	if err != nil {
		return nil, fmt.Errorf("reading outpost's serving CA: %w", err)
	}
	return append(append(bytes.TrimSpace(clusterCA), '\n'), own...), nil
}

func (c *Config) ownCAPath() string { return filepath.Join(c.DataDir, "pki", certs.CAFile) }

// servingHosts are the names outpost's self-signed certificate carries, as
// outpost run gives it.
func (c *Config) servingHosts() []string {
	hosts := []string{"127.0.0.1", "::1", "localhost", c.NodeName}
	if host, _, err := net.SplitHostPort(c.SecureAddress); err == nil && host != "" && host != "0.0.0.0" && host != "::" && host != "127.0.0.1" {
		hosts = append(hosts, host)
	}
	return hosts
}

func (c *Config) nodeLocalIP() netip.Addr {
	ap, err := netip.ParseAddrPort(c.NodeLocalAddress)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr()
}

// Unit is outpost's systemd unit for this Config.
func (c *Config) Unit() string {
	args := []string{c.Binary, "run",
		"--kubeconfig=" + c.OutpostKubeconfig,
		"--node-name=" + c.NodeName,
		"--data-dir=" + c.DataDir,
		"--secure-address=" + c.SecureAddress,
		"--admin-address=" + c.AdminAddress,
	}
	var pre string
	if ip := c.nodeLocalIP(); ip.IsValid() {
		args = append(args, "--node-local-address="+c.NodeLocalAddress, "--rotate-server-certificates")
		// "-": the address may be there already.
		pre = "ExecStartPre=-/usr/sbin/ip addr add " + ip.String() + "/32 dev lo\n"
	}
	return `# Written by outpost setup-node; "outpost setup-node --undo" removes it.
[Unit]
Description=Outpost: caching gateway between node components and kube-apiserver
Documentation=https://github.com/outposthq/outpost
Before=kubelet.service
Wants=network-online.target
After=network-online.target

[Service]
` + pre + `ExecStart=` + strings.Join(args, " ") + `
Restart=always
RestartSec=2
# outpost keeps serving from its cache while the cloud is away; it must
# outlive everything else on the node.
OOMScoreAdjust=-900
NoNewPrivileges=yes
ProtectSystem=full
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths=` + c.DataDir + `

[Install]
WantedBy=multi-user.target
`
}

// writeStep returns a step writing data to path (0600, whole), or none
// when path holds it already.
func writeStep(path string, data []byte, what string) []Step {
	if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, data) {
		return nil
	}
	return []Step{{What: "write " + path + ": " + what, Do: func() error { return writeFile(path, data) }}}
}

// writeFile replaces path whole with data (0600), making its directory.
func writeFile(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return atomicfile.WriteFile(path, data, 0o600)
}

func removeStep(path string) Step {
	return Step{What: "remove " + path, Do: func() error {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}}
}

func copyFile(from, to string) error {
	data, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return writeFile(to, data)
}

// hasAddress reports whether ip is on one of the machine's interfaces.
func hasAddress(ip netip.Addr) bool {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr() == ip {
			return true
		}
	}
	return false
}
