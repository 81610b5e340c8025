package framework

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Flannel on a real node: flanneld (github.com/flannel-io/flannel, built
// by hack/k8s.sh) runs as a hostNetwork pod in kube-subnet-mgr mode, reads
// the Kubernetes API with its service account, as upstream's kube-flannel
// manifest sets it up, and writes the node's subnet file; flannel's CNI
// plugin reads that file and delegates to the bridge plugin, on the node's
// own bridge. So the node's pod network depends on an agent that needs the
// API, which is what a node rebooted offline must get back from outpost.
const (
	// FlannelImage is flanneld's image, imported into the node.
	FlannelImage = "outpost.test/flanneld:1"
	// FlannelAnnotationPrefix starts the annotations flanneld writes on its
	// Node (backend-type, backend-data, public-ip, kube-subnet-manager).
	FlannelAnnotationPrefix = "flannel.alpha.coreos.com/"
	// FlannelNetwork is the flannel network of every node: each node's
	// 10.200.N.0/24 (PodSubnet) is its lease in it.
	FlannelNetwork = "10.200.0.0/16"
	// FlannelNamespace is where StartFlannelNodeForTest puts flanneld.
	FlannelNamespace = "kube-flannel"
	// flannelRole is the ClusterRole of upstream's manifest: flanneld reads
	// its own pod (to learn its node), watches nodes for the leases of the
	// others, and annotates its own Node through nodes/status.
	flannelRole = "outpost-e2e:flannel"
	// flannelServiceAccount is the account flanneld runs as, in every
	// namespace.
	flannelServiceAccount = "flannel"
	// flannelCNIDataDir, in the node's run directory, is where the CNI
	// plugin keeps the delegate configuration of each sandbox, for its DEL.
	flannelCNIDataDir = "cni-flannel"
	// flanneldBinary is where flanneld is in FlannelImage.
	flanneldBinary = "/flanneld"
)

// A Flannel is flannel providing the pod network of Node. Everything it
// adds to the host is named for it alone: the veth Iface that flanneld uses
// for the node's traffic (never the machine's external interface), and
// flanneld's VXLAN device Device, with its own VNI and UDP port.
type Flannel struct {
	// Node is the node; its PodSubnet is the node's spec.podCIDR, the lease
	// flanneld takes.
	Node *Node
	// Namespace holds flanneld's pod, called Pod, its ConfigMap (the
	// net-conf.json of the kube-flannel-cfg ConfigMap upstream) and its
	// service account.
	Namespace string
	Pod       string
	// Iface is a veth of the host (its peer is Iface+"p") holding PublicIP,
	// given to flanneld as --iface; PublicIP is what flanneld announces.
	Iface    string
	PublicIP string
	// Device is the VXLAN device flanneld creates, flannel.<VNI>, sending
	// on UDP port Port.
	Device string
	VNI    int
	Port   int
	// SubnetFile is where flanneld writes FLANNEL_NETWORK, FLANNEL_SUBNET,
	// FLANNEL_MTU and FLANNEL_IPMASQ on the host (/run/flannel/subnet.env
	// in flanneld's container), and where the CNI plugin reads them. It is
	// under the node's run directory, so a "reboot" wipes it as it would
	// /run.
	SubnetFile string

	apiserver   string // host:port of the API for flanneld
	fromKubelet bool   // flanneld keeps kubelet's in-cluster config
	ca          []byte // CA bundle for flanneld, if not the cluster CA
}

// FlannelOptions change how StartFlannelNodeForTest sets flannel up; the
// zero value is flanneld in FlannelNamespace talking to the first
// apiserver.
type FlannelOptions struct {
	// Namespace is flanneld's namespace; FlannelNamespace when empty.
	Namespace string
	// APIServer is the host:port at which flanneld reaches the Kubernetes
	// API, given as KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT,
	// with the in-cluster config of its service account: its serving
	// certificate must be valid for host and signed by the cluster CA. The
	// first apiserver (127.0.0.1) when empty; flanneld is on the host
	// network, so a loopback address works.
	APIServer string
	// CAFile, when set, is the CA bundle flanneld's in-cluster config
	// trusts (ca.crt beside its service account token) in place of the
	// cluster CA: through outpost, its ServingCAFile. The pod then
	// projects its token, ca.crt and namespace itself, as kubelet's own
	// kube-api-access volume does, with ca.crt from a ConfigMap.
	CAFile string
	// FromKubelet, instead of APIServer and CAFile, leaves flanneld the
	// in-cluster config kubelet gives every pod, as kube-flannel's
	// DaemonSet has: KUBERNETES_SERVICE_HOST/PORT from the kubernetes
	// Service and the cluster CA. That works only where the Service leads
	// somewhere the host network reaches, as outpost's --node-local-address
	// does.
	FromKubelet bool
}

// StartFlannelNodeForTest starts a node for one test, as StartNodeForTest
// does, whose pod network is flannel's: containerd's CNI network is the
// flannel plugin delegating to the bridge plugin on Node.Bridge, with its
// state under the node's directory. Once the node is Ready it sets the
// Node's spec.podCIDR to its PodSubnet (kube-controller-manager's
// --allocate-node-cidrs would pick a subnet of its own, which other test
// binaries on the machine may use), creates the veth Iface, imports
// FlannelImage, creates the RBAC, the ConfigMap and the flanneld pod, and
// returns without waiting for flannel (see WaitReady). Pods on the pod
// network wait for the subnet file: containerd retries their sandboxes.
//
// When the test ends, after the node is stopped, the veth and the VXLAN
// device are deleted and the test fails if anything of flannel's remains
// on the host (see Leftovers). Any failure fails the test.
func (c *ControlPlane) StartFlannelNodeForTest(t testing.TB, name, kubeconfig string, opts FlannelOptions) *Flannel {
	t.Helper()
	f, err := c.newFlannel(opts)
	if err != nil {
		t.Fatal(err)
	}
	// Registered before the node's own cleanup, so it runs after the node
	// stopped: a running flanneld would create its device again.
	t.Cleanup(func() {
		if err := f.cleanHost(); err != nil {
			t.Error(err)
		}
		if left := f.Leftovers(); len(left) > 0 {
			t.Errorf("flannel left behind:\n  %s", strings.Join(left, "\n  "))
		}
	})
	f.Node = c.startNodeForTest(t, name, kubeconfig, nodeOptions{cni: f.writeCNI})
	// Before the node stops, which removes the pod logs.
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last lines of flanneld's log:\n%s", f.Log(40))
		}
	})
	f.Pod = "kube-flannel-" + name
	if err := f.deploy(t.Context()); err != nil {
		t.Fatal(err)
	}
	return f
}

