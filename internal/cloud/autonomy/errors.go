package autonomy

import "errors"

// ErrInvalidAnnotation is returned by NodePolicy for an autonomy annotation
// whose value cannot be parsed. Such a node is treated as not autonomous:
// guessing what a typo meant could keep pods pinned to a dead node forever.
var ErrInvalidAnnotation = errors.New("invalid autonomy annotation")

// ErrLeadershipLost is returned by Run when this replica loses the leader
// Lease while it still wants to run. Exiting is the safe reaction: the
// Deployment restarts the process, which then campaigns again, and no two
// replicas reconcile at once.
var ErrLeadershipLost = errors.New("leader election lost")

// errBadRecord is returned when a pod's original-tolerations annotation
// cannot be decoded, so the originals cannot be restored.
var errBadRecord = errors.New("unreadable " + AnnotationOriginalTolerations + " annotation")

// errCacheNotSynced is returned by the webhooks before the informers have
// synced: answering from a partial cache could leave an endpoint out.
var errCacheNotSynced = errors.New("informer caches not synced yet")
