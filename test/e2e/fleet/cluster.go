package fleet

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// Annotations the harness writes: churn on every kind the clients watch, and
// the outage's marker on the objects that are changed (not created) during
// an outage.
const (
	churnAnnotation  = "fleet.outpost.io/churn"
	outageAnnotation = "fleet.outpost.io/outage"
)

// An agent is one client of a node. Node agents use the node's client
// certificate (CN=system:node:<node>); the others a service-account token of
// their own, one per node, as a DaemonSet's pods each hold one.
type agent struct {
	Name string
	// Namespace and ServiceAccount are empty for node agents.
	Namespace, ServiceAccount string
	// Rules are the ClusterRole of a service-account agent.
	Rules []rbacv1.PolicyRule
}

// The agents of every node, as the issue lists them.
var agents = []agent{
	{Name: "kubelet"},
	{Name: "kube-proxy", Namespace: "kube-system", ServiceAccount: "fleet-kube-proxy", Rules: []rbacv1.PolicyRule{
		read("", "services"), read("discovery.k8s.io", "endpointslices")}},
	{Name: "coredns", Namespace: "kube-system", ServiceAccount: "fleet-coredns", Rules: []rbacv1.PolicyRule{
		read("", "services", "namespaces"), read("discovery.k8s.io", "endpointslices")}},
	{Name: "cni"},
	{Name: "log-agent", Namespace: systemNamespace, ServiceAccount: "fleet-log-agent", Rules: []rbacv1.PolicyRule{
		read("", "pods", "namespaces")}},
	{Name: "monitoring", Namespace: systemNamespace, ServiceAccount: "fleet-monitoring", Rules: []rbacv1.PolicyRule{
		read("", "pods", "nodes", "services"), read("discovery.k8s.io", "endpointslices")}},
}

// cniNodesRole lets every node read all Nodes, for the CNI-like agent that
// runs with the node's credentials (as flannel does when given kubelet's
// kubeconfig): the Node authorizer lets a node read only its own Node.
const cniNodesRole = "fleet:cni-nodes"

// systemNamespace holds the service accounts of the node agents that are not
// kube-system's.
const systemNamespace = "fleet-system"

func read(group string, resources ...string) rbacv1.PolicyRule {
	return rbacv1.PolicyRule{APIGroups: []string{group}, Resources: resources, Verbs: []string{"get", "list", "watch"}}
}

// A pod of a node, with the ConfigMap and Secret it mounts (same name).
type podSpec struct {
	Namespace, Name string
}

// A nodeSpec is one node of the fleet and its pods.
type nodeSpec struct {
	Name string
	Pods []podSpec
	// Tokens are the service-account tokens of its agents, by agent name.
	Tokens map[string]string
}

// cluster is what the harness created in the control plane for every mode:
// the objects the clients watch, their identities, and the admin client the
// harness writes and scrapes with, whose requests it counts (own) so that
// they can be told apart from the clients' in the apiserver's figures.
type cluster struct {
	cp       *framework.ControlPlane
	cfg      Config
	admin    kubernetes.Interface
	own      *atomic.Int64
	scraper  rest.Interface // reads /metrics, not counted
	nodes    []nodeSpec
	services []podSpec // namespace and name of each Service and its EndpointSlice
}

// restConfigForMetrics makes cfg fit for a bare REST client of /metrics.
func restConfigForMetrics(cfg *rest.Config) *rest.Config {
	cfg.GroupVersion = &schema.GroupVersion{}
	cfg.NegotiatedSerializer = scheme.Codecs.WithoutConversion()
	return cfg
}

// countingTransport counts the requests the harness makes itself.
type countingTransport struct {
	n    *atomic.Int64
	next http.RoundTripper
}

func (c countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.next.RoundTrip(r)
}

