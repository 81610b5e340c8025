package framework

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// kube-proxy as kubeadm runs it: a privileged hostNetwork pod of the
// kube-proxy service account in kube-system (kubeadm's DaemonSet; here one
// pod bound to the node, which kubelet alone restarts), its
// KubeProxyConfiguration from the kube-proxy ConfigMap, and the in-cluster
// config of its service account to reach the API.
const (
	// KubeProxyImage holds the static kube-proxy of _output/k8s at
	// kubeProxyPodBinary and the host's nft, which kube-proxy's nftables
	// mode runs, with its shared libraries.
	KubeProxyImage = "outpost.test/kube-proxy:1"
	// KubeProxyNamespace holds kube-proxy's pod, ConfigMap and service
	// account.
	KubeProxyNamespace = metav1.NamespaceSystem
	// kubeProxyName names kube-proxy's service account and ConfigMap, and
	// its container.
	kubeProxyName = "kube-proxy"
	// kubeProxyBinding is kubeadm's ClusterRoleBinding of the service
	// account to the bootstrap ClusterRole system:node-proxier.
	kubeProxyBinding = "kubeadm:node-proxier"
	nodeProxierRole  = "system:node-proxier"
	// kubeProxyPodBinary is where kube-proxy is in KubeProxyImage, as in
	// registry.k8s.io/kube-proxy.
	kubeProxyPodBinary = "/usr/local/bin/kube-proxy"
	// kubeProxyConfigDir is where the ConfigMap is mounted in the pod.
	kubeProxyConfigDir = "/var/lib/kube-proxy"
	// kubeProxyLabel is the label of kubeadm's kube-proxy pods.
	kubeProxyLabel = "k8s-app"
	// kubeProxyLockWait bounds the wait for the machine's kube-proxy lock,
	// which another test binary's kube-proxy may hold for minutes.
	kubeProxyLockWait = 10 * time.Minute
)

// KubeProxyPodOptions change how StartKubeProxyPodForTest runs kube-proxy;
// the zero value leaves it the in-cluster config kubelet gives every pod,
// as kubeadm's DaemonSet does: KUBERNETES_SERVICE_HOST/PORT from the
// kubernetes Service and the cluster CA. That works only where the Service
// leads somewhere the host network reaches, as outpost's
// --node-local-address does.
type KubeProxyPodOptions struct {
	// APIServer, when set, is the host:port at which kube-proxy reaches the
	// Kubernetes API, given as KUBERNETES_SERVICE_HOST and
	// KUBERNETES_SERVICE_PORT, which win over kubelet's: its serving
	// certificate must be valid for host and signed by the cluster CA (or
	// CAFile). kube-proxy is on the host network, so the apiserver's
	// 127.0.0.1 address works.
	APIServer string
	// CAFile, when set, is the CA bundle kube-proxy's in-cluster config
	// trusts (ca.crt beside its service account token) in place of the
	// cluster CA. The pod then projects its token, ca.crt (from the
	// ConfigMap) and namespace itself, as kubelet's own kube-api-access
	// volume does.
	CAFile string
}

// A KubeProxyPod is kube-proxy v1.37.2 in nftables mode running as a pod
// on Node, as kubeadm deploys it.
//
// Its rules are the machine's, as a KubeProxy's are: it holds the same
// machine-wide lock from its start until Close, and is told to stay off the
// machine's external address the same way (NodePorts only on 127.0.0.1,
// healthz and metrics on 127.0.0.1, no conntrack sysctl written). Its image
// has no iptables, so it cannot touch the host's iptables tables.
type KubeProxyPod struct {
	// Node runs it.
	Node *Node
	// Pod is its pod in KubeProxyNamespace.
	Pod string
	// HealthzURL answers 200 once kube-proxy has synced its rules recently.
	HealthzURL string
	// MetricsURL is its Prometheus endpoint.
	MetricsURL string

	apiserver string // host:port of the API, if not kubelet's
	ca        []byte // CA bundle, if not the cluster CA
	lock      *os.File
	lockWait  time.Duration // how long the start waited for the lock

	mu          sync.Mutex // guards the fields below
	closed      bool
	leftTables  []string    // kubeProxyTablesLeft as Close released the lock
	releaseStop func() bool // cancels the safety-net Close
}

