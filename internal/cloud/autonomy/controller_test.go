package autonomy

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"
)

// TestController runs the controller against a fake clientset: pods on a
// node that turns autonomous get their tolerations, DaemonSet pods and
// pods elsewhere do not, and the originals come back when autonomy ends.
func TestController(t *testing.T) {
	edge := node("edge", nil, false)
	plain := node("plain", nil, false)
	web := boundPod(defaults()...)
	web.Name, web.Spec.NodeName = "web", "edge"
	agent := boundPod(defaults()...)
	agent.Name, agent.Spec.NodeName = "agent", "edge"
	agent.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "agent", UID: "u", Controller: new(true)}}
	other := boundPod(defaults()...)
	other.Name, other.Spec.NodeName = "other", "plain"
	for _, o := range []metav1.Object{edge, plain, web, agent, other} {
		o.SetResourceVersion("1") // the fake tracker keeps what it is given
	}
	client := fake.NewClientset(edge, plain, web, agent, other)
	factory := informers.NewSharedInformerFactory(client, 0)
	recorder := record.NewFakeRecorder(100)
	ctrl, err := NewController(client, factory.Core().V1().Nodes(), factory.Core().V1().Pods(), recorder, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	factory.Start(ctx.Done())
	go func() { done <- ctrl.Run(ctx, 2) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		factory.Shutdown()
	})

	pods := client.CoreV1().Pods("ns")
	waitPod := func(name, what string, ok func(*corev1.Pod) bool) *corev1.Pod {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			p, err := pods.Get(ctx, name, metav1.GetOptions{})
			if err == nil && ok(p) {
				return p
			}
			if time.Now().After(deadline) {
				t.Fatalf("pod %s: timed out waiting for %s; last: %+v, %v", name, what, p.Spec.Tolerations, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	setAnnotations := func(name string, a map[string]string) {
		t.Helper()
		n, err := client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		n.Annotations = a
		if _, err := client.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// The node turns autonomous after its pods exist.
	setAnnotations("edge", map[string]string{AnnotationAutonomyDuration: "0"})
	waitPod("web", "forever tolerations", func(p *corev1.Pod) bool {
		return equal(seconds(p, unreachableKey), []string{"forever"}) && equal(seconds(p, notReadyKey), []string{"forever"}) &&
			p.Annotations[AnnotationOriginalTolerations] != ""
	})

	// A duration change uses the recorded originals, not our own values.
	setAnnotations("edge", map[string]string{AnnotationOpenYurtAutonomyDuration: "10m"})
	waitPod("web", "600 s tolerations", func(p *corev1.Pod) bool {
		return equal(seconds(p, unreachableKey), []string{"600"}) && equal(seconds(p, notReadyKey), []string{"600"})
	})

	// A typo: treated as not autonomous, restored, and reported.
	setAnnotations("edge", map[string]string{AnnotationAutonomyDuration: "forever"})
	waitPod("web", "restored tolerations", func(p *corev1.Pod) bool {
		_, recorded := p.Annotations[AnnotationOriginalTolerations]
		return !recorded && equal(seconds(p, unreachableKey), []string{"300"}) && equal(seconds(p, notReadyKey), []string{"300"})
	})
	waitEvent(t, recorder, reasonInvalidAutonomy)

	for _, name := range []string{"agent", "other"} {
		p, err := pods.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if !equal(seconds(p, unreachableKey), []string{"300"}) || len(p.Annotations) != 0 {
			t.Errorf("pod %s changed: %+v %v", name, p.Spec.Tolerations, p.Annotations)
		}
	}
}

func waitEvent(t *testing.T, r *record.FakeRecorder, reason string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case e := <-r.Events:
			if strings.Contains(e, reason) {
				return
			}
		case <-timeout:
			t.Fatalf("no %s event", reason)
		}
	}
}
