// Package autonomy is the cloud side of edge autonomy: it keeps the pods of
// autonomous nodes from being evicted, and behind their Services, while the
// cloud cannot hear from those nodes.
//
// When a node stops heartbeating, kube-controller-manager's node lifecycle
// controller marks it unreachable, taints it node.kubernetes.io/unreachable
// with effect NoExecute, sets the Ready condition of its pods to False — so
// the endpointslice controller drops them from Services — and, once a pod's
// toleration of the taint runs out (300 s by default), evicts it. For a node
// in a shop or a vehicle behind a broken link that is exactly wrong: its pods
// are most likely running fine. We leave kube-controller-manager untouched
// and act on what it reads instead:
//
//   - A Node declares autonomy with an annotation (see NodePolicy). The
//     Controller keeps the NoExecute tolerations of every pod bound to such a
//     node at the declared duration, remembering the originals in a pod
//     annotation and restoring them when autonomy is withdrawn. A mutating
//     webhook does the same for pods created already bound, so they never
//     have a window in which they could be evicted.
//   - A mutating webhook on EndpointSlices marks an endpoint ready again
//     while its pod's autonomous node is unreachable, provided the kubelet's
//     last word was that the pod's containers were ready. It acts only while
//     the node is unreachable, so nothing lingers once the node is back.
//   - Autonomy is for nodes alive behind a cut link. When a quorum of the
//     nodes at an unreachable node's site report it unreachable for a grace
//     period (package peerhealth), its autonomy is withdrawn: both of the
//     above treat it as any node, so Kubernetes evicts its pods and their
//     controllers replace them.
//
// Run wires these together with leader election, the webhook server and
// its certificates, and the metrics and health endpoints; the leader also
// runs the approval of outposts' serving certificates (package
// csrapproval).
package autonomy
