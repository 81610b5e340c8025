package autonomy

import (
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

func restConfig(cfg Config) (*rest.Config, error) {
	var rc *rest.Config
	var err error
	if cfg.Kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("loading client configuration: %w", err)
	}
	rc.QPS, rc.Burst = cfg.QPS, cfg.Burst
	rc.UserAgent = DefaultName
	return rc, nil
}

// boundPods returns the factory's pod informer, restricted to pods bound to
// a node: unbound pods are none of our business, and a large cluster may
// have many pending ones.
func boundPods(factory informers.SharedInformerFactory) coreinformers.PodInformer {
	return &podInformer{factory: factory}
}

// podInformer is coreinformers.PodInformer with a field selector.
type podInformer struct {
	factory informers.SharedInformerFactory
}

func (p *podInformer) Informer() cache.SharedIndexInformer {
	return p.factory.InformerFor(&corev1.Pod{}, func(client kubernetes.Interface, resync time.Duration) cache.SharedIndexInformer {
		return coreinformers.NewFilteredPodInformer(client, metav1.NamespaceAll, resync, cache.Indexers{}, func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermNotEqualSelector("spec.nodeName", "").String()
		})
	})
}

func (p *podInformer) Lister() corelisters.PodLister {
	return corelisters.NewPodLister(p.Informer().GetIndexer())
}

// stripManagedFields drops managedFields from cached objects: we never read
// them, and they are a large part of every object.
func stripManagedFields(obj any) (any, error) {
	if a, err := meta.Accessor(obj); err == nil {
		a.SetManagedFields(nil)
	}
	return obj, nil
}