// StartKubeProxyPod starts kube-proxy as a pod on node n and returns once
// its rules are in place and its /healthz answers. It imports
// KubeProxyImage, then waits, up to kubeProxyLockWait, for any other
// kube-proxy of the machine (KubeProxy or KubeProxyPod) to be closed, and
// removes the tables one killed earlier may have left; then it creates in
// KubeProxyNamespace the kube-proxy ServiceAccount, kubeadm's
// ClusterRoleBinding to system:node-proxier, the kube-proxy ConfigMap and
// the pod. ctx bounds it all; the steps after the lock get 2 minutes when
// it has no deadline. The caller must Close it; a safety net closes it
// when the control plane stops.
func (n *Node) StartKubeProxyPod(ctx context.Context, opts KubeProxyPodOptions) (_ *KubeProxyPod, err error) {
	if _, err := exec.LookPath("nft"); err != nil {
		return nil, fmt.Errorf("starting the kube-proxy pod: %w: run hack/install-node-deps.sh as root", err)
	}
	kp := &KubeProxyPod{Node: n, Pod: "kube-proxy-" + n.Name, apiserver: opts.APIServer}
	if kp.apiserver != "" {
		if _, _, err := net.SplitHostPort(kp.apiserver); err != nil {
			return nil, fmt.Errorf("starting the kube-proxy pod: API server %q: %w", kp.apiserver, err)
		}
	}
	if opts.CAFile != "" {
		if kp.ca, err = os.ReadFile(opts.CAFile); err != nil {
			return nil, fmt.Errorf("starting the kube-proxy pod: %w", err)
		}
	}
	ctx, cancel := n.cp.withStop(ctx)
	defer cancel()
	if err := kp.importImage(ctx); err != nil {
		return nil, fmt.Errorf("starting the kube-proxy pod: node %s: %w", n.Name, err)
	}
	// Other tests' kube-proxies hold the lock for as long as they run.
	waitStart := time.Now()
	lockCtx, cancelLock := context.WithTimeout(ctx, kubeProxyLockWait)
	lock, err := lockProxies(lockCtx)
	cancelLock()
	if err != nil {
		return nil, fmt.Errorf("starting the kube-proxy pod: waiting for the other kube-proxy of the machine to be closed: %w", err)
	}
	kp.lock, kp.lockWait = lock, time.Since(waitStart)
	defer func() {
		if err != nil {
			kp.Close()
		}
	}()
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}
	// Whatever kube-proxy tables exist now were left by one that was killed.
	if err := deleteKubeProxyTables(ctx); err != nil {
		return nil, fmt.Errorf("starting the kube-proxy pod: removing stale rules: %w", err)
	}
	if err := kp.deploy(ctx); err != nil {
		return nil, fmt.Errorf("starting the kube-proxy pod: %w", err)
	}
	if err := kp.WaitSynced(ctx); err != nil {
		return nil, err
	}
	kp.mu.Lock()
	kp.releaseStop = context.AfterFunc(n.cp.ctx, kp.Close)
	kp.mu.Unlock()
	return kp, nil
}

// StartKubeProxyPodForTest starts kube-proxy as a pod as StartKubeProxyPod
// does and closes it in t.Cleanup, logging the end of its log when the
// test failed, and failing the test if it left anything on the host (see
// Leftovers). Start it after the node, so that it is closed before the
// node stops. An error fails the test.
func (n *Node) StartKubeProxyPodForTest(t testing.TB, opts KubeProxyPodOptions) *KubeProxyPod {
	t.Helper()
	kp, err := n.StartKubeProxyPod(t.Context(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if kp.lockWait > time.Second {
		t.Logf("the kube-proxy pod of %s waited %v for the machine's kube-proxy lock", n.Name, kp.lockWait.Round(time.Millisecond))
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last lines of kube-proxy's log:\n%s", kp.Log(40))
		}
		kp.Close()
		if left := kp.Leftovers(); len(left) > 0 {
			t.Errorf("the kube-proxy pod of %s left behind:\n  %s", n.Name, strings.Join(left, "\n  "))
		}
	})
	return kp
}