// seed creates the cluster of cfg: namespaces, Services with EndpointSlices,
// Nodes, each node's pods with their ConfigMaps and Secrets, the agents'
// service accounts, roles and tokens. Nodes are deleted when t ends.
func seed(t *testing.T, cp *framework.ControlPlane, cfg Config) *cluster {
	t.Helper()
	ctx := t.Context()
	own := new(atomic.Int64)
	acfg := cp.AdminConfig()
	acfg.QPS, acfg.Burst = 200, 400
	acfg.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { return countingTransport{n: own, next: rt} }
	admin, err := kubernetes.NewForConfig(acfg)
	if err != nil {
		t.Fatal(err)
	}
	scraper, err := rest.RESTClientFor(restConfigForMetrics(cp.AdminConfig()))
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{cp: cp, cfg: cfg, admin: admin, own: own, scraper: scraper}

	namespaces := []string{systemNamespace}
	for i := range cfg.Namespaces {
		namespaces = append(namespaces, "fleet-"+strconv.Itoa(i))
	}
	for _, ns := range namespaces {
		if err := cp.EnsureNamespace(ctx, ns); err != nil {
			t.Fatal(err)
		}
	}
	for i := range cfg.Nodes {
		n := nodeSpec{Name: fmt.Sprintf("fleet-node-%03d", i), Tokens: map[string]string{}}
		for j := range cfg.PodsPerNode {
			n.Pods = append(n.Pods, podSpec{Namespace: namespaces[1+(i*cfg.PodsPerNode+j)%cfg.Namespaces], Name: fmt.Sprintf("%s-%d", n.Name, j)})
		}
		c.nodes = append(c.nodes, n)
		cp.CreateNode(t, n.Name, nil)
	}
	for i := range cfg.Services {
		c.services = append(c.services, podSpec{Namespace: namespaces[1+i%cfg.Namespaces], Name: "svc-" + strconv.Itoa(i)})
	}

	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for i, s := range c.services {
		g.Go(func() error { return c.createService(gctx, s, i) })
	}
	for _, n := range c.nodes {
		for _, p := range n.Pods {
			g.Go(func() error { return c.createPod(gctx, n.Name, p, p.Name) })
		}
	}
	if err := g.Wait(); err != nil {
		t.Fatalf("seeding the fleet's cluster: %v", err)
	}
	if err := c.createIdentities(ctx); err != nil {
		t.Fatal(err)
	}
	return c
}

// createService creates Service s and its EndpointSlice, with three
// endpoints on nodes of the fleet.
func (c *cluster) createService(ctx context.Context, s podSpec, i int) error {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": s.Name},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80}},
		},
	}
	if _, err := c.admin.CoreV1().Services(s.Namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating service %s/%s: %w", s.Namespace, s.Name, err)
	}
	port, proto, name := int32(8080), corev1.ProtocolTCP, "http"
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace,
			Labels: map[string]string{discoveryv1.LabelServiceName: s.Name, discoveryv1.LabelManagedBy: "fleet"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}},
	}
	for e := range 3 {
		node := c.nodes[(i+e)%len(c.nodes)].Name
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{fmt.Sprintf("10.244.%d.%d", i%250, 1+e)},
			Conditions: discoveryv1.EndpointConditions{Ready: new(true)},
			NodeName:   &node,
		})
	}
	if _, err := c.admin.DiscoveryV1().EndpointSlices(s.Namespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating endpointslice %s/%s: %w", s.Namespace, s.Name, err)
	}
	return nil
}

