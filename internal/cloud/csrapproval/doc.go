// Package csrapproval approves the serving certificates that outposts
// request for the in-cluster names of the apiserver, and denies every
// request for those names that is not exactly that.
//
// In-cluster clients (pods using KUBERNETES_SERVICE_HOST or
// kubernetes.default.svc) reach the outpost on their own node at a
// node-local link-local address. They verify TLS against the cluster CA and
// the names kubernetes, kubernetes.default, kubernetes.default.svc and
// kubernetes.default.svc.<cluster-domain>, the ClusterIP of the kubernetes
// Service and that node-local address. So an outpost files a
// CertificateSigningRequest with signerName kubernetes.io/kubelet-serving,
// which kube-controller-manager signs with the cluster CA but never
// approves. Whoever approves such a request lets one node answer for the
// apiserver to every pod that trusts it, so the Controller approves only a
// request that names the requesting node's own certificate and nothing
// wider (see Decide for the checks; a node writes its own status
// addresses, so wildcards, other Services' names, the apiservers' and the
// cloud metadata addresses are refused even there), and denies — with the failed check as
// the reason, a log line and a Warning event on the request — any other
// request that claims an in-cluster name. Kubelet's own serving requests
// claim none; they are left alone, for whichever approver the cluster has.
//
// The Controller is level-triggered: an informer on kubelet-serving CSRs
// feeds a rate-limited work queue, and each sync decides from the request
// and a fresh read of its node and of the kubernetes Service (a denial is
// final, so it is never made from a stale cache). It is meant to run in
// the one replica holding the leader Lease, and starts its informer only
// when run.
//
// # RBAC
//
// The Controller needs, besides creating events:
//
//   - certificates.k8s.io certificatesigningrequests: get, list, watch;
//   - certificates.k8s.io certificatesigningrequests/approval: update;
//   - certificates.k8s.io signers, resourceName kubernetes.io/kubelet-serving:
//     approve (the apiserver checks it for approving and denying alike);
//   - nodes: get;
//   - services in namespace default, resourceName kubernetes: get;
//   - discovery.k8s.io endpointslices in namespace default: list (the
//     kubernetes Service's, the apiservers' addresses no node may claim).
//
// deploy/rbac.yaml grants exactly these to outpost-controller.
package csrapproval