// importImage imports KubeProxyImage into the node's containerd, within 2
// minutes.
func (kp *KubeProxyPod) importImage(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	archive, err := kp.Node.cp.kubeProxyArchive(ctx)
	if err != nil {
		return err
	}
	return kp.Node.importArchives(ctx, []string{archive}, []string{KubeProxyImage})
}

// kubeProxyArchive packs KubeProxyImage into an archive, once per control
// plane, and returns its path. nft is dynamically linked, so the layer
// holds the libraries and the loader it runs with on the host, at their
// paths there.
func (c *ControlPlane) kubeProxyArchive(ctx context.Context) (string, error) {
	imagesMu.Lock()
	defer imagesMu.Unlock()
	archive := filepath.Join(c.Dir, "images", "kube-proxy.oci.tar")
	if _, err := os.Stat(archive); err == nil {
		return archive, nil
	}
	bin, err := Binary("kube-proxy")
	if err != nil {
		return "", fmt.Errorf("packing image %s: %w", KubeProxyImage, err)
	}
	proxy, err := os.ReadFile(bin)
	if err != nil {
		return "", fmt.Errorf("packing image %s: %w", KubeProxyImage, err)
	}
	nft, err := exec.LookPath("nft")
	if err != nil {
		return "", fmt.Errorf("packing image %s: %w", KubeProxyImage, err)
	}
	libs, err := sharedLibraries(ctx, nft)
	if err != nil {
		return "", fmt.Errorf("packing image %s: %w", KubeProxyImage, err)
	}
	host, err := hostLayerFiles(append([]string{nft}, libs...)...)
	if err != nil {
		return "", fmt.Errorf("packing image %s: %w", KubeProxyImage, err)
	}
	// kube-proxy finds nft on $PATH; nft its libraries where the loader
	// looks by default.
	env := []string{"PATH=" + filepath.Dir(kubeProxyPodBinary) + ":" + filepath.Dir(nft)}
	files := append([]layerFile{{path: kubeProxyPodBinary, mode: 0o755, data: proxy}}, host...)
	tarball, err := ociArchiveFiles(KubeProxyImage, kubeProxyPodBinary, env, files)
	if err != nil {
		return "", fmt.Errorf("packing image %s: %w", KubeProxyImage, err)
	}
	if err := os.MkdirAll(filepath.Dir(archive), 0o755); err != nil {
		return "", err
	}
	return archive, writeFileAtomic(archive, tarball, 0o644)
}

// deploy creates the service account and its binding, the ConfigMap and
// the pod.
func (kp *KubeProxyPod) deploy(ctx context.Context) error {
	c := kp.Node.cp
	if err := c.EnsureNamespace(ctx, KubeProxyNamespace); err != nil {
		return err
	}
	if err := kp.grant(ctx); err != nil {
		return err
	}
	config, err := kp.config()
	if err != nil {
		return err
	}
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: kubeProxyName, Labels: map[string]string{"app": kubeProxyName}},
		Data:       map[string]string{"config.conf": config},
	}
	if kp.ca != nil {
		cm.Data["ca.crt"] = string(kp.ca)
	}
	cms := c.client.CoreV1().ConfigMaps(KubeProxyNamespace)
	_, err = cms.Create(ctx, cm, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("creating ConfigMap %s/%s: %w", KubeProxyNamespace, kubeProxyName, err)
	}
	if _, err := c.client.CoreV1().Pods(KubeProxyNamespace).Create(ctx, kp.pod(), metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating pod %s/%s: %w", KubeProxyNamespace, kp.Pod, err)
	}
	return nil
}

// grant creates the kube-proxy service account and binds it to
// system:node-proxier as kubeadm does, then waits until the authorizer
// counts the binding.
func (kp *KubeProxyPod) grant(ctx context.Context) error {
	return kp.Node.cp.bindServiceAccount(ctx, KubeProxyNamespace, kubeProxyName, nodeProxierRole, kubeProxyBinding,
		authorizationv1.ResourceAttributes{Verb: "watch", Group: discoveryv1.GroupName, Resource: "endpointslices"})
}

