// Package local answers the few writes outpost takes itself while the cloud
// is unreachable, one explicit policy each, so that a restarted kubelet
// keeps working:
//   - this node's Lease renewals (kube-node-lease/<node>);
//   - this node's Node and Node status, and the status of pods bound to it:
//     applied to an overlay that the offline reader shows, dropped when the
//     cloud's truth returns (after the last status is sent upstream,
//     since kubelet believes it saved it);
//   - derived from those pod statuses, the endpoints of this node's pods in
//     the cached EndpointSlices: a pod rebooted offline comes back at a new
//     address, which Service traffic must follow (endpoints.go); never sent
//     upstream;
//   - Events: appended to a bounded journal in the store, replayed after
//     reconnect;
//   - TokenRequests: answered with a token the apiserver issued online for
//     the same service account, bound object and audiences, while it is
//     valid (outpost never makes a token up).
//
// Only this node's own identity may make them. Everything else gets 503.
package local
