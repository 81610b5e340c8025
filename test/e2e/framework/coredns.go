package framework

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

const (
	// KubeDNSIP is the ClusterIP of the kube-dns Service, in the
	// apiservers' service range: give it to SetClusterDNS, and send DNS
	// queries to it (LookupIPv4) where kube-proxy runs.
	KubeDNSIP = "10.0.0.10"
	// ClusterDomain is the DNS domain of the cluster, as kubelet is
	// configured with it.
	ClusterDomain = "cluster.local"
	// KubeDNSNamespace holds everything DeployCoreDNS creates.
	KubeDNSNamespace = metav1.NamespaceSystem
	// KubeDNSService is the name of the Service at KubeDNSIP.
	KubeDNSService = "kube-dns"
)

// The names of what DeployCoreDNS creates besides the Service.
const (
	coreDNSName = "coredns"        // ServiceAccount, ConfigMap, Deployment
	coreDNSRole = "system:coredns" // ClusterRole and ClusterRoleBinding
	// coreDNSLabel selects the pods of the Deployment, for the Service.
	coreDNSLabel = "k8s-app"
	// Ports in the pod's own network namespace.
	coreDNSHealthPort = 8080
	coreDNSReadyPort  = 8181
	// coreDNSConfigDir is where the ConfigMap is mounted in the pod.
	coreDNSConfigDir = "/etc/coredns"
	// saTokenFile is the service account token kubelet projects into
	// every pod that has one.
	saTokenFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"
)

// CoreDNSConfig says which API CoreDNS reads the cluster from.
type CoreDNSConfig struct {
	// Server is the URL at which the host reaches the API: an apiserver
	// (ControlPlane.URL) or outpost. Pods cannot reach the host's
	// 127.0.0.1, so DeployCoreDNS forwards a port of the node's bridge
	// address to it.
	Server string
	// CAFile verifies Server's certificate; empty means the cluster CA.
	CAFile string
	// InCluster, instead of Server and CAFile, gives CoreDNS the in-cluster
	// config of a real cluster: the KUBERNETES_SERVICE_HOST/PORT kubelet
	// sets from the kubernetes Service and the cluster CA of
	// kube-root-ca.crt. That works only where the Service leads somewhere
	// a pod reaches, as outpost's --node-local-address does.
	InCluster bool
}

// A CoreDNS is the cluster DNS DeployCoreDNS set up for one node: a
// Deployment of CoreDNSImage whose pod runs on the node, serving
// ClusterDomain from the kubernetes plugin behind the kube-dns Service at
// KubeDNSIP.
//
// CoreDNS authenticates with its service account's token, as in a real
// cluster, but does not reach the API through the kubernetes Service: the
// apiservers listen on 127.0.0.1 only and publish no endpoints. It uses a
// kubeconfig instead, whose server is a TCP forwarder on the node's bridge
// address (the pod network's gateway) to CoreDNSConfig.Server.
type CoreDNS struct {
	// Forwarder is the address (bridge IP:port) of the forwarder that
	// CoreDNS's kubeconfig names.
	Forwarder string

	n   *Node
	fwd *forwarder
}

