package autonomy

import (
	"strconv"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/outposthq/outpost/internal/cloud/autonomy/webhook"
)

// unreachable reports whether the node lifecycle controller has given up
// hearing from node: it tainted the node unreachable, or set its Ready
// condition to Unknown (which it does first; the taint follows at the
// eviction rate). A node whose kubelet reports NotReady is reachable: the
// kubelet is talking, and its word about its pods stands.
func unreachable(node *corev1.Node) bool {
	for _, t := range node.Spec.Taints {
		if t.Key == corev1.TaintNodeUnreachable {
			return true
		}
	}
	for _, c := range node.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionUnknown
		}
	}
	return false
}

// readyAtCut reports whether pod was ready when its node went silent, by
// the kubelet's last report. The node lifecycle controller flips only the
// pod's Ready condition to False (MarkPodsNotReady in
// pkg/controller/util/node), so ContainersReady and the readiness gates
// still carry what the kubelet said last. A pod in CrashLoopBackOff, or
// failing its readiness probe, had ContainersReady False before the cut and
// stays out of its Services.
func readyAtCut(pod *corev1.Pod) bool {
	if pod.DeletionTimestamp != nil || pod.Status.Phase != corev1.PodRunning {
		return false
	}
	if podCondition(pod, corev1.ContainersReady) != corev1.ConditionTrue {
		return false
	}
	for _, g := range pod.Spec.ReadinessGates {
		if podCondition(pod, g.ConditionType) != corev1.ConditionTrue {
			return false
		}
	}
	return true
}

// markedNotReadyByNodeController reports whether pod carries the mark of
// MarkPodsNotReady: Ready False although the kubelet's own conditions say
// ready. The kubelet never reports that combination itself.
func markedNotReadyByNodeController(pod *corev1.Pod) bool {
	return podCondition(pod, corev1.PodReady) == corev1.ConditionFalse && readyAtCut(pod)
}

func podCondition(pod *corev1.Pod, t corev1.PodConditionType) corev1.ConditionStatus {
	for _, c := range pod.Status.Conditions {
		if c.Type == t {
			return c.Status
		}
	}
	return corev1.ConditionUnknown
}

// endpointCandidate reports whether the endpoint could need to be made
// ready: a not-ready, non-terminating endpoint of a pod on a node.
func endpointCandidate(ep *discoveryv1.Endpoint) bool {
	c := ep.Conditions
	return (c.Ready == nil || !*c.Ready) &&
		(c.Terminating == nil || !*c.Terminating) &&
		ep.NodeName != nil && *ep.NodeName != "" &&
		ep.TargetRef != nil && ep.TargetRef.Kind == "Pod" && ep.TargetRef.Name != ""
}

// readyPatch returns the operations that mark endpoint i of a slice ready
// and serving. Serving is what EndpointSlice consumers that also route to
// terminating endpoints look at; the endpoint is not terminating, so both
// must say the same.
func readyPatch(i int, ep *discoveryv1.Endpoint) webhook.Op {
	c := ep.Conditions
	c.Ready, c.Serving = new(true), new(true)
	// "add" replaces conditions wholesale, and works whether or not the
	// object carried them.
	return webhook.Op{Op: "add", Path: "/endpoints/" + strconv.Itoa(i) + "/conditions", Value: c}
}
