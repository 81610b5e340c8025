package autonomy

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// namespaceGate holds the controller's work in its namespace (the leader
// Lease, the webhook CA Secret) until the namespace exists. Started outside
// the cluster before deploy/ was applied, outpost-controller creates it
// when its credentials allow, and otherwise says once, plainly, what is
// missing and how to fix it, and /readyz says so, instead of failing on
// the Lease and the Secret every few seconds.
type namespaceGate struct {
	client kubernetes.Interface
	name   string
	log    *slog.Logger
	// retry is the wait between checks while the namespace is missing.
	retry time.Duration

	open chan struct{} // closed once the namespace exists

	mu      sync.Mutex // guards problem
	problem error      // why the gate is still closed; nil once open
}

func newNamespaceGate(client kubernetes.Interface, name string, log *slog.Logger) *namespaceGate {
	return &namespaceGate{client: client, name: name, log: log, retry: 5 * time.Second, open: make(chan struct{}),
		problem: fmt.Errorf("namespace %s not checked yet", name)}
}

// Run checks until the namespace exists (creating it if it may), then
// opens the gate and returns; it returns nil when ctx ends first.
func (g *namespaceGate) Run(ctx context.Context) error {
	logged := ""
	for {
		err := g.check(ctx)
		if ctx.Err() != nil {
			return nil
		}
		g.mu.Lock()
		g.problem = err
		g.mu.Unlock()
		if err == nil {
			if logged != "" {
				g.log.Info("namespace present; starting leader election and webhook certificates", "namespace", g.name)
			}
			close(g.open)
			return nil
		}
		if msg := err.Error(); msg != logged {
			g.log.Error("waiting for the namespace outpost-controller works in", "err", err)
			logged = msg
		}
		t := time.NewTimer(g.retry)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// check reports why the namespace cannot be used yet, creating it when it
// is missing and the credentials allow.
func (g *namespaceGate) check(ctx context.Context) error {
	_, err := g.client.CoreV1().Namespaces().Get(ctx, g.name, metav1.GetOptions{})
	switch {
	case err == nil:
		return nil
	case apierrors.IsForbidden(err):
		// In the cluster (deploy/) the controller may not read namespaces,
		// and its own exists: it runs in it.
		return nil
	case !apierrors.IsNotFound(err):
		return fmt.Errorf("checking namespace %s: %w", g.name, err)
	}
	_, err = g.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: g.name}}, metav1.CreateOptions{})
	switch {
	case err == nil:
		g.log.Info("created the namespace outpost-controller works in", "namespace", g.name)
		return nil
	case apierrors.IsAlreadyExists(err):
		return nil
	case apierrors.IsForbidden(err):
		return fmt.Errorf("namespace %s does not exist and these credentials may not create it: "+
			"create it (kubectl create namespace %s, or kubectl apply -k deploy/) or give --namespace an existing one", g.name, g.name)
	}
	return fmt.Errorf("namespace %s does not exist and creating it failed: %w", g.name, err)
}

// Open is closed once the namespace exists.
func (g *namespaceGate) Open() <-chan struct{} { return g.open }

// Problem says why the gate is still closed, nil once it is open.
func (g *namespaceGate) Problem() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.problem
}