// config returns kube-proxy's KubeProxyConfiguration, with the settings of
// a KubeProxy in nftables mode (see KubeProxy.writeConfig) and no
// kubeconfig: kube-proxy then uses its in-cluster config.
func (kp *KubeProxyPod) config() (string, error) {
	ports, err := freePorts(2)
	if err != nil {
		return "", err
	}
	healthz := "127.0.0.1:" + strconv.Itoa(ports[0])
	metrics := "127.0.0.1:" + strconv.Itoa(ports[1])
	kp.HealthzURL = "http://" + healthz + "/healthz"
	kp.MetricsURL = "http://" + metrics + "/metrics"
	data, err := kubeProxyConfig(kp.Node.Name, KubeProxyNFTables, "", "127.0.0.1/32", healthz, metrics)
	return string(data), err
}

// pod is kube-proxy's pod, as kubeadm's DaemonSet runs it: privileged on
// the host network as the kube-proxy service account, critical and
// tolerating every taint, its node name from the downward API, the
// ConfigMap at kubeProxyConfigDir. Unlike kubeadm's it mounts neither the
// host's /run/xtables.lock (which would create that file on the host, and
// nftables mode takes no iptables lock) nor /lib/modules (which this
// machine lacks), and it logs at --v=2 for the test's diagnostics.
func (kp *KubeProxyPod) pod() *corev1.Pod {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: kp.Pod, Labels: map[string]string{kubeProxyLabel: kubeProxyName}},
		Spec: corev1.PodSpec{
			NodeName:                      kp.Node.Name,
			HostNetwork:                   true,
			PriorityClassName:             "system-node-critical",
			ServiceAccountName:            kubeProxyName,
			Tolerations:                   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
			TerminationGracePeriodSeconds: new(int64(1)),
			Containers: []corev1.Container{{
				Name:            kubeProxyName,
				Image:           KubeProxyImage,
				ImagePullPolicy: corev1.PullNever,
				Command: []string{
					kubeProxyPodBinary,
					"--config=" + kubeProxyConfigDir + "/config.conf",
					"--hostname-override=$(NODE_NAME)",
					"--v=2",
				},
				Env: []corev1.EnvVar{{Name: "NODE_NAME", ValueFrom: &corev1.EnvVarSource{
					FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"},
				}}},
				SecurityContext: &corev1.SecurityContext{Privileged: new(true)},
				VolumeMounts:    []corev1.VolumeMount{{Name: kubeProxyName, MountPath: kubeProxyConfigDir}},
			}},
			Volumes: []corev1.Volume{{Name: kubeProxyName, VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
				LocalObjectReference: corev1.LocalObjectReference{Name: kubeProxyName},
				Items:                []corev1.KeyToPath{{Key: "config.conf", Path: "config.conf"}},
			}}}},
		},
	}
	c := &pod.Spec.Containers[0]
	if kp.apiserver != "" {
		host, port, _ := net.SplitHostPort(kp.apiserver)
		c.Env = append(c.Env,
			corev1.EnvVar{Name: "KUBERNETES_SERVICE_HOST", Value: host},
			corev1.EnvVar{Name: "KUBERNETES_SERVICE_PORT", Value: port})
	}
	if kp.ca == nil {
		return pod
	}
	// kubelet's kube-api-access volume, with the CA of the ConfigMap.
	pod.Spec.AutomountServiceAccountToken = new(false)
	pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: "api-access", VolumeSource: corev1.VolumeSource{
		Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: new(int64(3607))}},
			{ConfigMap: &corev1.ConfigMapProjection{
				LocalObjectReference: corev1.LocalObjectReference{Name: kubeProxyName},
				Items:                []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}},
			}},
			{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{
				{Path: "namespace", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}},
			}}},
		}},
	}})
	c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{
		Name: "api-access", MountPath: "/var/run/secrets/kubernetes.io/serviceaccount", ReadOnly: true,
	})
	return pod
}

