// Package rewrite changes a few answers on their way to the client, after
// they were recorded, so that in-cluster clients on this node reach outpost
// instead of the apiserver:
//
//   - this node's kubelet sees the `kubernetes` Service in `default` with
//     outpost's node-local address as its ClusterIP and port, so the
//     KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT it gives every
//     pod lead to outpost;
//   - the service proxies (kube-proxy, or a CNI agent that implements
//     Services) see that Service's endpoints (EndpointSlices, Endpoints) as
//     that address, so the Service's VIP and kubernetes.default.svc lead to
//     outpost on this node too.
//
// Nothing else is changed, for nobody else: the store keeps what the
// apiserver said, every other reader and convergence see it byte for byte,
// and the same rules apply whether the apiserver or the cache answered.
package rewrite

//lint:file-ignore SA1019 core/v1 Endpoints are deprecated but still served, and older service proxies read them.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/outposthq/outpost/internal/request"
)

// The objects rewritten: the Service the apiserver keeps for itself and
// its endpoints, all in the default namespace.
const (
	namespace   = "default"
	serviceName = "kubernetes"
	// serviceNameLabel names an EndpointSlice's Service.
	serviceNameLabel = discoveryv1.LabelServiceName
	// portName is the name of the Service's one port.
	portName = "https"
)

// Rules says who sees the kubernetes Service pointing at outpost.
type Rules struct {
	// Address is outpost's node-local address (IP and port), where pods
	// on the pod network and on the host network reach it.
	Address netip.AddrPort
	// NodeUser is this node's user, system:node:<name>. Its kubelet sees
	// the Service rewritten (pod environments), and, should it run a
	// service proxy with the node's credentials, its endpoints too.
	NodeUser string
	// Proxies are the users whose view of the Service's endpoints is
	// rewritten: user names, or prefixes ending in "*".
	Proxies []string
}

// kind is what a request reads that may need rewriting.
type kind int

const (
	none kind = iota
	service
	endpoints
	endpointSlice
)

// String is the kind of one object of k.
func (k kind) String() string {
	switch k {
	case service:
		return "Service"
	case endpoints:
		return "Endpoints"
	case endpointSlice:
		return "EndpointSlice"
	}
	return ""
}

// target reports what info reads that Rules rewrites for its caller: a
// get, list or watch of services, endpoints or endpointslices that may hold
// the kubernetes Service's, by a caller the rule is for.
func (r *Rules) target(info *request.Info) kind {
	if r == nil || !info.IsResourceRequest || info.Subresource != "" {
		return none
	}
	switch info.Verb {
	case "get", "list", "watch":
	default:
		return none
	}
	if info.Namespace != "" && info.Namespace != namespace {
		return none
	}
	user := info.Identity.User
	isNode := info.Identity.Kind == request.NodeCert && user == r.NodeUser
	named := info.Name == "" || info.Name == serviceName
	switch {
	case info.APIGroup == "" && info.Resource == "services" && named && isNode:
		return service
	case info.APIGroup == "" && info.Resource == "endpoints" && named && (isNode || r.proxy(user)):
		return endpoints
	case info.APIGroup == discoveryv1.GroupName && info.Resource == "endpointslices" && (isNode || r.proxy(user)):
		return endpointSlice
	}
	return none
}

func (r *Rules) proxy(user string) bool {
	if user == "" {
		return false
	}
	for _, p := range r.Proxies {
		if p == user || (strings.HasSuffix(p, "*") && strings.HasPrefix(user, strings.TrimSuffix(p, "*"))) {
			return true
		}
	}
	return false
}

// mayHoldJSON and mayHoldProtobuf are cheap tests that data may hold an
// object to rewrite: every one is named, or labelled, "kubernetes" — the
// whole string, quoted in JSON, after its length (10) in protobuf. (Every
// EndpointSlice holds the word in its label keys, kubernetes.io/…, so the
// word alone would pass them all.)
func mayHoldJSON(data []byte) bool { return bytes.Contains(data, []byte(`"`+serviceName+`"`)) }

func mayHoldProtobuf(data []byte) bool {
	return bytes.Contains(data, []byte("\x0a"+serviceName))
}

// object rewrites obj in place if it is one Rules rewrites, and reports
// whether it changed.
func (r *Rules) object(k kind, obj runtime.Object) bool {
	changed := false
	switch o := obj.(type) {
	case *corev1.Service:
		changed = k == service && r.service(o)
	case *corev1.ServiceList:
		for i := range o.Items {
			changed = k == service && r.service(&o.Items[i]) || changed
		}
	case *corev1.Endpoints:
		changed = k == endpoints && r.endpoints(o)
	case *corev1.EndpointsList:
		for i := range o.Items {
			changed = k == endpoints && r.endpoints(&o.Items[i]) || changed
		}
	case *discoveryv1.EndpointSlice:
		changed = k == endpointSlice && r.slice(o)
	case *discoveryv1.EndpointSliceList:
		for i := range o.Items {
			changed = k == endpointSlice && r.slice(&o.Items[i]) || changed
		}
	}
	return changed
}