// DeployCoreDNS imports CoreDNSImage into node n and creates in kube-system
// the cluster DNS for it: a ServiceAccount and the ClusterRole (with its
// binding) to list and watch what the kubernetes plugin reads, a ConfigMap
// with the Corefile and the kubeconfig, a Deployment of one pod bound to n,
// and the Service kube-dns at KubeDNSIP. It returns once the pod is Ready
// and the Service's EndpointSlice lists it ready, which needs
// kube-controller-manager (Options.ControllerManager). A query to KubeDNSIP
// also needs kube-proxy on the node (StartKubeProxy). The caller must
// Delete it; DeployCoreDNSForTest does.
//
// No forward plugin runs: the machine has no upstream DNS for the pods, so
// names outside the cluster get no answer rather than a query leaving it.
func (n *Node) DeployCoreDNS(ctx context.Context, cfg CoreDNSConfig) (_ *CoreDNS, err error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}
	ctx, cancel := n.cp.withStop(ctx)
	defer cancel()
	if err := n.ImportCoreDNSImage(ctx); err != nil {
		return nil, fmt.Errorf("deploying coredns: %w", err)
	}
	if cfg.InCluster {
		d := &CoreDNS{n: n}
		if err := n.cp.EnsureNamespace(ctx, KubeDNSNamespace); err != nil {
			return nil, fmt.Errorf("deploying coredns: %w", err)
		}
		if err := n.cp.createCoreDNSObjects(ctx, n.Name, ""); err != nil {
			return nil, fmt.Errorf("deploying coredns: %w", err)
		}
		if err := d.WaitReady(ctx); err != nil {
			d.Delete(context.WithoutCancel(ctx))
			return nil, fmt.Errorf("deploying coredns: %w", err)
		}
		return d, nil
	}
	target, err := url.Parse(cfg.Server)
	if err != nil || target.Host == "" {
		return nil, fmt.Errorf("deploying coredns: server %q is not a URL", cfg.Server)
	}
	gateway, err := n.BridgeIP()
	if err != nil {
		return nil, fmt.Errorf("deploying coredns: %w", err)
	}
	fwd, err := startForwarder(gateway, target.Host)
	if err != nil {
		return nil, fmt.Errorf("deploying coredns: %w", err)
	}
	d := &CoreDNS{Forwarder: fwd.addr(), n: n, fwd: fwd}
	defer func() {
		if err != nil {
			d.Delete(context.WithoutCancel(ctx))
		}
	}()
	caFile := cfg.CAFile
	if caFile == "" {
		caFile = n.cp.CAFile
	}
	kubeconfig, err := coreDNSKubeconfig(d.Forwarder, target.Hostname(), caFile)
	if err != nil {
		return nil, fmt.Errorf("deploying coredns: %w", err)
	}
	if err := n.cp.EnsureNamespace(ctx, KubeDNSNamespace); err != nil {
		return nil, fmt.Errorf("deploying coredns: %w", err)
	}
	if err := n.cp.createCoreDNSObjects(ctx, n.Name, kubeconfig); err != nil {
		return nil, fmt.Errorf("deploying coredns: %w", err)
	}
	if err := d.WaitReady(ctx); err != nil {
		return nil, fmt.Errorf("deploying coredns: %w", err)
	}
	return d, nil
}

// DeployCoreDNSForTest deploys CoreDNS as DeployCoreDNS does and deletes it
// in t.Cleanup. An error fails the test.
func (n *Node) DeployCoreDNSForTest(t testing.TB, cfg CoreDNSConfig) *CoreDNS {
	t.Helper()
	d, err := n.DeployCoreDNS(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), nodeStopTimeout)
		defer cancel()
		if err := d.Delete(ctx); err != nil {
			t.Error(err)
		}
	})
	return d
}

// corefile serves ClusterDomain and the reverse zones from the kubernetes
// plugin, with CoreDNS's readiness (/ready: the plugin has synced) and
// health endpoints for the pod's probes. With no kubeconfig, the plugin
// uses the in-cluster config.
func corefile(kubeconfig bool) string {
	if kubeconfig {
		return corefileTemplate
	}
	return strings.Replace(corefileTemplate, "        kubeconfig "+coreDNSConfigDir+"/kubeconfig\n", "", 1)
}

var corefileTemplate = `.:53 {
    errors
    log
    health :` + strconv.Itoa(coreDNSHealthPort) + `
    ready :` + strconv.Itoa(coreDNSReadyPort) + `
    kubernetes ` + ClusterDomain + ` in-addr.arpa ip6.arpa {
        kubeconfig ` + coreDNSConfigDir + `/kubeconfig
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
    cache 30
    loop
    reload
}
`

// coreDNSKubeconfig returns CoreDNS's kubeconfig: server at addr (the
// forwarder), verified as serverName with the CA of caFile (embedded, since
// the pod cannot read the host's files), and the pod's service account
// token as the credentials.
func coreDNSKubeconfig(addr, serverName, caFile string) (string, error) {
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return "", fmt.Errorf("reading the CA of the API: %w", err)
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{
		Server:                   "https://" + addr,
		CertificateAuthorityData: ca,
		TLSServerName:            serverName,
	}
	cfg.AuthInfos["coredns"] = &clientcmdapi.AuthInfo{TokenFile: saTokenFile}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: "coredns"}
	cfg.CurrentContext = "e2e"
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return "", fmt.Errorf("encoding coredns kubeconfig: %w", err)
	}
	return string(data), nil
}

