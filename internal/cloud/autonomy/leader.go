package autonomy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/client-go/tools/record"
)

// lead campaigns for the Lease and runs work while holding it. It returns
// nil when ctx is done and ErrLeadershipLost when the Lease is lost first;
// either way work has returned.
func lead(ctx context.Context, cfg LeaderElection, client kubernetes.Interface, recorder record.EventRecorder,
	health *leaderelection.HealthzAdaptor, logger *slog.Logger, work func(context.Context) error) error {
	id, err := identity()
	if err != nil {
		return err
	}
	leading := make(chan context.Context, 1)
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock: &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Namespace: cfg.Namespace, Name: cfg.Name},
			Client:     client.CoordinationV1(),
			LockConfig: resourcelock.ResourceLockConfig{Identity: id, EventRecorder: recorder},
		},
		LeaseDuration: cfg.LeaseDuration,
		RenewDeadline: cfg.RenewDeadline,
		RetryPeriod:   cfg.RetryPeriod,
		// Release on shutdown, so that the next leader need not wait for
		// the Lease to expire.
		ReleaseOnCancel: true,
		WatchDog:        health,
		Name:            DefaultName,
		Callbacks: leaderelection.LeaderCallbacks{
			// Only a signal: the work runs below, where we can wait for it.
			OnStartedLeading: func(ctx context.Context) { leading <- ctx },
			OnStoppedLeading: func() {},
			OnNewLeader: func(who string) {
				logger.Info("leader", "identity", who, "self", who == id)
			},
		},
	})
	if err != nil {
		return fmt.Errorf("leader election: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		le.Run(ctx)
	}()
	var workErr error
	select {
	case <-done:
	case lctx := <-leading:
		logger.Info("acquired leader lease", "lease", cfg.Namespace+"/"+cfg.Name, "identity", id)
		workErr = work(lctx)
		<-done
	}
	if ctx.Err() != nil {
		return workErr
	}
	return errors.Join(ErrLeadershipLost, workErr)
}

// identity names this replica in the Lease: the host (the pod name in a
// cluster) and a random suffix, so that a restarted process does not take
// over the Lease of its previous life.
func identity() (string, error) {
	host, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("leader election identity: %w", err)
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return host + "_" + hex.EncodeToString(b), nil
}
