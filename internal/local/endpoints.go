package local

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/store"
)

// endpointSlices is the resource the Writer keeps following this node's
// pods offline.
const endpointSlices = "discovery.k8s.io/v1/endpointslices"

// followEndpoints keeps the cached EndpointSlices true to this node's pods
// while the cloud is unreachable. A pod rebooted offline comes back in a
// new sandbox with a new address, which only its kubelet knows (it writes
// the pod's status, kept as an overlay); the endpoints the cloud computed
// still name the old address, which nothing answers any more, so kube-proxy
// and coredns would send this node's Service traffic nowhere. For every
// cached EndpointSlice naming pod as an endpoint on this node, it writes
// an overlay with the pod's current address and readiness, as the cloud's
// EndpointSlice controller will once it hears of them. Readers see it like
// any overlay (lists, gets, and MODIFIED events on offline watches); it is
// never sent upstream, and goes with the other overlays when the cloud
// returns.
//
// It scans the EndpointSlices cached in pod's namespace, which on one node
// are few.
func (l *Writer) followEndpoints(podJSON []byte) {
	var pod corev1.Pod
	if err := json.Unmarshal(podJSON, &pod); err != nil || pod.Spec.NodeName != l.Node || l.Node == "" {
		return
	}
	l.followMu.Lock()
	defer l.followMu.Unlock()
	for _, base := range l.slicesNaming(&pod) {
		var s discoveryv1.EndpointSlice
		if err := json.Unmarshal(base.Data, &s); err != nil {
			continue
		}
		if !followPod(&s, &pod, l.Node) {
			continue
		}
		data, err := json.Marshal(&s)
		if err != nil {
			continue
		}
		if err := l.putOverlay(&overlay{resource: endpointSlices, namespace: s.Namespace, name: s.Name,
			kind: "EndpointSlice", apiVersion: "discovery.k8s.io/v1", data: data}); err != nil {
			l.Log.Warn("cannot keep a Service's endpoints true to this node's pod offline", "endpointslice", s.Namespace+"/"+s.Name, "pod", pod.Name, "err", err)
			continue
		}
		l.Log.Info("offline, a Service's endpoint follows this node's pod", "endpointslice", s.Namespace+"/"+s.Name, "pod", pod.Name, "addresses", podIPs(&pod))
	}
}

// slicesNaming returns the EndpointSlices in pod's namespace that may name
// it, as readers see them now (an earlier overlay over the cached object).
func (l *Writer) slicesNaming(pod *corev1.Pod) []store.Object {
	views, err := l.Store.AllViews()
	if err != nil {
		return nil
	}
	seen := map[string]bool{}
	var out []store.Object
	for _, v := range views {
		if v.Key.Resource != endpointSlices || (v.Key.Namespace != "" && v.Key.Namespace != pod.Namespace) {
			continue
		}
		_ = l.Store.List(v.Key, "", 0, func(o store.Object) error {
			if o.Namespace != pod.Namespace || seen[o.Name] {
				return nil
			}
			seen[o.Name] = true
			if ov := l.overlays.get(endpointSlices, o.Namespace, o.Name); ov != nil {
				o.Data = ov.data
			}
			if bytes.Contains(o.Data, []byte(pod.Name)) {
				out = append(out, o)
			}
			return nil
		})
	}
	return out
}

// followPod points the endpoints of s that are pod, on node, at its current
// address and readiness, and reports whether anything changed.
func followPod(s *discoveryv1.EndpointSlice, pod *corev1.Pod, node string) bool {
	want := ""
	for _, ip := range podIPs(pod) {
		if (s.AddressType == discoveryv1.AddressTypeIPv6) == strings.Contains(ip, ":") {
			want = ip
			break
		}
	}
	ready := podReady(pod) && pod.DeletionTimestamp == nil
	serving := podReady(pod)
	terminating := pod.DeletionTimestamp != nil
	changed := false
	for i := range s.Endpoints {
		e := &s.Endpoints[i]
		ref := e.TargetRef
		if ref == nil || ref.Kind != "Pod" || ref.Name != pod.Name || (ref.Namespace != "" && ref.Namespace != pod.Namespace) ||
			(ref.UID != "" && pod.UID != "" && ref.UID != pod.UID) || e.NodeName == nil || *e.NodeName != node {
			continue
		}
		if want == "" {
			// No address yet (its sandbox is being made): the old one
			// is dead, so the endpoint is not ready.
			ready, serving = false, false
		} else if len(e.Addresses) != 1 || e.Addresses[0] != want {
			e.Addresses = []string{want}
			changed = true
		}
		c := &e.Conditions
		if deref(c.Ready) != ready || deref(c.Serving) != serving || deref(c.Terminating) != terminating {
			c.Ready, c.Serving, c.Terminating = &ready, &serving, &terminating
			changed = true
		}
	}
	return changed
}

func podIPs(pod *corev1.Pod) []string {
	var ips []string
	for _, ip := range pod.Status.PodIPs {
		ips = append(ips, ip.IP)
	}
	if len(ips) == 0 && pod.Status.PodIP != "" {
		ips = append(ips, pod.Status.PodIP)
	}
	return ips
}

func podReady(pod *corev1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func deref(b *bool) bool { return b != nil && *b }

// putOverlay saves ov (so that it survives a restart of outpost) and makes
// it what readers see.
func (l *Writer) putOverlay(ov *overlay) error {
	rec, err := json.Marshal(overlayRecord{Resource: ov.resource, Namespace: ov.namespace, Name: ov.name, Kind: ov.kind, APIVersion: ov.apiVersion, Data: ov.data})
	if err != nil {
		return err
	}
	if err := l.Store.PutDoc(overlayPrefix+overlayKey(ov.resource, ov.namespace, ov.name), codec.MediaJSON, rec); err != nil {
		return fmt.Errorf("saving local write: %w", err)
	}
	l.overlays.put(ov)
	return nil
}