// createCoreDNSObjects creates (or, where they exist, replaces) the API
// objects of CoreDNS for node.
func (c *ControlPlane) createCoreDNSObjects(ctx context.Context, node, kubeconfig string) error {
	ns := KubeDNSNamespace
	labels := map[string]string{coreDNSLabel: KubeDNSService}
	objects := []struct {
		what   string
		create func() error
	}{
		{"ServiceAccount", func() error {
			_, err := c.client.CoreV1().ServiceAccounts(ns).Create(ctx,
				&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: coreDNSName}}, metav1.CreateOptions{})
			return err
		}},
		{"ClusterRole", func() error {
			_, err := c.client.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
				ObjectMeta: metav1.ObjectMeta{Name: coreDNSRole},
				Rules: []rbacv1.PolicyRule{
					{APIGroups: []string{""}, Resources: []string{"services", "pods", "namespaces"}, Verbs: []string{"list", "watch"}},
					{APIGroups: []string{discoveryv1.GroupName}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
				},
			}, metav1.CreateOptions{})
			return err
		}},
		{"ClusterRoleBinding", func() error {
			_, err := c.client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
				ObjectMeta: metav1.ObjectMeta{Name: coreDNSRole},
				RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: coreDNSRole},
				Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: coreDNSName}},
			}, metav1.CreateOptions{})
			return err
		}},
		{"ConfigMap", func() error {
			cm := &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Name: coreDNSName},
				Data:       map[string]string{"Corefile": corefile(kubeconfig != ""), "kubeconfig": kubeconfig},
			}
			_, err := c.client.CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				_, err = c.client.CoreV1().ConfigMaps(ns).Update(ctx, cm, metav1.UpdateOptions{})
			}
			return err
		}},
		{"Deployment", func() error {
			_, err := c.client.AppsV1().Deployments(ns).Create(ctx, coreDNSDeployment(node, labels), metav1.CreateOptions{})
			return err
		}},
		{"Service", func() error {
			_, err := c.client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: KubeDNSService, Labels: labels},
				Spec: corev1.ServiceSpec{
					Selector:  labels,
					ClusterIP: KubeDNSIP,
					Ports: []corev1.ServicePort{
						{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53, TargetPort: intstr.FromInt(53)},
						{Name: "dns-tcp", Protocol: corev1.ProtocolTCP, Port: 53, TargetPort: intstr.FromInt(53)},
					},
				},
			}, metav1.CreateOptions{})
			return err
		}},
	}
	for _, o := range objects {
		if err := o.create(); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating the coredns %s: %w", o.what, err)
		}
	}
	return nil
}

// coreDNSDeployment is one CoreDNS pod bound to node (so no scheduler is
// needed), with the ConfigMap at coreDNSConfigDir. Its DNS is the host's:
// a cluster DNS that asked itself would loop.
func coreDNSDeployment(node string, labels map[string]string) *appsv1.Deployment {
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: coreDNSName, Labels: labels},
		Spec: appsv1.DeploymentSpec{
			Replicas: new(int32(1)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					NodeName:                      node,
					ServiceAccountName:            coreDNSName,
					DNSPolicy:                     corev1.DNSDefault,
					EnableServiceLinks:            new(false),
					TerminationGracePeriodSeconds: new(int64(1)),
					Containers: []corev1.Container{{
						Name:            "coredns",
						Image:           CoreDNSImage,
						ImagePullPolicy: corev1.PullNever,
						Args:            []string{"-conf", coreDNSConfigDir + "/Corefile"},
						Ports: []corev1.ContainerPort{
							{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP},
							{Name: "dns-tcp", ContainerPort: 53, Protocol: corev1.ProtocolTCP},
						},
						VolumeMounts: []corev1.VolumeMount{{Name: "config", MountPath: coreDNSConfigDir, ReadOnly: true}},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
								Port: intstr.FromInt(coreDNSReadyPort), Path: "/ready",
							}},
							PeriodSeconds: 1,
						},
						LivenessProbe: &corev1.Probe{
							ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
								Port: intstr.FromInt(coreDNSHealthPort), Path: "/health",
							}},
							PeriodSeconds:    5,
							FailureThreshold: 6,
						},
					}},
					Volumes: []corev1.Volume{{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
						LocalObjectReference: corev1.LocalObjectReference{Name: coreDNSName},
					}}}},
				},
			},
		},
	}
}

