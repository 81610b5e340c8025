package autonomy

import (
	"fmt"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// Node annotations that declare autonomy, in order of precedence.
const (
	// AnnotationAutonomyDuration is Outpost's own: a Go duration ("72h",
	// "90m") for which the node's pods tolerate the node being unreachable
	// or not ready; "0" means forever.
	AnnotationAutonomyDuration = "outpost.io/autonomy-duration"
	// AnnotationOpenYurtAutonomyDuration is OpenYurt's, with the same
	// meaning, honoured for clusters moving from OpenYurt.
	AnnotationOpenYurtAutonomyDuration = "node.openyurt.io/autonomy-duration"
	// AnnotationOpenYurtAutonomy is OpenYurt's legacy switch: "true" means
	// forever, "false" not autonomous.
	AnnotationOpenYurtAutonomy = "node.beta.openyurt.io/autonomy"
)

// AnnotationOriginalTolerations on a pod records, as a JSON list, the
// NoExecute tolerations of node.kubernetes.io/unreachable and
// node.kubernetes.io/not-ready the pod had before the controller changed
// them. Its presence means "changed by us"; it is removed on restore.
const AnnotationOriginalTolerations = "outpost.io/original-tolerations"

// Policy is what a Node's annotations say about the autonomy of its pods.
// The zero Policy is "not autonomous".
type Policy struct {
	// Autonomous reports whether the node's pods must outlive its silence.
	Autonomous bool
	// Duration is how long the pods tolerate the node being unreachable or
	// not ready; zero means forever.
	Duration time.Duration
	// Annotation is the annotation the policy was read from; empty when the
	// node is not autonomous.
	Annotation string
}

// NodePolicy reads the autonomy policy from a node's annotations.
//
// Precedence: outpost.io/autonomy-duration, then
// node.openyurt.io/autonomy-duration, then node.beta.openyurt.io/autonomy.
// The first of them present decides, even when its value is invalid: a
// typo in the annotation the user wrote last must be reported, not papered
// over by an older one. An invalid value yields the zero Policy (not
// autonomous) and an error wrapping ErrInvalidAnnotation that says why.
func NodePolicy(node *corev1.Node) (Policy, error) {
	return parsePolicy(node.Annotations)
}

func parsePolicy(annotations map[string]string) (Policy, error) {
	for _, key := range []string{AnnotationAutonomyDuration, AnnotationOpenYurtAutonomyDuration} {
		v, ok := annotations[key]
		if !ok {
			continue
		}
		d, err := time.ParseDuration(v)
		if err == nil && d < 0 {
			err = fmt.Errorf("negative duration")
		}
		if err != nil {
			return Policy{}, fmt.Errorf("%w: %s=%q: want a duration such as 72h, or 0 to never evict: %v", ErrInvalidAnnotation, key, v, err)
		}
		return Policy{Autonomous: true, Duration: d, Annotation: key}, nil
	}
	if v, ok := annotations[AnnotationOpenYurtAutonomy]; ok {
		on, err := strconv.ParseBool(v)
		if err != nil {
			return Policy{}, fmt.Errorf("%w: %s=%q: want true or false", ErrInvalidAnnotation, AnnotationOpenYurtAutonomy, v)
		}
		if on {
			return Policy{Autonomous: true, Annotation: AnnotationOpenYurtAutonomy}, nil
		}
	}
	return Policy{}, nil
}

// tolerationSeconds is the tolerationSeconds that expresses p.Duration:
// nil for forever, otherwise whole seconds rounded up, so a pod never
// tolerates less than declared.
func (p Policy) tolerationSeconds() *int64 {
	if p.Duration <= 0 {
		return nil
	}
	s := int64((p.Duration + time.Second - 1) / time.Second)
	return &s
}

// String describes the policy for logs and events.
func (p Policy) String() string {
	switch {
	case !p.Autonomous:
		return "not autonomous"
	case p.Duration == 0:
		return "autonomous forever (" + p.Annotation + ")"
	default:
		return "autonomous for " + p.Duration.String() + " (" + p.Annotation + ")"
	}
}
