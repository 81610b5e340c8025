package autonomy

import (
	"encoding/json"
	"fmt"
	"strconv"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/outposthq/outpost/internal/cloud/autonomy/webhook"
)

// taintKeys are the NoExecute taints the node lifecycle controller puts on
// a node it stops hearing from: unreachable when the node's Ready condition
// turns Unknown, not-ready when the kubelet reports it False.
var taintKeys = [...]string{corev1.TaintNodeUnreachable, corev1.TaintNodeNotReady}

// skipReason says why the controller leaves pod's tolerations alone, or ""
// if it manages them.
func skipReason(pod *corev1.Pod) string {
	switch {
	case pod.Spec.NodeName == "":
		return "not bound to a node"
	case pod.Annotations[corev1.MirrorPodAnnotationKey] != "":
		// Static pods are run by the kubelet from files; the mirror is
		// only a report and no eviction reaches the real pod.
		return "mirror pod"
	case ownedByDaemonSet(pod):
		// The DaemonSet controller gives its pods tolerations without
		// tolerationSeconds already, and owns them.
		return "DaemonSet pod"
	case pod.DeletionTimestamp != nil:
		return "terminating"
	case pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed:
		return "finished"
	}
	return ""
}

func ownedByDaemonSet(pod *corev1.Pod) bool {
	ref := metav1.GetControllerOf(pod)
	if ref == nil || ref.Kind != "DaemonSet" {
		return false
	}
	gv, err := schema.ParseGroupVersion(ref.APIVersion)
	return err == nil && gv.Group == "apps"
}

// owned reports whether t is a toleration the controller adjusts: a
// NoExecute toleration naming one of taintKeys. Wildcard tolerations (empty
// key) are never changed, since their tolerationSeconds applies to every
// taint; nor are those with an empty effect, which cannot carry
// tolerationSeconds and already tolerate forever.
func owned(t corev1.Toleration) bool {
	return t.Effect == corev1.TaintEffectNoExecute && (t.Key == taintKeys[0] || t.Key == taintKeys[1])
}

// tolerated reports whether some toleration tolerates the NoExecute taint
// key, by the same test the taint eviction controller applies.
func tolerated(tolerations []corev1.Toleration, key string) bool {
	taint := corev1.Taint{Key: key, Effect: corev1.TaintEffectNoExecute}
	for i := range tolerations {
		if tolerations[i].ToleratesTaint(logr.Discard(), &taint, false) {
			return true
		}
	}
	return false
}

// tolerationPatch returns the JSON patch that brings the NoExecute
// tolerations of pod in line with policy p, or nil when the pod is as it
// should be.
//
// On an autonomous node each owned toleration gets the longer of its
// original tolerationSeconds and the declared duration (nil being forever):
// autonomy only ever lengthens what the pod asked for. A taint no
// toleration covers gets one. The originals are recorded in
// AnnotationOriginalTolerations on the first change.
//
// On any other node, a pod with that annotation gets its originals back
// and loses the annotation. A toleration we added cannot be removed — the
// apiserver allows an update to change tolerationSeconds but not to drop a
// toleration — so it gets tolerationSeconds 0, which the taint eviction
// controller treats exactly like no toleration: evict at once.
//
// The patch addresses tolerations by index, so it must be applied to the
// pod as read: the controller guards it with the resourceVersion, and an
// admission review patches exactly the object it carries.
func tolerationPatch(pod *corev1.Pod, p Policy) ([]webhook.Op, error) {
	if skipReason(pod) != "" {
		return nil, nil
	}
	recorded, hasRecord, err := originalTolerations(pod)
	if err != nil {
		return nil, err
	}
	if !p.Autonomous && !hasRecord {
		return nil, nil
	}
	originals := recorded
	if !hasRecord {
		originals = ownedTolerations(pod.Spec.Tolerations)
	}

	var ops []webhook.Op
	base := originalSeconds(pod.Spec.Tolerations, originals)
	for i, t := range pod.Spec.Tolerations {
		if !owned(t) {
			continue
		}
		want := base[i]
		if p.Autonomous {
			want = longer(want, p.tolerationSeconds())
		}
		ops = append(ops, setSeconds(i, t.TolerationSeconds, want)...)
	}

	if !p.Autonomous {
		return append(ops, webhook.Op{Op: "remove", Path: "/metadata/annotations/" + webhook.Escape(AnnotationOriginalTolerations)}), nil
	}
	var added []corev1.Toleration
	for _, key := range taintKeys {
		if !tolerated(pod.Spec.Tolerations, key) {
			added = append(added, corev1.Toleration{
				Key:               key,
				Operator:          corev1.TolerationOpExists,
				Effect:            corev1.TaintEffectNoExecute,
				TolerationSeconds: p.tolerationSeconds(),
			})
		}
	}
	switch {
	case len(added) == 0:
	case len(pod.Spec.Tolerations) == 0:
		ops = append(ops, webhook.Op{Op: "add", Path: "/spec/tolerations", Value: added})
	default:
		for _, t := range added {
			ops = append(ops, webhook.Op{Op: "add", Path: "/spec/tolerations/-", Value: t})
		}
	}
	if len(ops) > 0 && !hasRecord {
		record, err := json.Marshal(originals)
		if err != nil {
			return nil, fmt.Errorf("encoding original tolerations: %w", err)
		}
		ops = append(ops, setAnnotation(pod, AnnotationOriginalTolerations, string(record)))
	}
	return ops, nil
}

