package framework

import (
	"context"
	"fmt"
	"os"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// rootCAConfigMap is the ConfigMap that kube-controller-manager publishes in
// every namespace and that each pod's service account token volume projects.
const rootCAConfigMap = "kube-root-ca.crt"

// EnsureNamespace makes namespace ns ready for pods that a real kubelet runs,
// doing what kube-controller-manager does when it runs: the namespace, its
// "default" ServiceAccount (which the ServiceAccount admission plugin
// requires of every pod) and the kube-root-ca.crt ConfigMap (without which
// kubelet cannot mount the token volume, and the pod never starts). Objects
// that exist already are left alone, so it works with or without
// kube-controller-manager.
func (c *ControlPlane) EnsureNamespace(ctx context.Context, ns string) error {
	client := c.client.CoreV1()
	_, err := client.Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating namespace %s: %w", ns, err)
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
	if _, err := client.ServiceAccounts(ns).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating default service account in %s: %w", ns, err)
	}
	ca, err := os.ReadFile(c.CAFile)
	if err != nil {
		return fmt.Errorf("reading cluster CA: %w", err)
	}
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: rootCAConfigMap},
		Data:       map[string]string{"ca.crt": string(ca)},
	}
	if _, err := client.ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating %s in %s: %w", rootCAConfigMap, ns, err)
	}
	return nil
}
