package autonomy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"github.com/outposthq/outpost/internal/cloud/autonomy/webhook"
)

// fieldManager names our writes in managedFields and audit logs.
const fieldManager = "outpost-controller"

// podsByNode is the pod informer index from node name to pods.
const podsByNode = "outpost.io/node-name"

// Event reasons.
const (
	reasonInvalidAutonomy      = "InvalidAutonomy"
	reasonAutonomyTolerations  = "AutonomyTolerations"
	reasonRestoredTolerations  = "RestoredTolerations"
	reasonBadRecord            = "BadOriginalTolerations"
	reasonWithdrawnTolerations = "AutonomyWithdrawnTolerations"
)

// PeerVerdicts says whether the peers of a node at its site have had its
// autonomy withdrawn (package peerhealth): a quorum of them reported it
// unreachable for longer than the grace period.
type PeerVerdicts interface {
	Withdrawn(node string) bool
}

// Controller keeps the NoExecute tolerations of pods on autonomous nodes at
// the declared duration, and restores the originals when autonomy ends.
//
// It is level-triggered, after kubernetes/sample-controller: events only say
// which pod to look at; each sync reads the pod and its node from the
// listers and computes the patch from that state alone, so a missed or
// repeated event costs nothing.
type Controller struct {
	client   kubernetes.Interface
	nodes    corelisters.NodeLister
	pods     corelisters.PodLister
	nodeInf  cache.SharedIndexInformer
	podInf   cache.SharedIndexInformer
	queue    workqueue.TypedRateLimitingInterface[string]
	recorder record.EventRecorder
	logger   *slog.Logger
	metrics  *metrics
	// peers, if set, can withdraw a node's autonomy.
	peers PeerVerdicts
}

// NewController returns a controller over the given informers, which must
// not have started yet: it adds a node-name index to the pod informer. It
// starts nothing.
func NewController(client kubernetes.Interface, nodes coreinformers.NodeInformer, pods coreinformers.PodInformer, recorder record.EventRecorder, logger *slog.Logger) (*Controller, error) {
	err := pods.Informer().AddIndexers(cache.Indexers{podsByNode: func(obj any) ([]string, error) {
		if pod, ok := obj.(*corev1.Pod); ok && pod.Spec.NodeName != "" {
			return []string{pod.Spec.NodeName}, nil
		}
		return nil, nil
	}})
	if err != nil {
		return nil, fmt.Errorf("indexing pods by node: %w", err)
	}
	return &Controller{
		client:   client,
		nodes:    nodes.Lister(),
		pods:     pods.Lister(),
		nodeInf:  nodes.Informer(),
		podInf:   pods.Informer(),
		queue:    workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](), workqueue.TypedRateLimitingQueueConfig[string]{Name: "autonomy"}),
		recorder: recorder,
		logger:   logger,
	}, nil
}

// Run registers the event handlers, waits for them to see the informers'
// initial lists, and syncs pods with the given number of workers until ctx
// is done. It can be called once.
func (c *Controller) Run(ctx context.Context, workers int) error {
	defer c.queue.ShutDown()
	nodeReg, err := c.nodeInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.nodeChanged(nil, obj.(*corev1.Node)) },
		UpdateFunc: func(old, obj any) { c.nodeChanged(old.(*corev1.Node), obj.(*corev1.Node)) },
		DeleteFunc: func(obj any) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if node, ok := obj.(*corev1.Node); ok {
				c.enqueueNodePods(node.Name)
			}
		},
	})
	if err != nil {
		return fmt.Errorf("watching nodes: %w", err)
	}
	defer func() { _ = c.nodeInf.RemoveEventHandler(nodeReg) }()
	podReg, err := c.podInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.podChanged(obj.(*corev1.Pod)) },
		UpdateFunc: func(_, obj any) { c.podChanged(obj.(*corev1.Pod)) },
	})
	if err != nil {
		return fmt.Errorf("watching pods: %w", err)
	}
	defer func() { _ = c.podInf.RemoveEventHandler(podReg) }()
	if !cache.WaitForCacheSync(ctx.Done(), nodeReg.HasSynced, podReg.HasSynced) {
		return nil // ctx done
	}

	c.logger.Info("toleration controller started", "workers", workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for c.processNext(ctx) {
			}
		})
	}
	<-ctx.Done()
	c.queue.ShutDown()
	wg.Wait()
	c.logger.Info("toleration controller stopped")
	return nil
}

// nodeChanged enqueues the node's pods when its policy changed, and reports
// an invalid annotation once per value.
func (c *Controller) nodeChanged(old, node *corev1.Node) {
	p, err := NodePolicy(node)
	if err != nil && (old == nil || autonomyAnnotations(old) != autonomyAnnotations(node)) {
		c.logger.Warn("node treated as not autonomous", "node", node.Name, "err", err)
		c.recorder.Event(node, corev1.EventTypeWarning, reasonInvalidAutonomy, "Treated as not autonomous: "+err.Error())
	}
	if old == nil {
		if p.Autonomous { // pods of other nodes are enqueued by their own add, if they carry a record
			c.enqueueNodePods(node.Name)
		}
		return
	}
	if oldP, _ := NodePolicy(old); oldP != p {
		c.logger.Info("node autonomy changed", "node", node.Name, "from", oldP.String(), "to", p.String())
		c.enqueueNodePods(node.Name)
	}
}