// newFlannel chooses the names and numbers of a flannel that nothing else
// on the machine uses.
func (c *ControlPlane) newFlannel(opts FlannelOptions) (*Flannel, error) {
	f := &Flannel{Namespace: opts.Namespace, apiserver: opts.APIServer, fromKubelet: opts.FromKubelet}
	if f.Namespace == "" {
		f.Namespace = FlannelNamespace
	}
	if f.apiserver == "" && !f.fromKubelet {
		u, err := url.Parse(c.URL(0))
		if err != nil {
			return nil, err
		}
		f.apiserver = u.Host
	}
	if _, _, err := net.SplitHostPort(f.apiserver); err != nil && !f.fromKubelet {
		return nil, fmt.Errorf("flannel: API server %q: %w", f.apiserver, err)
	}
	if opts.CAFile != "" && !f.fromKubelet {
		ca, err := os.ReadFile(opts.CAFile)
		if err != nil {
			return nil, fmt.Errorf("flannel: %w", err)
		}
		f.ca = ca
	}
	f.Iface = "ofl" + randomID() // with the peer's "p", within 15 bytes
	// The device is "flannel.<VNI>", so the VNI has 7 digits at most to
	// keep the name within the kernel's 15 bytes.
	for {
		f.VNI = 1_000_000 + mathrand.IntN(9_000_000)
		f.Device = "flannel." + strconv.Itoa(f.VNI)
		if _, err := net.InterfaceByName(f.Device); err != nil {
			break
		}
	}
	port, err := freeUDPPort()
	if err != nil {
		return nil, fmt.Errorf("flannel: choosing a VXLAN port: %w", err)
	}
	f.Port = port
	return f, nil
}

