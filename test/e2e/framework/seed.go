package framework

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// SeedConfigMaps creates namespace ns and in it n ConfigMaps cm-000000,
// cm-000001, ... labelled app=bench, each with a payload of size bytes,
// from `parallel` clients at once.
func SeedConfigMaps(ctx context.Context, c kubernetes.Interface, ns string, n, size, parallel int) error {
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating namespace %s: %w", ns, err)
	}
	var wg sync.WaitGroup
	errs := make([]error, parallel)
	next := make(chan int)
	for w := range parallel {
		wg.Go(func() {
			for i := range next {
				if errs[w] != nil {
					continue // drain
				}
				cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cm-%06d", i), Labels: map[string]string{"app": "bench"}},
					Data: map[string]string{"payload": strings.Repeat("x", size)}}
				if _, err := c.CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
					errs[w] = fmt.Errorf("creating %s/%s: %w", ns, cm.Name, err)
				}
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	return errors.Join(errs...)
}
