package framework

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// RunningPod is what the status of a pod of one container says of it.
type RunningPod struct {
	UID         string
	ContainerID string
	Restarts    int32
	IP          string
}

// ReadyPod reads the status of a pod of one container, and reports whether
// the pod is Ready with its container running and ready. What it returns is
// filled in as far as the status goes even when the pod is not ready.
func ReadyPod(pod *corev1.Pod) (RunningPod, bool) {
	p := RunningPod{UID: string(pod.UID), IP: pod.Status.PodIP}
	if len(pod.Status.ContainerStatuses) != 1 {
		return p, false
	}
	cs := pod.Status.ContainerStatuses[0]
	p.ContainerID, p.Restarts = cs.ContainerID, cs.RestartCount
	return p, PodReady(pod) && cs.Ready && cs.State.Running != nil
}

// PodReady reports whether the pod's Ready condition is True.
func PodReady(pod *corev1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// DescribePod summarises a pod that is not ready yet, for a failure
// message: its phase, the conditions that do not hold and its containers'
// states.
func DescribePod(pod *corev1.Pod) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: phase %s", pod.Name, pod.Status.Phase)
	for _, c := range pod.Status.Conditions {
		if c.Status != corev1.ConditionTrue {
			fmt.Fprintf(&b, ", %s=%s %s", c.Type, c.Status, c.Message)
		}
	}
	for _, cs := range pod.Status.ContainerStatuses {
		switch {
		case cs.State.Waiting != nil:
			fmt.Fprintf(&b, ", waiting %s: %s", cs.State.Waiting.Reason, cs.State.Waiting.Message)
		case cs.State.Terminated != nil:
			fmt.Fprintf(&b, ", terminated %s (%d)", cs.State.Terminated.Reason, cs.State.Terminated.ExitCode)
		default:
			fmt.Fprintf(&b, ", running %s ready=%v", cs.ContainerID, cs.Ready)
		}
	}
	return b.String()
}

// WaitPodsReady waits up to 2 minutes until each of the pods names in ns
// is Ready in the apiserver (see ReadyPod) with a container other than the
// one before holds for it, if any, and returns what it saw. The error names
// the pods still waiting and ends with the node's kubelet log.
func (n *Node) WaitPodsReady(ctx context.Context, ns string, names []string, before map[string]RunningPod) (map[string]RunningPod, error) {
	got := map[string]RunningPod{}
	_, err := Poll(ctx, 200*time.Millisecond, 2*time.Minute, func(ctx context.Context) (bool, string) {
		var waiting []string
		for _, name := range names {
			pod, err := n.cp.client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				waiting = append(waiting, fmt.Sprintf("%s: %v", name, err))
				continue
			}
			if p, ok := ReadyPod(pod); ok && p.ContainerID != before[name].ContainerID {
				got[name] = p
				continue
			}
			waiting = append(waiting, DescribePod(pod))
		}
		return len(waiting) == 0, strings.Join(waiting, "\n  ")
	})
	if err != nil {
		what := "Ready"
		if before != nil {
			what += " with new containers"
		}
		return nil, fmt.Errorf("pods of node %s not %s: %w\nlast lines of kubelet.log:\n%s", n.Name, what, err, n.KubeletLog(60))
	}
	return got, nil
}