// WaitSynced waits up to 2 minutes until kube-proxy's tables exist and its
// /healthz answers, which after a "reboot" (see DeleteRules) means that
// kubelet started the pod again and it synced its rules from the API.
func (kp *KubeProxyPod) WaitSynced(ctx context.Context) error {
	_, err := Poll(ctx, 200*time.Millisecond, 2*time.Minute, func(ctx context.Context) (bool, string) {
		tables, err := kubeProxyTables(ctx)
		if err != nil {
			return false, err.Error()
		}
		if len(tables) == 0 {
			return false, "no kube-proxy nftables table yet; " + kp.describePod(ctx)
		}
		if err := probeOK(ctx, nil, kp.HealthzURL); err != nil {
			return false, err.Error() + "; " + kp.describePod(ctx)
		}
		return true, ""
	})
	if err != nil {
		return fmt.Errorf("kube-proxy pod of %s not synced: %w\nlast lines of its log:\n%s", kp.Node.Name, err, kp.Log(30))
	}
	return nil
}

// describePod says how the apiserver sees the pod, for waiting messages.
func (kp *KubeProxyPod) describePod(ctx context.Context) string {
	pod, err := kp.Node.cp.client.CoreV1().Pods(KubeProxyNamespace).Get(ctx, kp.Pod, metav1.GetOptions{})
	if err != nil {
		return err.Error()
	}
	return DescribePod(pod)
}

// DeleteRules does to kube-proxy's rules what a reboot does: its tables are
// deleted. Call it with kubelet stopped and the containers removed
// (Node.RemoveAllContainers); it fails while kube-proxy still runs, which
// would make them again. StartKubelet then brings the pod back, and the pod
// its rules (see WaitSynced).
func (kp *KubeProxyPod) DeleteRules() error {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	if kp.closed {
		return errors.New("deleting the kube-proxy pod's rules: it is closed")
	}
	if pids := kp.processes(); len(pids) > 0 {
		return fmt.Errorf("deleting the kube-proxy pod's rules: kube-proxy still runs (%v): stop kubelet and remove the containers first", pids)
	}
	ctx, cancel := context.WithTimeout(context.Background(), nodeStopTimeout)
	defer cancel()
	if err := deleteKubeProxyTables(ctx); err != nil {
		return fmt.Errorf("deleting the kube-proxy pod's rules: %w", err)
	}
	return nil
}

// Close deletes the pod and waits for kube-proxy to exit (killing it if
// kubelet does not stop it), deletes its tables, the ConfigMap, the binding
// and the service account, and releases the machine's lock for the next
// kube-proxy. What cannot be cleaned is printed, and Leftovers lists it.
// Close is idempotent.
func (kp *KubeProxyPod) Close() {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	if kp.closed {
		return
	}
	kp.closed = true
	if kp.releaseStop != nil {
		kp.releaseStop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var errs []error
	// After a Stop of the control plane there is nobody to tell.
	if kp.Node.cp.ctx.Err() == nil {
		errs = append(errs, kp.deletePod(ctx))
	}
	errs = append(errs, kp.killProcesses(), deleteKubeProxyTables(ctx))
	if kp.Node.cp.ctx.Err() == nil {
		errs = append(errs, kp.deleteObjects(ctx))
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: closing the kube-proxy pod of %s: %v\n", kp.Node.Name, err)
	}
	// Once the lock is released, tables on the host may be the next
	// kube-proxy's: see what is left while they can only be ours.
	kp.leftTables = kubeProxyTablesLeft()
	if kp.lock != nil {
		unlockProxies(kp.lock)
		kp.lock = nil
	}
}

// deletePod deletes the pod and waits up to 30 s for it to go, which
// kubelet confirms once kube-proxy exited; it force-deletes the pod if
// kubelet does not, or at once if kubelet is stopped.
func (kp *KubeProxyPod) deletePod(ctx context.Context) error {
	pods := kp.Node.cp.client.CoreV1().Pods(KubeProxyNamespace)
	if kp.Node.kubeletRunning() {
		if err := pods.Delete(ctx, kp.Pod, metav1.DeleteOptions{}); err != nil {
			if apierrors.IsNotFound(err) {
				return nil
			}
			return fmt.Errorf("deleting pod %s/%s: %w", KubeProxyNamespace, kp.Pod, err)
		}
		_, err := Poll(ctx, 200*time.Millisecond, 30*time.Second, func(ctx context.Context) (bool, string) {
			_, err := pods.Get(ctx, kp.Pod, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return true, ""
			}
			return false, fmt.Sprintf("pod %s/%s still exists (%v)", KubeProxyNamespace, kp.Pod, err)
		})
		if err == nil {
			return nil
		}
	}
	force := metav1.DeleteOptions{GracePeriodSeconds: new(int64)}
	if err := pods.Delete(ctx, kp.Pod, force); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("force-deleting pod %s/%s: %w", KubeProxyNamespace, kp.Pod, err)
	}
	return nil
}

