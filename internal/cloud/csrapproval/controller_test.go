package csrapproval

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"
)

// TestController runs the controller on a fake clientset: it approves
// and denies what Decide says, once each, with an event and the metric
// hook, and leaves kubelet's own CSR and decided ones alone.
func TestController(t *testing.T) {
	named := func(name string, csr *certificatesv1.CertificateSigningRequest) *certificatesv1.CertificateSigningRequest {
		csr.Name = name
		return csr
	}
	already := named("already-denied", csrOf(t, request{dns: inCluster}))
	already.Status.Conditions = []certificatesv1.CertificateSigningRequestCondition{{Type: certificatesv1.CertificateDenied, Status: corev1.ConditionTrue, Reason: "ByHand"}}
	client := fake.NewClientset(
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "kubernetes"}, Spec: corev1.ServiceSpec{ClusterIP: vip, ClusterIPs: []string{vip}}},
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeA}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.1.10"}}}},
		named("own", csrOf(t, request{dns: append([]string{nodeA}, inCluster...), ips: []string{vip, "169.254.2.1", "192.168.1.10"}})),
		named("foreign", csrOf(t, request{dns: inCluster, ips: []string{"8.8.8.8"}})),
		named("kubelet", csrOf(t, request{dns: []string{nodeA}, ips: []string{"192.168.1.10"}})),
		already,
	)
	recorder := record.NewFakeRecorder(10)
	var mu sync.Mutex
	counts := map[Verdict]int{}
	c := New(client, "", recorder, slog.New(slog.NewTextHandler(t.Output(), nil)), func(v Verdict) {
		mu.Lock()
		counts[v]++
		mu.Unlock()
	})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()

	condition := func(name string) *certificatesv1.CertificateSigningRequestCondition {
		csr, err := client.CertificatesV1().CertificateSigningRequests().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if n := len(csr.Status.Conditions); n > 1 {
			t.Errorf("%s: %d conditions %v; want one", name, n, csr.Status.Conditions)
		}
		if len(csr.Status.Conditions) == 0 {
			return nil
		}
		return &csr.Status.Conditions[0]
	}
	deadline := time.Now().Add(10 * time.Second)
	for condition("own") == nil || condition("foreign") == nil {
		if time.Now().After(deadline) {
			t.Fatal("own and foreign CSRs not decided within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := condition("own"); got.Type != certificatesv1.CertificateApproved || got.Reason != ReasonApproved {
		t.Errorf("own: %+v", got)
	}
	if got := condition("foreign"); got.Type != certificatesv1.CertificateDenied || got.Reason != ReasonForeignIPAddress || !strings.Contains(got.Message, "8.8.8.8") {
		t.Errorf("foreign: %+v", got)
	}
	time.Sleep(200 * time.Millisecond) // let anything else happen that would
	if got := condition("kubelet"); got != nil {
		t.Errorf("kubelet's own CSR: %+v; want it left alone", got)
	}
	if got := condition("already-denied"); got.Reason != "ByHand" {
		t.Errorf("already denied: %+v", got)
	}
	var events []string
	for len(recorder.Events) > 0 {
		events = append(events, <-recorder.Events)
	}
	slices.Sort(events) // Normal before Warning
	if len(events) != 2 || !strings.HasPrefix(events[0], "Normal "+EventApproved+" ") || !strings.HasPrefix(events[1], "Warning "+EventDenied+" ") {
		t.Errorf("events %q; want one approval and one denial", events)
	}
	mu.Lock()
	defer mu.Unlock()
	if counts[Approve] != 1 || counts[Deny] != 1 || len(counts) != 2 {
		t.Errorf("decisions %v; want one approval and one denial", counts)
	}
}