// WaitReady waits until a CoreDNS pod is Ready on the node and the
// kube-dns Service's EndpointSlice lists it as a ready endpoint: what
// kube-proxy needs to send queries to it.
func (d *CoreDNS) WaitReady(ctx context.Context) error {
	client := d.n.cp.client
	_, err := Poll(ctx, 200*time.Millisecond, 2*time.Minute, func(ctx context.Context) (bool, string) {
		pods, err := client.CoreV1().Pods(KubeDNSNamespace).List(ctx, metav1.ListOptions{LabelSelector: coreDNSLabel + "=" + KubeDNSService})
		if err != nil {
			return false, err.Error()
		}
		var ready []string
		var waiting []string
		for _, pod := range pods.Items {
			if p, ok := ReadyPod(&pod); ok && pod.DeletionTimestamp == nil {
				ready = append(ready, p.IP)
			} else {
				waiting = append(waiting, DescribePod(&pod))
			}
		}
		if len(ready) == 0 {
			return false, fmt.Sprintf("no coredns pod ready: %s", strings.Join(waiting, "; "))
		}
		eps, err := client.DiscoveryV1().EndpointSlices(KubeDNSNamespace).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + KubeDNSService})
		if err != nil {
			return false, err.Error()
		}
		for _, s := range eps.Items {
			for _, e := range s.Endpoints {
				if e.Conditions.Ready != nil && *e.Conditions.Ready && len(e.Addresses) > 0 && slices.Contains(ready, e.Addresses[0]) {
					return true, ""
				}
			}
		}
		return false, fmt.Sprintf("coredns pod %v ready, but no EndpointSlice of %s lists it ready (is kube-controller-manager running?)", ready, KubeDNSService)
	})
	if err != nil {
		return fmt.Errorf("coredns on %s not ready: %w\nlast lines of kubelet.log:\n%s", d.n.Name, err, d.n.KubeletLog(30))
	}
	return nil
}

// Delete deletes what DeployCoreDNS created, waits for the pod to go, and
// stops the forwarder.
func (d *CoreDNS) Delete(ctx context.Context) error {
	client := d.n.cp.client
	ns := KubeDNSNamespace
	var errs []error
	notFound := func(what string, err error) {
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("deleting the coredns %s: %w", what, err))
		}
	}
	if d.n.cp.ctx.Err() == nil {
		// Foreground: the Deployment goes only after its pods.
		foreground := metav1.DeletePropagationForeground
		notFound("Service", client.CoreV1().Services(ns).Delete(ctx, KubeDNSService, metav1.DeleteOptions{}))
		notFound("Deployment", client.AppsV1().Deployments(ns).Delete(ctx, coreDNSName, metav1.DeleteOptions{PropagationPolicy: &foreground}))
		// The pods go first: kubelet still mounts the ConfigMap as they
		// stop.
		_, err := Poll(ctx, 200*time.Millisecond, 30*time.Second, func(ctx context.Context) (bool, string) {
			pods, err := client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: coreDNSLabel + "=" + KubeDNSService})
			if err != nil {
				return false, err.Error()
			}
			if len(pods.Items) > 0 {
				return false, fmt.Sprintf("%d coredns pods remain", len(pods.Items))
			}
			return true, ""
		})
		if err != nil {
			errs = append(errs, fmt.Errorf("deleting the coredns pods: %w", err))
		}
		notFound("ConfigMap", client.CoreV1().ConfigMaps(ns).Delete(ctx, coreDNSName, metav1.DeleteOptions{}))
		notFound("ClusterRoleBinding", client.RbacV1().ClusterRoleBindings().Delete(ctx, coreDNSRole, metav1.DeleteOptions{}))
		notFound("ClusterRole", client.RbacV1().ClusterRoles().Delete(ctx, coreDNSRole, metav1.DeleteOptions{}))
		notFound("ServiceAccount", client.CoreV1().ServiceAccounts(ns).Delete(ctx, coreDNSName, metav1.DeleteOptions{}))
	}
	if d.fwd != nil {
		d.fwd.close()
	}
	return errors.Join(errs...)
}

// BridgeIP returns the address of the node's bridge, the pod network's
// gateway (the first address of PodSubnet), where the host is reached from
// its pods. The bridge itself exists once the first pod has started.
func (n *Node) BridgeIP() (netip.Addr, error) {
	prefix, err := netip.ParsePrefix(n.PodSubnet)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("pod subnet of node %s: %w", n.Name, err)
	}
	return prefix.Masked().Addr().Next(), nil
}