// kubeletRunning reports whether the node's kubelet runs.
func (n *Node) kubeletRunning() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.kubelet != nil && !n.kubelet.exited()
}

// deleteObjects deletes the ConfigMap, the binding and the service account.
func (kp *KubeProxyPod) deleteObjects(ctx context.Context) error {
	client := kp.Node.cp.client
	var errs []error
	for what, err := range map[string]error{
		"ConfigMap":          client.CoreV1().ConfigMaps(KubeProxyNamespace).Delete(ctx, kubeProxyName, metav1.DeleteOptions{}),
		"ClusterRoleBinding": client.RbacV1().ClusterRoleBindings().Delete(ctx, kubeProxyBinding, metav1.DeleteOptions{}),
		"ServiceAccount":     client.CoreV1().ServiceAccounts(KubeProxyNamespace).Delete(ctx, kubeProxyName, metav1.DeleteOptions{}),
	} {
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("deleting the kube-proxy %s: %w", what, err))
		}
	}
	return errors.Join(errs...)
}

// processes returns the PIDs of the node's kube-proxy pod processes on the
// host: those running kubeProxyPodBinary for the node's name.
func (kp *KubeProxyPod) processes() []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		if args[0] == kubeProxyPodBinary && slices.Contains(args, "--hostname-override="+kp.Node.Name) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// killProcesses waits a moment for the node's kube-proxy to exit, as it
// does once kubelet stopped its container, then SIGKILLs it.
func (kp *KubeProxyPod) killProcesses() error {
	return killLingering("kube-proxy processes", func() map[int]string {
		procs := map[int]string{}
		for _, pid := range kp.processes() {
			procs[pid] = "kube-proxy"
		}
		return procs
	})
}

// Leftovers describes what kube-proxy still holds on the host: its process
// and its nftables tables (after Close, those seen as it released the
// machine's lock). After Close it must be empty.
func (kp *KubeProxyPod) Leftovers() []string {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	var left []string
	for _, pid := range kp.processes() {
		left = append(left, fmt.Sprintf("kube-proxy process %d", pid))
	}
	if kp.closed {
		return append(left, kp.leftTables...)
	}
	return append(left, kubeProxyTablesLeft()...)
}

// Log returns the last lines of kube-proxy's newest container log.
func (kp *KubeProxyPod) Log(lines int) string {
	logs, _ := filepath.Glob(filepath.Join(kp.Node.podLogsDir, KubeProxyNamespace+"_"+kp.Pod+"_*", kubeProxyName, "*.log"))
	if len(logs) == 0 {
		return "(no log of kube-proxy)"
	}
	newest, newestTime := "", time.Time{}
	for _, l := range logs {
		if fi, err := os.Stat(l); err == nil && fi.ModTime().After(newestTime) {
			newest, newestTime = l, fi.ModTime()
		}
	}
	return tailFile(newest, lines)
}

// deleteKubeProxyTables deletes kube-proxy's nftables tables from the host.
// The caller holds the machine's lock and no kube-proxy runs.
func deleteKubeProxyTables(ctx context.Context) error {
	tables, err := kubeProxyTables(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, t := range tables {
		errs = append(errs, deleteTable(ctx, t))
	}
	return errors.Join(errs...)
}

// kubeProxyTablesLeft describes kube-proxy's nftables tables on the host.
func kubeProxyTablesLeft() []string {
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
	return left
}