// freeUDPPort returns a UDP port that is free at the time of the call.
func freeUDPPort() (int, error) {
	conn, err := net.ListenPacket("udp4", "0.0.0.0:0")
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	return conn.LocalAddr().(*net.UDPAddr).Port, nil
}

// writeCNI is the node's CNI set-up (nodeOptions.cni): a plugin directory
// with Debian's plugins and flannel's, and a network whose flannel plugin
// reads SubnetFile and hands the bridge plugin the node's bridge and a
// host-local range of the node's lease.
func (f *Flannel) writeCNI(n *Node, confDir string) (string, error) {
	plugin, err := Binary("flannel-cni")
	if err != nil {
		return "", err
	}
	binDir := filepath.Join(n.Dir, "cni", "bin")
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return "", err
	}
	// containerd 1.6 takes one plugin directory, and the flannel plugin
	// finds bridge and host-local in it (CNI_PATH).
	entries, err := os.ReadDir(cniBinDir)
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		if err := os.Symlink(filepath.Join(cniBinDir, e.Name()), filepath.Join(binDir, e.Name())); err != nil {
			return "", err
		}
	}
	if err := os.Symlink(plugin, filepath.Join(binDir, "flannel")); err != nil {
		return "", err
	}

	run := filepath.Join(n.Dir, "run")
	f.SubnetFile = filepath.Join(run, "flannel", "subnet.env")
	// The network's name is the node's, which the node's cleanup knows
	// libcni's cache files by. Version 0.3.1, as upstream's; the plugin
	// (containernetworking/plugins v0.9.1) knows up to 0.4.0.
	conflist, err := json.MarshalIndent(map[string]any{
		"cniVersion": "0.3.1",
		"name":       n.network,
		"plugins": []any{map[string]any{
			"type":       "flannel",
			"subnetFile": f.SubnetFile,
			"dataDir":    filepath.Join(run, flannelCNIDataDir),
			"delegate": map[string]any{
				"bridge":      n.Bridge,
				"hairpinMode": true,
				// flanneld runs without --ip-masq; nothing is masqueraded.
				"ipMasq": false,
			},
			// The plugin adds the range of FLANNEL_SUBNET and a route to
			// FLANNEL_NETWORK.
			"ipam": map[string]any{
				"type":    "host-local",
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
				"dataDir": filepath.Join(run, "cni-ipam"),
			},
		}},
	}, "", "  ")
	if err != nil {
		return "", err
	}
	return binDir, writeFileAtomic(filepath.Join(confDir, "10-flannel.conflist"), conflist, 0o644)
}

// deploy gives flanneld what it needs and starts it: the node's podCIDR,
// the veth, the image, the RBAC, the ConfigMap and the pod.
func (f *Flannel) deploy(ctx context.Context) error {
	n := f.Node
	client := n.cp.client
	patch, err := json.Marshal(map[string]any{"spec": map[string]any{"podCIDR": n.PodSubnet, "podCIDRs": []string{n.PodSubnet}}})
	if err != nil {
		return err
	}
	if _, err := client.CoreV1().Nodes().Patch(ctx, n.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("flannel: setting the podCIDR of node %s: %w", n.Name, err)
	}
	if err := f.createIface(); err != nil {
		return err
	}
	archive, err := n.cp.flannelArchive()
	if err != nil {
		return err
	}
	if _, err := n.ctr(ctx, "images", "import", archive); err != nil {
		return fmt.Errorf("flannel: importing %s: %w", FlannelImage, err)
	}
	if err := f.grant(ctx); err != nil {
		return err
	}
	netConf, err := json.Marshal(map[string]any{
		"Network": FlannelNetwork,
		"Backend": map[string]any{"Type": "vxlan", "VNI": f.VNI, "Port": f.Port},
	})
	if err != nil {
		return err
	}
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: f.Pod},
		Data:       map[string]string{"net-conf.json": string(netConf)},
	}
	if f.ca != nil {
		cm.Data["ca.crt"] = string(f.ca)
	}
	if _, err := client.CoreV1().ConfigMaps(f.Namespace).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("flannel: creating ConfigMap %s/%s: %w", f.Namespace, cm.Name, err)
	}
	if _, err := client.CoreV1().Pods(f.Namespace).Create(ctx, f.pod(), metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("flannel: creating pod %s/%s: %w", f.Namespace, f.Pod, err)
	}
	return nil
}

