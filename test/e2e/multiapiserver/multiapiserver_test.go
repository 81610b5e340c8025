// Package e2e checks the framework's two-apiserver topology, the one
// Outpost's upstream failover is tested against: both apiservers share one
// etcd, so either serves what the other wrote, and one can go away while
// the other keeps serving.
package e2e

import (
	"os"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	os.Exit(framework.Run(m, framework.Options{APIServers: 2}, &cp))
}

// clientAt returns an admin client for apiserver i.
func clientAt(t *testing.T, i int) kubernetes.Interface {
	t.Helper()
	cfg := cp.AdminConfig()
	cfg.Host = cp.URL(i)
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestTwoAPIServersShareStorage(t *testing.T) {
	ctx := t.Context()
	urls := cp.URLs()
	if len(urls) != 2 || urls[0] == urls[1] {
		t.Fatalf("URLs = %v, want two distinct", urls)
	}
	a, b := clientAt(t, 0), clientAt(t, 1)

	w, err := b.CoreV1().ConfigMaps(metav1.NamespaceDefault).Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=shared"})
	if err != nil {
		t.Fatalf("watching on apiserver 1: %v", err)
	}
	defer w.Stop()

	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "shared"}, Data: map[string]string{"from": "0"}}
	if _, err := a.CoreV1().ConfigMaps(metav1.NamespaceDefault).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating on apiserver 0: %v", err)
	}
	select {
	case ev := <-w.ResultChan():
		got, ok := ev.Object.(*corev1.ConfigMap)
		if ev.Type != watch.Added || !ok || got.Data["from"] != "0" {
			t.Errorf("watch on apiserver 1 got %s %#v, want ADDED shared", ev.Type, ev.Object)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("watch on apiserver 1 saw nothing of a write to apiserver 0")
	}

	got, err := b.CoreV1().ConfigMaps(metav1.NamespaceDefault).Get(ctx, "shared", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("getting on apiserver 1: %v", err)
	}
	if got.Data["from"] != "0" {
		t.Errorf("apiserver 1 serves %v, want from=0", got.Data)
	}
}

func TestOneAPIServerSurvivesTheOther(t *testing.T) {
	ctx := t.Context()
	b := clientAt(t, 1)
	if err := cp.StopAPIServer(0); err != nil {
		t.Fatal(err)
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "while-0-down"}}
	if _, err := b.CoreV1().ConfigMaps(metav1.NamespaceDefault).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating on apiserver 1 while 0 is down: %v", err)
	}
	out, err := cp.Kubectl(ctx, "", "--server="+cp.URL(1), "get", "configmap", "while-0-down", "-o", "name")
	if err != nil {
		t.Fatal(err)
	}
	if got := string(out); got != "configmap/while-0-down\n" {
		t.Errorf("kubectl against apiserver 1 = %q", got)
	}

	if err := cp.StartAPIServer(0); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Client().CoreV1().ConfigMaps(metav1.NamespaceDefault).Get(ctx, "while-0-down", metav1.GetOptions{}); err != nil {
		t.Errorf("apiserver 0 after restart does not serve what 1 wrote: %v", err)
	}
}