func (r *Rules) service(s *corev1.Service) bool {
	if s.Namespace != namespace || s.Name != serviceName || len(s.Spec.Ports) == 0 {
		return false
	}
	ip := r.Address.Addr().String()
	s.Spec.ClusterIP = ip
	s.Spec.ClusterIPs = []string{ip}
	family := corev1.IPv4Protocol
	if r.Address.Addr().Is6() {
		family = corev1.IPv6Protocol
	}
	s.Spec.IPFamilies = []corev1.IPFamily{family}
	// kubelet takes KUBERNETES_SERVICE_PORT from the first port.
	i := portIndex(len(s.Spec.Ports), func(i int) string { return s.Spec.Ports[i].Name })
	s.Spec.Ports[i].Port = int32(r.Address.Port())
	return true
}

func (r *Rules) endpoints(e *corev1.Endpoints) bool {
	if e.Namespace != namespace || e.Name != serviceName {
		return false
	}
	e.Subsets = []corev1.EndpointSubset{{
		Addresses: []corev1.EndpointAddress{{IP: r.Address.Addr().String()}},
		Ports:     []corev1.EndpointPort{{Name: portName, Port: int32(r.Address.Port()), Protocol: corev1.ProtocolTCP}},
	}}
	return true
}

func (r *Rules) slice(s *discoveryv1.EndpointSlice) bool {
	if s.Namespace != namespace || s.Labels[serviceNameLabel] != serviceName {
		return false
	}
	want := discoveryv1.AddressTypeIPv4
	if r.Address.Addr().Is6() {
		want = discoveryv1.AddressTypeIPv6
	}
	if s.AddressType != want {
		// The other family's slice of a dual-stack cluster: outpost has
		// no address of that family, so it is left as the apiserver has it.
		return false
	}
	ready := true
	s.Endpoints = []discoveryv1.Endpoint{{
		Addresses:  []string{r.Address.Addr().String()},
		Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &ready, Terminating: new(bool)},
	}}
	port, proto := int32(r.Address.Port()), corev1.ProtocolTCP
	name := portName
	if len(s.Ports) > 0 {
		i := portIndex(len(s.Ports), func(i int) string { return deref(s.Ports[i].Name) })
		name = deref(s.Ports[i].Name)
	}
	s.Ports = []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}}
	return true
}

// portIndex returns the index of the port named "https", or 0.
func portIndex(n int, name func(int) string) int {
	for i := range n {
		if name(i) == portName {
			return i
		}
	}
	return 0
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// newObject returns an empty object of a kind Rules may rewrite, or nil.
func newObject(kind string) runtime.Object {
	switch kind {
	case "Service":
		return &corev1.Service{}
	case "ServiceList":
		return &corev1.ServiceList{}
	case "Endpoints":
		return &corev1.Endpoints{}
	case "EndpointsList":
		return &corev1.EndpointsList{}
	case "EndpointSlice":
		return &discoveryv1.EndpointSlice{}
	case "EndpointSliceList":
		return &discoveryv1.EndpointSliceList{}
	}
	return nil
}

// rewriteJSON returns data, a JSON object, rewritten, or data itself when
// nothing in it is to change (so that it goes out byte for byte).
func (r *Rules) rewriteJSON(k kind, data []byte) ([]byte, error) {
	if !mayHoldJSON(data) {
		return data, nil
	}
	var meta struct {
		Kind string `json:"kind"`
	}
	if err := json.Unmarshal(data, &meta); err != nil {
		return nil, fmt.Errorf("decoding JSON answer: %w", err)
	}
	if meta.Kind == "" {
		// Objects in watch events name their kind; be lenient anyway.
		meta.Kind = k.String()
	}
	obj := newObject(meta.Kind)
	if obj == nil {
		// A Table, PartialObjectMetadata or Status: nothing to point.
		return data, nil
	}
	if err := json.Unmarshal(data, obj); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", meta.Kind, err)
	}
	if !r.object(k, obj) {
		return data, nil
	}
	out, err := json.Marshal(obj)
	if err != nil {
		return nil, fmt.Errorf("encoding %s: %w", meta.Kind, err)
	}
	return append(out, '\n'), nil
}

// protobufMagic starts every enveloped Kubernetes protobuf message.
var protobufMagic = []byte{'k', '8', 's', 0}

// protoMessage is what the generated Kubernetes types implement.
type protoMessage interface {
	runtime.Object
	Marshal() ([]byte, error)
	Unmarshal([]byte) error
}

// rewriteProtobuf returns data, an enveloped protobuf object, rewritten,
// or data itself when nothing in it is to change.
func (r *Rules) rewriteProtobuf(k kind, data []byte) ([]byte, error) {
	if !mayHoldProtobuf(data) {
		return data, nil
	}
	body, ok := bytes.CutPrefix(data, protobufMagic)
	if !ok {
		return nil, fmt.Errorf("protobuf answer without the %q prefix", protobufMagic)
	}
	var unk runtime.Unknown
	if err := unk.Unmarshal(body); err != nil {
		return nil, fmt.Errorf("decoding protobuf envelope: %w", err)
	}
	obj, ok := newObject(unk.Kind).(protoMessage)
	if !ok {
		return data, nil
	}
	if err := obj.Unmarshal(unk.Raw); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", unk.Kind, err)
	}
	if !r.object(k, obj) {
		return data, nil
	}
	raw, err := obj.Marshal()
	if err != nil {
		return nil, fmt.Errorf("encoding %s: %w", unk.Kind, err)
	}
	unk.Raw = raw
	env, err := unk.Marshal()
	if err != nil {
		return nil, fmt.Errorf("encoding protobuf envelope: %w", err)
	}
	return append(append([]byte(nil), protobufMagic...), env...), nil
}
