package fleet

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// kubeProxySelector is the label selector kube-proxy lists Services and
// EndpointSlices with (pkg/proxy: services of another proxy and headless
// ones are not its business).
const kubeProxySelector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"

// A watched is one informer of one agent: kind is the resource, and for the
// by-name kinds key names the one object.
type watched struct {
	agent    string
	kind     string // pods (of the node), node (by name), nodes, services, endpointslices, namespaces, configmap, secret
	key      string // namespace/name or name, for node, configmap and secret
	informer cache.SharedIndexInformer
}

// seen reports whether the informer holds what m created or changed that
// it watches.
func (w *watched) seen(node string, m *marker) bool {
	has := func(key string) bool {
		_, ok, _ := w.informer.GetStore().GetByKey(key)
		return ok
	}
	switch w.kind {
	case "pods":
		p := m.Pods[node]
		return has(p.Namespace + "/" + p.Name)
	case "nodes":
		return has(m.Node)
	case "services", "endpointslices":
		return has(m.Service.Namespace + "/" + m.Service.Name)
	case "namespaces":
		return has(m.Namespace)
	default: // node, configmap, secret: changed, not created
		obj, ok, _ := w.informer.GetStore().GetByKey(w.key)
		if !ok {
			return false
		}
		meta, err := metaOf(obj)
		return err == nil && meta.GetAnnotations()[outageAnnotation] == m.ID
	}
}

func metaOf(obj any) (metav1.Object, error) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return nil, fmt.Errorf("%T has no object metadata", obj)
	}
	return m, nil
}

// nodeClients is the client set of one node: per agent its own HTTP
// connection, identity and informers, as separate processes would have.
type nodeClients struct {
	node    string
	watches []*watched
	https   []*http.Client
	stop    chan struct{}
	wg      sync.WaitGroup
}

// configFor returns the client config of an agent of a node in a mode:
// where it connects and with which credentials.
type configFor func(agent agent) *rest.Config

// startNode starts the informers of every agent of node n and waits until
// all have synced (or ctx ends).
func startNode(ctx context.Context, n nodeSpec, config configFor) (*nodeClients, error) {
	nc := &nodeClients{node: n.Name, stop: make(chan struct{})}
	for _, a := range agents {
		cfg := config(a)
		cfg.UserAgent = "fleet-" + a.Name + "/" + n.Name
		cfg.QPS, cfg.Burst = 50, 100
		// A dialer of its own keeps client-go from sharing one transport
		// (one connection) between the agents of a node that use the same
		// certificate or CA, which separate processes never do.
		cfg.Dial = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext
		hc, err := rest.HTTPClientFor(cfg)
		if err != nil {
			nc.close()
			return nil, fmt.Errorf("client of %s on %s: %w", a.Name, n.Name, err)
		}
		nc.https = append(nc.https, hc)
		cs, err := kubernetes.NewForConfigAndClient(cfg, hc)
		if err != nil {
			nc.close()
			return nil, fmt.Errorf("client of %s on %s: %w", a.Name, n.Name, err)
		}
		nc.add(a.Name, cs, n)
	}
	for _, w := range nc.watches {
		nc.wg.Go(func() { w.informer.Run(nc.stop) })
	}
	synced := make([]cache.InformerSynced, len(nc.watches))
	for i, w := range nc.watches {
		synced[i] = w.informer.HasSynced
	}
	done := make(chan struct{})
	stopWait := context.AfterFunc(ctx, func() { close(done) })
	defer stopWait()
	if !cache.WaitForCacheSync(done, synced...) {
		nc.close()
		return nil, fmt.Errorf("clients of %s: not synced: %w", n.Name, context.Cause(ctx))
	}
	return nc, nil
}

// add creates the informers of agent name, as the issue describes each.
func (nc *nodeClients) add(name string, cs kubernetes.Interface, n nodeSpec) {
	watch := func(kind, key, ns, fields, labels string) {
		f := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithNamespace(ns),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) {
				o.FieldSelector, o.LabelSelector = fields, labels
			}))
		var inf cache.SharedIndexInformer
		switch kind {
		case "pods":
			inf = f.Core().V1().Pods().Informer()
		case "node", "nodes":
			inf = f.Core().V1().Nodes().Informer()
		case "services":
			inf = f.Core().V1().Services().Informer()
		case "endpointslices":
			inf = f.Discovery().V1().EndpointSlices().Informer()
		case "namespaces":
			inf = f.Core().V1().Namespaces().Informer()
		case "configmap":
			inf = f.Core().V1().ConfigMaps().Informer()
		case "secret":
			inf = f.Core().V1().Secrets().Informer()
		}
		nc.watches = append(nc.watches, &watched{agent: name, kind: kind, key: key, informer: inf})
	}
	onNode := "spec.nodeName=" + n.Name
	switch name {
	case "kubelet":
		watch("pods", "", "", onNode, "")
		watch("node", n.Name, "", "metadata.name="+n.Name, "")
		for _, p := range n.Pods {
			key := p.Namespace + "/" + p.Name
			watch("configmap", key, p.Namespace, "metadata.name="+p.Name, "")
			watch("secret", key, p.Namespace, "metadata.name="+p.Name, "")
		}
	case "kube-proxy":
		watch("services", "", "", "", kubeProxySelector)
		watch("endpointslices", "", "", "", kubeProxySelector)
	case "coredns":
		watch("services", "", "", "", "")
		watch("endpointslices", "", "", "", "")
		watch("namespaces", "", "", "", "")
	case "cni":
		watch("nodes", "", "", "", "")
	case "log-agent":
		watch("pods", "", "", onNode, "")
		watch("namespaces", "", "", "", "")
	case "monitoring":
		watch("pods", "", "", onNode, "")
		watch("nodes", "", "", "", "")
		watch("services", "", "", "", "")
		watch("endpointslices", "", "", "", "")
	}
}

// seen reports whether every informer of the node holds the marker.
func (nc *nodeClients) seen(m *marker) bool {
	for _, w := range nc.watches {
		if !w.seen(nc.node, m) {
			return false
		}
	}
	return true
}

// close stops the informers, waits for them, and closes the connections.
func (nc *nodeClients) close() {
	select {
	case <-nc.stop:
	default:
		close(nc.stop)
	}
	nc.wg.Wait()
	for _, hc := range nc.https {
		hc.CloseIdleConnections()
	}
}

// watchesPerNode is how many informers (upstream watches, when direct)
// one node's client set runs.
func watchesPerNode(podsPerNode int) int {
	// kubelet 2+2 per pod, kube-proxy 2, coredns 3, cni 1, log agent 2,
	// monitoring 4.
	return 2 + 2*podsPerNode + 2 + 3 + 1 + 2 + 4
}
