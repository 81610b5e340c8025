package local

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
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
// cached EndpointSlice naming the pod as an endpoint on this node, it
// writes an overlay with the pod's current address and readiness, as the
// cloud's EndpointSlice controller will once it hears of them. Readers see
// it like any overlay (lists, gets, and MODIFIED events on offline
// watches); it is never sent upstream, and goes with the other overlays
// when the cloud returns.
//
// It runs only when a status write moved the pod (podMoved): a new
// address or readiness, a few times per pod and reboot, not at every
// status kubelet sends. It then reads the pod as it is now (the last write
// wins, whatever order writes arrive in) and scans the cached
// EndpointSlices of the pod's namespace.
func (l *Writer) followEndpoints(ns, name string, gen uint64) {
	if l.Node == "" {
		return
	}
	l.followMu.Lock()
	defer l.followMu.Unlock()
	ov := l.overlays.get("/v1/pods", ns, name)
	if ov == nil {
		return
	}
	var pod corev1.Pod
	if err := json.Unmarshal(ov.data, &pod); err != nil || pod.Spec.NodeName != l.Node {
		return
	}
	for _, base := range l.slicesNaming(&pod) {
		var s discoveryv1.EndpointSlice
		if err := json.Unmarshal(base.Data, &s); err != nil {
			continue
		}
		if !followPod(&s, &pod, l.Node, l.publishesNotReady(s.Namespace, s.Labels[discoveryv1.LabelServiceName])) {
			continue
		}
		data, err := json.Marshal(&s)
		if err != nil {
			continue
		}
		err = l.putOverlay(&overlay{resource: endpointSlices, namespace: s.Namespace, name: s.Name,
			kind: "EndpointSlice", apiVersion: "discovery.k8s.io/v1", data: data}, gen)
		if errors.Is(err, errDropped) {
			return
		}
		if err != nil {
			l.Log.Warn("cannot keep a Service's endpoints true to this node's pod offline", "endpointslice", s.Namespace+"/"+s.Name, "pod", pod.Name, "err", err)
			continue
		}
		l.Log.Info("offline, a Service's endpoint follows this node's pod", "endpointslice", s.Namespace+"/"+s.Name, "pod", pod.Name, "addresses", podIPs(&pod))
	}
}

// podMoved reports whether a status write took a pod of this node to
// another address or readiness (before and after are its JSON).
func podMoved(before, after []byte) bool {
	var a, b corev1.Pod
	if json.Unmarshal(before, &a) != nil || json.Unmarshal(after, &b) != nil {
		return true
	}
	return !slices.Equal(podIPs(&a), podIPs(&b)) || podReady(&a) != podReady(&b) || (a.DeletionTimestamp == nil) != (b.DeletionTimestamp == nil)
}

// publishesNotReady reports whether the cached Service svc in ns publishes
// its endpoints ready whatever their pods say (a StatefulSet's headless
// Service): then the cloud writes them ready, and so does outpost.
func (l *Writer) publishesNotReady(ns, svc string) bool {
	if svc == "" {
		return false
	}
	o, ok, err := l.Store.Get("/v1/services", ns, svc)
	if err != nil || !ok {
		return false
	}
	var s corev1.Service
	return json.Unmarshal(o.Data, &s) == nil && s.Spec.PublishNotReadyAddresses
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
// address and readiness (ready whatever the pod says when alwaysReady, the
// Service publishing not-ready addresses), and reports whether anything
// changed.
func followPod(s *discoveryv1.EndpointSlice, pod *corev1.Pod, node string, alwaysReady bool) bool {
	if s.AddressType == discoveryv1.AddressTypeFQDN {
		return false
	}
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
		if alwaysReady {
			ready, serving = true, true
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

// errDropped: the overlays were dropped (the cloud returned) while a
// write was being answered locally.
var errDropped = errors.New("the cloud is reachable again: local writes are over")

// putOverlay saves ov (so that it survives a restart of outpost) and makes
// it what readers see, unless the overlays were dropped since generation
// gen, when it was read.
func (l *Writer) putOverlay(ov *overlay, gen uint64) error {
	l.overlayMu.Lock()
	defer l.overlayMu.Unlock()
	if l.overlays.generation() != gen {
		return errDropped
	}
	rec, err := json.Marshal(overlayRecord{Resource: ov.resource, Namespace: ov.namespace, Name: ov.name, Kind: ov.kind, APIVersion: ov.apiVersion, Data: ov.data})
	if err != nil {
		return err
	}
	if err := l.Store.PutDoc(overlayPrefix+overlayKey(ov.resource, ov.namespace, ov.name), codec.MediaJSON, rec); err != nil {
		return fmt.Errorf("saving local write: %w", err)
	}
	l.overlays.put(ov, gen)
	return nil
}