// createIface creates the veth pair Iface, Iface+"p", up, with PublicIP on
// Iface: 198.18.N.1/32 (RFC 2544's range for tests) for the node's
// 10.200.N.0/24, which no other node of the machine holds at once. A /32
// adds no route.
func (f *Flannel) createIface() error {
	f.PublicIP = fmt.Sprintf("198.18.%d.1", f.Node.subnet)
	for _, args := range [][]string{
		{"link", "add", f.Iface, "type", "veth", "peer", "name", f.Iface + "p"},
		{"addr", "add", f.PublicIP + "/32", "dev", f.Iface},
		{"link", "set", f.Iface + "p", "up"},
		{"link", "set", f.Iface, "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("flannel: ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// flannelArchive packs flanneld into an image archive, once per control
// plane, and returns its path.
func (c *ControlPlane) flannelArchive() (string, error) {
	imagesMu.Lock()
	defer imagesMu.Unlock()
	path := filepath.Join(c.Dir, "images", "flanneld.oci.tar")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	bin, err := Binary("flanneld")
	if err != nil {
		return "", err
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return "", err
	}
	tarball, err := ociArchive(FlannelImage, flanneldBinary, data)
	if err != nil {
		return "", fmt.Errorf("packing image %s: %w", FlannelImage, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", err
	}
	return path, writeFileAtomic(path, tarball, 0o644)
}

// grant creates flanneld's namespace, service account and ClusterRole and
// binds them, then waits until the authorizer counts the binding.
func (f *Flannel) grant(ctx context.Context) error {
	c := f.Node.cp
	if err := c.EnsureNamespace(ctx, f.Namespace); err != nil {
		return err
	}
	rbac := c.client.RbacV1()
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: flannelRole},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get"}},
			{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list", "watch"}},
			{APIGroups: []string{""}, Resources: []string{"nodes/status"}, Verbs: []string{"patch"}},
		},
	}
	if _, err := rbac.ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("flannel: creating ClusterRole %s: %w", flannelRole, err)
	}
	return c.bindServiceAccount(ctx, f.Namespace, flannelServiceAccount, flannelRole, flannelRole+":"+f.Namespace,
		authorizationv1.ResourceAttributes{Verb: "patch", Resource: "nodes", Subresource: "status"})
}

// pod is flanneld's pod, as upstream's DaemonSet runs it: on the host
// network with NET_ADMIN and NET_RAW, the ConfigMap at
// /etc/kube-flannel and the subnet file's directory from the host at
// /run/flannel. It has no DaemonSet, since no kube-controller-manager need
// run: the pod is bound to the node and kubelet alone restarts it.
func (f *Flannel) pod() *corev1.Pod {
	host, port, _ := net.SplitHostPort(f.apiserver)
	fieldEnv := func(name, path string) corev1.EnvVar {
		return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: f.Pod, Labels: map[string]string{"app": "flannel"}},
		Spec: corev1.PodSpec{
			NodeName:                      f.Node.Name,
			HostNetwork:                   true,
			DNSPolicy:                     corev1.DNSDefault,
			ServiceAccountName:            flannelServiceAccount,
			EnableServiceLinks:            new(false),
			TerminationGracePeriodSeconds: new(int64(1)),
			Containers: []corev1.Container{{
				Name:            "flanneld",
				Image:           FlannelImage,
				ImagePullPolicy: corev1.PullNever,
				Command: []string{
					flanneldBinary,
					"--kube-subnet-mgr",
					"--iface=" + f.Iface,
					"--subnet-file=/run/flannel/subnet.env",
					"--net-config-path=/etc/kube-flannel/net-conf.json",
					// The host's firewall is not the test's to change.
					"--ip-masq=false",
					"--iptables-forward-rules=false",
				},
				Env: []corev1.EnvVar{
					fieldEnv("POD_NAME", "metadata.name"),
					fieldEnv("POD_NAMESPACE", "metadata.namespace"),
					// These win over the kubernetes Service's, whose
					// cluster IP nothing routes here.
					{Name: "KUBERNETES_SERVICE_HOST", Value: host},
					{Name: "KUBERNETES_SERVICE_PORT", Value: port},
				},
				SecurityContext: &corev1.SecurityContext{
					Capabilities: &corev1.Capabilities{Add: []corev1.Capability{"NET_ADMIN", "NET_RAW"}},
				},
				VolumeMounts: []corev1.VolumeMount{
					{Name: "run", MountPath: "/run/flannel"},
					{Name: "config", MountPath: "/etc/kube-flannel"},
				},
			}},
			Volumes: []corev1.Volume{
				{Name: "run", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{
					Path: filepath.Dir(f.SubnetFile), Type: new(corev1.HostPathDirectoryOrCreate),
				}}},
				{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
					LocalObjectReference: corev1.LocalObjectReference{Name: f.Pod},
					Items:                []corev1.KeyToPath{{Key: "net-conf.json", Path: "net-conf.json"}},
				}}},
			},
		},
	}
	if f.fromKubelet {
		c := &pod.Spec.Containers[0]
		c.Env = c.Env[:2] // POD_NAME and POD_NAMESPACE
		return pod
	}
	if f.ca == nil {
		return pod
	}
	// kubelet's kube-api-access volume, with the CA of the ConfigMap.
	pod.Spec.AutomountServiceAccountToken = new(false)
	pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: "api-access", VolumeSource: corev1.VolumeSource{
		Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: new(int64(3607))}},
			{ConfigMap: &corev1.ConfigMapProjection{
				LocalObjectReference: corev1.LocalObjectReference{Name: f.Pod},
				Items:                []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}},
			}},
			{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{
				{Path: "namespace", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}},
			}}},
		}},
	}})
	c := &pod.Spec.Containers[0]
	c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{
		Name: "api-access", MountPath: "/var/run/secrets/kubernetes.io/serviceaccount", ReadOnly: true,
	})
	return pod
}

