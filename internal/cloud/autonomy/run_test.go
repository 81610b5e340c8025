package autonomy

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/outposthq/outpost/internal/cloud/peerhealth"
	"github.com/outposthq/outpost/internal/peer"
)

// syncBuffer is a log destination safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Without the RBAC to read the peer reports, the caches that readiness,
// the webhooks and the toleration controller wait for still sync; only the
// peers' verdicts wait, unknown meanwhile, and the cause is logged once.
func TestReportsForbiddenHoldOnlyTheVerdicts(t *testing.T) {
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "a"}})
	lists := atomic.Int32{}
	client.PrependReactor("list", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		lists.Add(1)
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "coordination.k8s.io", Resource: "leases"}, "",
			errFake("outpost-controller cannot list leases in outpost-peers"))
	})
	factory := informers.NewSharedInformerFactory(client, 0)
	nodes := factory.Core().V1().Nodes()
	nodes.Informer()
	reports := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(peer.DefaultNamespace))
	var evaluated atomic.Bool
	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, nil))
	tracker := &peerhealth.Tracker{
		Nodes:     nodes.Lister(),
		Reports:   reports.Coordination().V1().Leases().Lister().Leases(peer.DefaultNamespace),
		SiteLabel: peer.DefaultSiteLabel,
		Grace:     time.Second,
		Candidate: func(*corev1.Node) bool { evaluated.Store(true); return true },
		Log:       logger,
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)
	watchReportErrors(reports, peer.DefaultNamespace, logger)
	factory.Start(ctx.Done())
	reports.Start(ctx.Done())
	defer factory.Shutdown()
	defer reports.Shutdown()
	var synced atomic.Bool
	cachesSynced := syncCaches(ctx, g, factory, &synced, logger)
	g.Go(func() error { return runTracker(ctx, tracker, reports, cachesSynced, peer.DefaultNamespace, logger) })

	select {
	case <-cachesSynced:
	case <-time.After(10 * time.Second):
		t.Fatal("the caches of nodes and pods never synced while the reports are forbidden")
	}
	if !synced.Load() {
		t.Error("synced not set")
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), "forbidden: is deploy/rbac.yaml applied?"); {
		if time.Now().After(deadline) {
			t.Fatalf("the forbidden reports were not logged:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Let the reflector retry at least once more.
	for deadline := time.Now().Add(10 * time.Second); lists.Load() < 2 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	if n := strings.Count(logs.String(), "cannot read the peer reports"); n != 1 {
		t.Errorf("logged %d times, want once:\n%s", n, logs.String())
	}
	if evaluated.Load() || tracker.Withdrawn("a") {
		t.Error("verdicts evaluated before the reports synced")
	}
	if s, _ := tracker.Verdict("a"); s != peerhealth.Unknown {
		t.Errorf("verdict %s before the reports synced, want unknown", s)
	}
	cancel()
	if err := g.Wait(); err != nil {
		t.Error(err)
	}
}

type errFake string

func (e errFake) Error() string { return string(e) }