// SetClusterDNS makes kubelet give pods of dnsPolicy ClusterFirst the
// nameserver ip (KubeDNSIP) and the search domains of ClusterDomain, and
// restarts kubelet if it runs (its pods keep running). Pods created before
// keep the resolv.conf they had.
//
// It adds clusterDNS to the node's kubelet configuration file rather than
// to a drop-in (--config-dir): kubelet merges drop-ins through a form that
// drops the file's empty enforceNodeAllocatable, which then defaults to
// "pods" and fails validation without cgroupsPerQOS.
func (n *Node) SetClusterDNS(ctx context.Context, ip string) error {
	if _, err := netip.ParseAddr(ip); err != nil {
		return fmt.Errorf("setting cluster DNS of %s: %w", n.Name, err)
	}
	path := filepath.Join(n.Dir, "kubelet.json")
	n.mu.Lock()
	err := setJSONField(path, "clusterDNS", []string{ip})
	running := n.kubelet != nil
	n.mu.Unlock()
	if err != nil {
		return fmt.Errorf("setting cluster DNS of %s: %w", n.Name, err)
	}
	if !running {
		return nil
	}
	if err := n.StopKubelet(); err != nil {
		return err
	}
	return n.StartKubelet(ctx)
}

// setJSONField sets field of the JSON object in file path to value.
func setJSONField(path, field string, value any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var obj map[string]any
	if err := json.Unmarshal(data, &obj); err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	obj[field] = value
	data, err = json.MarshalIndent(obj, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(path, data, 0o644)
}

// LookupIPv4 asks the DNS server at server (an IP, port 53) for the IPv4
// addresses of name, over UDP (TCP if the answer is truncated), without the
// host's resolver configuration getting in the way: give name fully
// qualified, e.g. "web.ns.svc.cluster.local".
func LookupIPv4(ctx context.Context, server, name string) ([]netip.Addr, error) {
	r := &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, net.JoinHostPort(server, "53"))
		},
	}
	if !strings.HasSuffix(name, ".") {
		name += "."
	}
	return r.LookupNetIP(ctx, "ip4", name)
}

// A forwarder passes TCP connections from a listener on a node's bridge
// address to a target on the host, so that pods reach what listens on the
// host's 127.0.0.1.
type forwarder struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu     sync.Mutex // guards conns
	conns  map[net.Conn]struct{}
	closed bool
}

// startForwarder listens on a free port of ip, which may not exist yet (a
// node's bridge appears with its first pod and goes with a "reboot"), and
// forwards to target (host:port).
func startForwarder(ip netip.Addr, target string) (*forwarder, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			// IP_FREEBIND: bind an address no interface holds yet.
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_IP, syscall.IP_FREEBIND, 1)
		})
		return errors.Join(err, serr)
	}}
	ln, err := lc.Listen(context.Background(), "tcp4", net.JoinHostPort(ip.String(), "0"))
	if err != nil {
		return nil, fmt.Errorf("listening on the bridge address %s: %w", ip, err)
	}
	f := &forwarder{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	f.wg.Go(f.serve)
	return f, nil
}

func (f *forwarder) addr() string { return f.ln.Addr().String() }

func (f *forwarder) serve() {
	for {
		in, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.wg.Go(func() { f.pass(in) })
	}
}

// pass copies both ways between in and a new connection to the target
// until either side closes.
func (f *forwarder) pass(in net.Conn) {
	out, err := net.DialTimeout("tcp", f.target, dialTimeout)
	if err != nil {
		in.Close()
		return
	}
	if !f.track(in, out) {
		in.Close()
		out.Close()
		return
	}
	defer f.untrack(in, out)
	done := make(chan struct{}, 2)
	copyHalf := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}
	go copyHalf(out, in)
	go copyHalf(in, out)
	<-done
	<-done
}

func (f *forwarder) track(conns ...net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	for _, c := range conns {
		f.conns[c] = struct{}{}
	}
	return true
}

func (f *forwarder) untrack(conns ...net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range conns {
		c.Close()
		delete(f.conns, c)
	}
}

// close stops listening, closes every connection and waits for the
// goroutines.
func (f *forwarder) close() {
	f.mu.Lock()
	f.closed = true
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.ln.Close()
	f.wg.Wait()
}