// createPod creates pod p bound to node, mounting ConfigMap and Secret
// `config` (created first unless they exist). No kubelet runs it: the
// Node authorizer only needs the binding to let the node read them.
func (c *cluster) createPod(ctx context.Context, node string, p podSpec, config string) error {
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: config, Namespace: p.Namespace}, Data: map[string]string{"app.conf": "node=" + node}}
	if _, err := c.admin.CoreV1().ConfigMaps(p.Namespace).Create(ctx, cm, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating configmap %s/%s: %w", p.Namespace, config, err)
	}
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: config, Namespace: p.Namespace}, StringData: map[string]string{"password": "fleet"}}
	if _, err := c.admin.CoreV1().Secrets(p.Namespace).Create(ctx, sec, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating secret %s/%s: %w", p.Namespace, config, err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, Labels: map[string]string{"app": "fleet"}},
		Spec: corev1.PodSpec{
			NodeName:                     node,
			AutomountServiceAccountToken: new(false),
			Containers: []corev1.Container{{
				Name: "app", Image: "registry.k8s.io/pause:3.10",
				EnvFrom:      []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: config}}}},
				VolumeMounts: []corev1.VolumeMount{{Name: "secret", MountPath: "/etc/secret"}},
			}},
			Volumes: []corev1.Volume{{Name: "secret", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: config}}}},
		},
	}
	if _, err := c.admin.CoreV1().Pods(p.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	return nil
}

// createIdentities creates the agents' service accounts and ClusterRoles,
// the nodes' right to read all Nodes (cniNodesRole), and one token per node
// and service-account agent.
func (c *cluster) createIdentities(ctx context.Context) error {
	rbac := c.admin.RbacV1()
	bind := func(role string, rules []rbacv1.PolicyRule, subject rbacv1.Subject) error {
		cr := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: role}, Rules: rules}
		if _, err := rbac.ClusterRoles().Create(ctx, cr, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating cluster role %s: %w", role, err)
		}
		crb := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: role},
			RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role},
			Subjects: []rbacv1.Subject{subject}}
		if _, err := rbac.ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("binding cluster role %s: %w", role, err)
		}
		return nil
	}
	if err := bind(cniNodesRole, []rbacv1.PolicyRule{read("", "nodes")}, rbacv1.Subject{Kind: rbacv1.GroupKind, APIGroup: rbacv1.GroupName, Name: "system:nodes"}); err != nil {
		return err
	}
	if err := c.cp.WaitAllowed(ctx, authorizationv1.SubjectAccessReviewSpec{User: "system:node:" + c.nodes[0].Name, Groups: []string{"system:nodes"},
		ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: "watch", Resource: "nodes"}}); err != nil {
		return err
	}
	for _, a := range agents {
		if a.ServiceAccount == "" {
			continue
		}
		sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: a.ServiceAccount}}
		if _, err := c.admin.CoreV1().ServiceAccounts(a.Namespace).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating service account %s/%s: %w", a.Namespace, a.ServiceAccount, err)
		}
		if err := bind("fleet:"+a.Name, a.Rules, rbacv1.Subject{Kind: rbacv1.ServiceAccountKind, Namespace: a.Namespace, Name: a.ServiceAccount}); err != nil {
			return err
		}
		first := a.Rules[0]
		if err := c.cp.WaitAllowed(ctx, authorizationv1.SubjectAccessReviewSpec{
			User:               "system:serviceaccount:" + a.Namespace + ":" + a.ServiceAccount,
			Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + a.Namespace, "system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: "watch", Group: first.APIGroups[0], Resource: first.Resources[0]},
		}); err != nil {
			return err
		}
		// Longer than any run: a token that expires mid-run would be a
		// failure of the harness, not of what it measures.
		exp := int64((12 * time.Hour).Seconds())
		for i := range c.nodes {
			tr, err := c.admin.CoreV1().ServiceAccounts(a.Namespace).CreateToken(ctx, a.ServiceAccount,
				&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
			if err != nil {
				return fmt.Errorf("token of %s/%s: %w", a.Namespace, a.ServiceAccount, err)
			}
			c.nodes[i].Tokens[a.Name] = tr.Status.Token
		}
	}
	return nil
}