// originalTolerations decodes the record of AnnotationOriginalTolerations.
func originalTolerations(pod *corev1.Pod) (tolerations []corev1.Toleration, ok bool, err error) {
	v, ok := pod.Annotations[AnnotationOriginalTolerations]
	if !ok {
		return nil, false, nil
	}
	if err := json.Unmarshal([]byte(v), &tolerations); err != nil {
		return nil, true, fmt.Errorf("%w: %v", errBadRecord, err)
	}
	return tolerations, true, nil
}

// ownedTolerations returns the owned tolerations of a list, never nil, so
// that an empty record reads "[]".
func ownedTolerations(tolerations []corev1.Toleration) []corev1.Toleration {
	out := []corev1.Toleration{}
	for _, t := range tolerations {
		if owned(t) {
			out = append(out, t)
		}
	}
	return out
}

// originalSeconds maps the index of each owned toleration to its original
// tolerationSeconds: that of the first unused original with the same key,
// operator, value and effect. An owned toleration with no original was
// added by us; its original is 0, "evict at once", which is what having no
// toleration means.
func originalSeconds(tolerations, originals []corev1.Toleration) map[int]*int64 {
	used := make([]bool, len(originals))
	out := make(map[int]*int64)
	for i := range tolerations {
		if !owned(tolerations[i]) {
			continue
		}
		out[i] = new(int64(0))
		for j := range originals {
			if !used[j] && originals[j].MatchToleration(&tolerations[i]) {
				used[j] = true
				out[i] = originals[j].TolerationSeconds
				break
			}
		}
	}
	return out
}

// longer returns the longer of two tolerationSeconds, nil being forever.
func longer(a, b *int64) *int64 {
	if a == nil || b == nil {
		return nil
	}
	if *a >= *b {
		return a
	}
	return b
}

// setSeconds returns the operations that turn the tolerationSeconds of
// toleration i from have into want.
func setSeconds(i int, have, want *int64) []webhook.Op {
	path := "/spec/tolerations/" + strconv.Itoa(i) + "/tolerationSeconds"
	switch {
	case have == nil && want == nil, have != nil && want != nil && *have == *want:
		return nil
	case want == nil:
		return []webhook.Op{{Op: "remove", Path: path}}
	default: // "add" replaces a member that exists
		return []webhook.Op{{Op: "add", Path: path, Value: *want}}
	}
}

// setAnnotation returns the operation that sets an annotation of pod.
func setAnnotation(pod *corev1.Pod, key, value string) webhook.Op {
	if pod.Annotations == nil {
		return webhook.Op{Op: "add", Path: "/metadata/annotations", Value: map[string]string{key: value}}
	}
	return webhook.Op{Op: "add", Path: "/metadata/annotations/" + webhook.Escape(key), Value: value}
}