// flannelAnnotations are the annotations flanneld writes on its Node once
// it holds its lease.
var flannelAnnotations = []string{"backend-type", "backend-data", "public-ip", "kube-subnet-manager"}

// Annotations returns the flannel annotations (FlannelAnnotationPrefix) of
// the Node, as the apiserver has them, keyed without the prefix.
func (f *Flannel) Annotations(ctx context.Context) (map[string]string, error) {
	node, err := f.Node.cp.client.CoreV1().Nodes().Get(ctx, f.Node.Name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	got := map[string]string{}
	for k, v := range node.Annotations {
		if name, ok := strings.CutPrefix(k, FlannelAnnotationPrefix); ok {
			got[name] = v
		}
	}
	return got, nil
}

// SubnetEnv returns the variables of the subnet file.
func (f *Flannel) SubnetEnv() (map[string]string, error) {
	data, err := os.ReadFile(f.SubnetFile)
	if err != nil {
		return nil, err
	}
	env := map[string]string{}
	for line := range strings.Lines(string(data)) {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok {
			env[k] = v
		}
	}
	return env, nil
}

// WaitReady waits up to 2 minutes until flanneld has done its part: the
// Node carries its annotations, with PublicIP, its VXLAN device is up and
// the subnet file gives the node's PodSubnet (gateway address first) in
// FlannelNetwork. It returns how long that took.
func (f *Flannel) WaitReady(ctx context.Context) (time.Duration, error) {
	_, subnet, err := net.ParseCIDR(f.Node.PodSubnet)
	if err != nil {
		return 0, err
	}
	gateway := slices.Clone(subnet.IP.To4())
	gateway[3] = 1
	wantSubnet := (&net.IPNet{IP: gateway, Mask: subnet.Mask}).String()
	d, err := Poll(ctx, 200*time.Millisecond, 2*time.Minute, func(ctx context.Context) (bool, string) {
		ann, err := f.Annotations(ctx)
		if err != nil {
			return false, err.Error()
		}
		for _, a := range flannelAnnotations {
			if ann[a] == "" {
				return false, fmt.Sprintf("node %s has no annotation %s%s yet", f.Node.Name, FlannelAnnotationPrefix, a)
			}
		}
		if ann["public-ip"] != f.PublicIP {
			return false, fmt.Sprintf("annotation public-ip = %q, want %q", ann["public-ip"], f.PublicIP)
		}
		if iface, err := net.InterfaceByName(f.Device); err != nil || iface.Flags&net.FlagUp == 0 {
			return false, fmt.Sprintf("no VXLAN device %s up yet", f.Device)
		}
		env, err := f.SubnetEnv()
		if err != nil {
			return false, err.Error()
		}
		if env["FLANNEL_SUBNET"] != wantSubnet || env["FLANNEL_NETWORK"] != FlannelNetwork {
			return false, fmt.Sprintf("subnet file has FLANNEL_NETWORK=%s FLANNEL_SUBNET=%s, want %s and %s",
				env["FLANNEL_NETWORK"], env["FLANNEL_SUBNET"], FlannelNetwork, wantSubnet)
		}
		return true, ""
	})
	if err != nil {
		return 0, fmt.Errorf("flannel on node %s not ready: %w\nlast lines of flanneld's log:\n%s", f.Node.Name, err, f.Log(30))
	}
	return d, nil
}

// RemoveVolatile takes from the host what a reboot takes from flannel: the
// subnet file (under /run on a real node) and the VXLAN device. The veth
// stays, as a machine's network interface would. Call it with kubelet
// stopped and the containers removed (Node.RemoveAllContainers), or
// flanneld would make them again at once.
func (f *Flannel) RemoveVolatile() error {
	var errs []error
	if err := os.Remove(f.SubnetFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	errs = append(errs, deleteLink(f.Device))
	return errors.Join(errs...)
}

// cleanHost deletes what flannel added to the host: the VXLAN device and
// the veth (its peer goes with it).
func (f *Flannel) cleanHost() error {
	return errors.Join(deleteLink(f.Device), deleteLink(f.Iface))
}

// deleteLink deletes the network interface name, if it exists.
func deleteLink(name string) error {
	if _, err := net.InterfaceByName(name); err != nil {
		return nil
	}
	if out, err := exec.Command("ip", "link", "delete", name).CombinedOutput(); err != nil {
		return fmt.Errorf("deleting %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Leftovers lists what flannel still holds on the host: its veth and its
// VXLAN device. After the test's cleanup it must be empty; the node's own
// Leftovers cover the rest (mounts, bridge, CNI cache files).
func (f *Flannel) Leftovers() []string {
	var left []string
	for _, name := range []string{f.Iface, f.Iface + "p", f.Device} {
		if _, err := net.InterfaceByName(name); err == nil {
			left = append(left, "network interface "+name)
		}
	}
	return left
}

// Log returns the last lines of flanneld's newest container log.
func (f *Flannel) Log(lines int) string {
	logs, _ := filepath.Glob(filepath.Join(f.Node.podLogsDir, f.Namespace+"_"+f.Pod+"_*", "flanneld", "*.log"))
	if len(logs) == 0 {
		return "(no log of flanneld)"
	}
	newest, newestTime := "", time.Time{}
	for _, l := range logs {
		if fi, err := os.Stat(l); err == nil && fi.ModTime().After(newestTime) {
			newest, newestTime = l, fi.ModTime()
		}
	}
	return tailFile(newest, lines)
}

// CNISandboxes returns the IDs of the pod sandboxes whose network flannel's
// CNI plugin set up and has not torn down yet (it keeps each one's
// delegate configuration for the DEL).
func (f *Flannel) CNISandboxes() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(f.Node.Dir, "run", flannelCNIDataDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(entries))
	for _, e := range entries {
		ids = append(ids, e.Name())
	}
	return ids, nil
}
