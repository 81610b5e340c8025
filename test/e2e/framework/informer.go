package framework

import (
	"context"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// StartConfigMapInformer starts an informer through c on the ConfigMaps of
// ns that match the label selector sel, as an operator on the node would
// run one, stopped when t ends, and waits until it has synced; a sync that
// never comes fails t.
func StartConfigMapInformer(t testing.TB, c kubernetes.Interface, ns, sel string) cache.SharedIndexInformer {
	t.Helper()
	factory := informers.NewSharedInformerFactoryWithOptions(c, 0, informers.WithNamespace(ns),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sel }))
	informer := factory.Core().V1().ConfigMaps().Informer()
	ctx, stop := context.WithCancel(context.Background())
	t.Cleanup(func() {
		stop()
		factory.Shutdown()
	})
	factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(t.Context().Done(), informer.HasSynced) {
		t.Fatal("informer never synced")
	}
	return informer
}