// churn writes cfg.Churn times a second to a random object of each kind the
// clients watch (but namespaces, which rarely change), until ctx ends. It
// returns the first error it saw, if any, once ctx is done.
func (c *cluster) churn(ctx context.Context) error {
	if c.cfg.Churn <= 0 {
		<-ctx.Done()
		return nil
	}
	tick := time.NewTicker(time.Duration(float64(time.Second) / c.cfg.Churn))
	defer tick.Stop()
	var first error
	for n := 0; ; n++ {
		select {
		case <-ctx.Done():
			return first
		case <-tick.C:
		}
		patch := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:%q}}}`, churnAnnotation, strconv.Itoa(n))
		node := c.nodes[rand.IntN(len(c.nodes))]
		pod := node.Pods[rand.IntN(len(node.Pods))]
		svc := c.services[rand.IntN(len(c.services))]
		mp := types.MergePatchType
		o := metav1.PatchOptions{}
		core, disc := c.admin.CoreV1(), c.admin.DiscoveryV1()
		for _, write := range []func() error{
			func() error { _, err := core.Nodes().Patch(ctx, node.Name, mp, patch, o); return err },
			func() error { _, err := core.Pods(pod.Namespace).Patch(ctx, pod.Name, mp, patch, o); return err },
			func() error { _, err := core.ConfigMaps(pod.Namespace).Patch(ctx, pod.Name, mp, patch, o); return err },
			func() error { _, err := core.Secrets(pod.Namespace).Patch(ctx, pod.Name, mp, patch, o); return err },
			func() error { _, err := core.Services(svc.Namespace).Patch(ctx, svc.Name, mp, patch, o); return err },
			func() error {
				_, err := disc.EndpointSlices(svc.Namespace).Patch(ctx, svc.Name, mp, patch, o)
				return err
			},
		} {
			if err := write(); err != nil && first == nil && ctx.Err() == nil {
				first = fmt.Errorf("churn: %w", err)
			}
		}
	}
}

// A marker is what the harness creates and changes during an outage, for
// every node's clients to see once the link is back: a Namespace, a Service
// and its EndpointSlice, a Node, a pod on each node, and an annotation on
// each node's Node, ConfigMaps and Secrets.
type marker struct {
	ID        string
	Namespace string
	Service   podSpec // and its EndpointSlice
	Node      string
	Pods      map[string]podSpec // by node
}

var markerSeq atomic.Int64

// createMarker creates the outage's marker.
func (c *cluster) createMarker(ctx context.Context, mode string) (*marker, error) {
	id := fmt.Sprintf("%s-%d", mode, markerSeq.Add(1))
	m := &marker{ID: id, Namespace: "fleet-outage-" + id, Service: podSpec{Namespace: c.services[0].Namespace, Name: "outage-" + id},
		Node: "fleet-outage-" + id, Pods: map[string]podSpec{}}
	core := c.admin.CoreV1()
	if _, err := core.Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: m.Namespace}}, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("creating namespace %s: %w", m.Namespace, err)
	}
	if _, err := core.Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: m.Node}}, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("creating node %s: %w", m.Node, err)
	}
	if err := c.createService(ctx, m.Service, 0); err != nil {
		return nil, err
	}
	patch := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:%q}}}`, outageAnnotation, id)
	mp := types.MergePatchType
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for _, n := range c.nodes {
		first := n.Pods[0]
		pod := podSpec{Namespace: first.Namespace, Name: "outage-" + id + "-" + n.Name}
		m.Pods[n.Name] = pod
		g.Go(func() error { return c.createPod(gctx, n.Name, pod, first.Name) })
		g.Go(func() error {
			_, err := core.Nodes().Patch(gctx, n.Name, mp, patch, metav1.PatchOptions{})
			return err
		})
		for _, p := range n.Pods {
			g.Go(func() error {
				if _, err := core.ConfigMaps(p.Namespace).Patch(gctx, p.Name, mp, patch, metav1.PatchOptions{}); err != nil {
					return err
				}
				_, err := core.Secrets(p.Namespace).Patch(gctx, p.Name, mp, patch, metav1.PatchOptions{})
				return err
			})
		}
	}
	if err := g.Wait(); err != nil {
		return nil, fmt.Errorf("writing the outage's marker: %w", err)
	}
	return m, nil
}