// autonomyAnnotations is the part of a node that NodePolicy reads.
func autonomyAnnotations(node *corev1.Node) [3]string {
	a := node.Annotations
	return [3]string{a[AnnotationAutonomyDuration], a[AnnotationOpenYurtAutonomyDuration], a[AnnotationOpenYurtAutonomy]}
}

// podChanged enqueues a bound pod that is on an autonomous node or carries
// our record. Pods of other nodes are the vast majority and need nothing; a
// node turning autonomous enqueues its pods itself.
func (c *Controller) podChanged(pod *corev1.Pod) {
	if pod.Spec.NodeName == "" {
		return
	}
	_, recorded := pod.Annotations[AnnotationOriginalTolerations]
	if p, _ := c.policyOf(pod.Spec.NodeName); !recorded && !p.Autonomous {
		return
	}
	if key, err := cache.MetaNamespaceKeyFunc(pod); err == nil {
		c.queue.Add(key)
	}
}

func (c *Controller) enqueueNodePods(node string) {
	objs, err := c.podInf.GetIndexer().ByIndex(podsByNode, node)
	if err != nil {
		c.logger.Error("listing pods of node", "node", node, "err", err)
		return
	}
	for _, obj := range objs {
		if key, err := cache.MetaNamespaceKeyFunc(obj); err == nil {
			c.queue.Add(key)
		}
	}
}

// policyOf returns the policy of a node by name; a missing node or an
// invalid annotation means not autonomous, and so does autonomy its peers
// withdrew (withdrawn is then true).
func (c *Controller) policyOf(name string) (p Policy, withdrawn bool) {
	node, err := c.nodes.Get(name)
	if err != nil {
		return Policy{}, false
	}
	return effectivePolicy(node, c.peers)
}

// effectivePolicy is the policy of node's annotations, unless its peers
// withdrew its autonomy.
func effectivePolicy(node *corev1.Node, peers PeerVerdicts) (p Policy, withdrawn bool) {
	p, _ = NodePolicy(node)
	if p.Autonomous && peers != nil && peers.Withdrawn(node.Name) {
		return Policy{}, true
	}
	return p, false
}

func (c *Controller) processNext(ctx context.Context) bool {
	key, quit := c.queue.Get()
	if quit {
		return false
	}
	defer c.queue.Done(key)
	if err := c.sync(ctx, key); err != nil {
		if ctx.Err() != nil {
			return false
		}
		c.logger.Warn("syncing pod tolerations; will retry", "pod", key, "retries", c.queue.NumRequeues(key), "err", err)
		c.queue.AddRateLimited(key)
		return true
	}
	c.queue.Forget(key)
	return true
}

// sync brings the tolerations of one pod in line with its node's policy.
func (c *Controller) sync(ctx context.Context, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil // not a key we made; retrying will not help
	}
	pod, err := c.pods.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	p, withdrawn := c.policyOf(pod.Spec.NodeName)
	ops, err := tolerationPatch(pod, p)
	if errors.Is(err, errBadRecord) {
		// Someone edited our record. Guessing the originals could leave
		// the pod pinned forever, so say so and wait for a fix.
		c.logger.Warn("cannot manage pod tolerations", "pod", key, "err", err)
		c.recorder.Event(pod, corev1.EventTypeWarning, reasonBadRecord, err.Error()+"; remove it to let outpost-controller manage the tolerations again")
		return nil
	}
	if err != nil || len(ops) == 0 {
		return err
	}

	action := actionAutonomy
	if !p.Autonomous {
		action = actionRestore
	}
	// Guarded by the resourceVersion: the patch addresses tolerations by
	// index, and was computed from this version of the pod.
	ops = append([]webhook.Op{{Op: "test", Path: "/metadata/resourceVersion", Value: pod.ResourceVersion}}, ops...)
	patch, err := json.Marshal(ops)
	if err != nil {
		return fmt.Errorf("encoding patch: %w", err)
	}
	_, err = c.client.CoreV1().Pods(ns).Patch(ctx, name, types.JSONPatchType, patch, metav1.PatchOptions{FieldManager: fieldManager})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if c.metrics != nil {
		result := "ok"
		if err != nil {
			result = "error"
		}
		c.metrics.podPatches.WithLabelValues(action, result).Inc()
	}
	if err != nil {
		return fmt.Errorf("patching tolerations: %w", err)
	}
	switch {
	case withdrawn:
		c.logger.Info("restored original tolerations: the node's peers report it down", "pod", key, "node", pod.Spec.NodeName)
		c.recorder.Eventf(pod, corev1.EventTypeWarning, reasonWithdrawnTolerations, "Peers at the site of node %s report it down: original tolerations restored, so the pod is evicted as on any node", pod.Spec.NodeName)
	case action == actionRestore:
		c.logger.Info("restored original tolerations", "pod", key, "node", pod.Spec.NodeName)
		c.recorder.Eventf(pod, corev1.EventTypeNormal, reasonRestoredTolerations, "Node %s is no longer autonomous: original tolerations restored", pod.Spec.NodeName)
	default:
		c.logger.Info("set autonomy tolerations", "pod", key, "node", pod.Spec.NodeName, "policy", p.String())
		c.recorder.Eventf(pod, corev1.EventTypeNormal, reasonAutonomyTolerations, "Node %s is %s: pod tolerates it being unreachable or not ready accordingly", pod.Spec.NodeName, p)
	}
	return nil
}

// queueLen is for the queue depth metric.
func (c *Controller) queueLen() int { return c.queue.Len() }
