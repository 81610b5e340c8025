package autonomy

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corelisters "k8s.io/client-go/listers/core/v1"

	"github.com/outposthq/outpost/internal/cloud/autonomy/webhook"
)

// liveNodeTimeout bounds the one apiserver read a review may make; the
// apiserver waits for us, within the webhook's timeoutSeconds.
const liveNodeTimeout = 2 * time.Second

// Admission holds the two webhooks. They answer from informer caches, and
// every replica serves them, leader or not.
type Admission struct {
	// Nodes and Pods are the listers of synced informers.
	Nodes corelisters.NodeLister
	Pods  corelisters.PodLister
	// GetNode reads a node from the apiserver, for the one question a
	// lagging cache must not answer wrongly (see MutateEndpointSlice).
	GetNode func(ctx context.Context, name string) (*corev1.Node, error)
	// Synced reports whether the informers have synced.
	Synced func() bool
	// Peers, if set, can withdraw a node's autonomy (Controller's too).
	Peers PeerVerdicts
	// KeptReady, if not nil, is called for each endpoint made ready.
	KeptReady func()
	// Logger receives decisions at debug level.
	Logger *slog.Logger
}

// MutatePod is the webhook on pod CREATE.
//
// Most pods are created unbound and bound later by the scheduler through
// the pods/binding subresource. A webhook cannot use that: admission of a
// Binding sees and may change only the Binding, not the pod. For those the
// Controller sets the tolerations right after binding, milliseconds to
// seconds later, while the eviction clock only starts once the node is
// tainted unreachable and the scheduler does not bind to such a node
// (it also carries an unreachable NoSchedule taint). This webhook closes
// the remaining gap: pods created already bound (spec.nodeName set by the
// creator, as some controllers, operators and tests do), which could
// otherwise be created onto an unreachable node with a 300 s clock running.
func (a *Admission) MutatePod(ctx context.Context, req *admissionv1.AdmissionRequest) ([]webhook.Op, error) {
	if req.Operation != admissionv1.Create || req.SubResource != "" {
		return nil, nil
	}
	var pod corev1.Pod
	if err := json.Unmarshal(req.Object.Raw, &pod); err != nil {
		return nil, fmt.Errorf("decoding pod: %w", err)
	}
	if pod.Spec.NodeName == "" {
		return nil, nil
	}
	if !a.Synced() {
		return nil, errCacheNotSynced
	}
	node, err := a.Nodes.Get(pod.Spec.NodeName)
	if err != nil {
		if apierrors.IsNotFound(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("reading node %s: %w", pod.Spec.NodeName, err)
	}
	p, _ := effectivePolicy(node, a.Peers) // invalid: not autonomous; the controller reports it
	return tolerationPatch(&pod, p)
}

// MutateEndpointSlice is the webhook on EndpointSlice CREATE and UPDATE. It
// marks ready each endpoint whose pod is on an autonomous node that is
// unreachable, and that was ready at the cut.
//
// The usual trigger is the endpointslice controller reacting to the node
// lifecycle controller setting the pods' Ready to False, right after it
// set the node's Ready to Unknown. Our node cache can lag that by a
// moment; were we to trust it then, the endpoint would stay not ready until
// the slice's next write, which may be never. So when the cache says
// reachable but the pod bears the node lifecycle controller's mark, the
// node is read from the apiserver, once per node and review.
func (a *Admission) MutateEndpointSlice(ctx context.Context, req *admissionv1.AdmissionRequest) ([]webhook.Op, error) {
	var slice discoveryv1.EndpointSlice
	if err := json.Unmarshal(req.Object.Raw, &slice); err != nil {
		return nil, fmt.Errorf("decoding EndpointSlice: %w", err)
	}
	candidates := 0
	for i := range slice.Endpoints {
		if endpointCandidate(&slice.Endpoints[i]) {
			candidates++
		}
	}
	if candidates == 0 {
		return nil, nil
	}
	if !a.Synced() {
		return nil, errCacheNotSynced
	}
	ns := req.Namespace
	if ns == "" {
		ns = slice.Namespace
	}

	nodes := make(map[string]bool) // node name → autonomous and unreachable, per review
	var ops []webhook.Op
	for i := range slice.Endpoints {
		ep := &slice.Endpoints[i]
		if !endpointCandidate(ep) {
			continue
		}
		pod, ok := a.endpointPod(ns, ep)
		if !ok || !readyAtCut(pod) {
			continue
		}
		down, seen := nodes[pod.Spec.NodeName]
		if !seen {
			down = a.autonomousAndUnreachable(ctx, pod)
			nodes[pod.Spec.NodeName] = down
		}
		if !down {
			continue
		}
		ops = append(ops, readyPatch(i, ep))
		if a.KeptReady != nil {
			a.KeptReady()
		}
		a.logger().Debug("keeping endpoint ready", "endpointslice", ns+"/"+slice.Name, "pod", pod.Namespace+"/"+pod.Name, "node", pod.Spec.NodeName)
	}
	return ops, nil
}

// endpointPod returns the pod an endpoint points at, if it is the same pod
// (by UID, when given) on the same node.
func (a *Admission) endpointPod(ns string, ep *discoveryv1.Endpoint) (*corev1.Pod, bool) {
	if ep.TargetRef.Namespace != "" {
		ns = ep.TargetRef.Namespace
	}
	pod, err := a.Pods.Pods(ns).Get(ep.TargetRef.Name)
	if err != nil {
		return nil, false
	}
	if ep.TargetRef.UID != "" && pod.UID != ep.TargetRef.UID {
		return nil, false
	}
	return pod, pod.Spec.NodeName == *ep.NodeName
}

// autonomousAndUnreachable reports whether pod's node is autonomous and
// unreachable; see MutateEndpointSlice for when it asks the apiserver.
func (a *Admission) autonomousAndUnreachable(ctx context.Context, pod *corev1.Pod) bool {
	node, err := a.Nodes.Get(pod.Spec.NodeName)
	if err != nil {
		return false
	}
	if p, _ := effectivePolicy(node, a.Peers); !p.Autonomous {
		return false
	}
	if unreachable(node) {
		return true
	}
	if !markedNotReadyByNodeController(pod) || a.GetNode == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, liveNodeTimeout)
	defer cancel()
	live, err := a.GetNode(ctx, pod.Spec.NodeName)
	if err != nil {
		a.logger().Warn("reading node to confirm it is unreachable", "node", pod.Spec.NodeName, "err", err)
		return false
	}
	p, _ := effectivePolicy(live, a.Peers)
	return p.Autonomous && unreachable(live)
}

func (a *Admission) logger() *slog.Logger {
	if a.Logger != nil {
		return a.Logger
	}
	return slog.Default()
}

// getNodeFunc adapts a clientset to Admission.GetNode.
func getNodeFunc(get func(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Node, error)) func(context.Context, string) (*corev1.Node, error) {
	return func(ctx context.Context, name string) (*corev1.Node, error) {
		return get(ctx, name, metav1.GetOptions{})
	}
}
