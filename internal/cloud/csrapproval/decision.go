package csrapproval

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"

	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
)

// Names of the kube-apiserver's identities that this package relies on.
const (
	// nodeUserPrefix starts the user name of every node: system:node:<name>.
	nodeUserPrefix = "system:node:"
	// nodesGroup is the group of every node, and the only organization the
	// kubelet-serving signer accepts in a subject.
	nodesGroup = "system:nodes"
)

// DefaultClusterDomain is the cluster domain when none is configured.
const DefaultClusterDomain = "cluster.local"

// Verdict is what the Controller does with a CSR.
type Verdict int

const (
	// Ignore: the CSR claims none of the in-cluster names (kubelet's own
	// serving CSRs), or is not a kubelet-serving CSR at all. Not ours.
	Ignore Verdict = iota
	// Approve: an outpost's request for its own serving certificate.
	Approve
	// Deny: claims an in-cluster name but fails a check.
	Deny
	// Wait: nothing is wrong yet, but the Node it is for is not
	// registered (an outpost asks before its kubelet registers): decided
	// once it is, since a denial is final.
	Wait
)

// String is the value of the decision label of the decision metric.
func (v Verdict) String() string {
	switch v {
	case Approve:
		return "approved"
	case Deny:
		return "denied"
	default:
		return "ignored"
	}
}

// Decision is a Verdict with the reason and message of the CSR condition.
type Decision struct {
	Verdict Verdict
	// Node is the node the requester is, when it is one.
	Node string
	// Reason is a CamelCase word for the condition; for a denial, the
	// first check that failed.
	Reason string
	// Message says, for a denial, every check that failed.
	Message string
}

// Reasons of the Approved and Denied conditions, one per check.
const (
	ReasonApproved         = "OutpostServingCertificate"
	ReasonBadRequest       = "BadRequest"       // signature does not verify
	ReasonNotANode         = "NotANode"         // spec.username is not system:node:<n>
	ReasonNotInNodesGroup  = "NotInNodesGroup"  // spec.groups lacks system:nodes
	ReasonSubjectMismatch  = "SubjectMismatch"  // CN is not spec.username, or O is not [system:nodes]
	ReasonBadUsages        = "BadUsages"        // not within {digital signature, key encipherment, server auth} with server auth
	ReasonForbiddenSAN     = "ForbiddenSAN"     // email or URI SANs
	ReasonUnknownNode      = "UnknownNode"      // no Node n
	ReasonForeignDNSName   = "ForeignDNSName"   // a DNS SAN that is not ours
	ReasonForeignIPAddress = "ForeignIPAddress" // an IP SAN that is not ours
)

// Facts are what Decide reads besides the CSR. Both functions are called
// only when needed, at most once per decision; an error they return is
// returned by Decide as it is, to be retried.
type Facts struct {
	// ClusterDomain is the cluster's DNS domain; empty means cluster.local.
	ClusterDomain string
	// ServiceIPs returns the ClusterIPs of the default/kubernetes Service.
	ServiceIPs func() ([]net.IP, error)
	// Node returns the Node of that name, or nil if there is none.
	Node func(name string) (*corev1.Node, error)
	// APIServerIPs, if set, returns the addresses of the apiservers (the
	// kubernetes Service's endpoints), which no node may claim.
	APIServerIPs func() ([]net.IP, error)
}

// metadataIPs are the cloud providers' instance metadata addresses: link-
// local, but a certificate for them would let a node impersonate the
// metadata service to its pods.
var metadataIPs = []net.IP{net.ParseIP("169.254.169.254"), net.ParseIP("fd00:ec2::254")}

// allowedUsages are the usages an outpost may ask for; server auth is
// also required.
var allowedUsages = []certificatesv1.KeyUsage{
	certificatesv1.UsageDigitalSignature,
	certificatesv1.UsageKeyEncipherment,
	certificatesv1.UsageServerAuth,
}

// localhost is the name of the loopback addresses on every host: a
// certificate for it, like one for 127.0.0.1, is good only for a client on
// the same host, and outposts ask for it (internal/hub servingHosts). The
// name alone: subdomains of localhost are foreign like any other.
const localhost = "localhost"

// loopbacks are the loopback addresses a pod on the node may use for the
// outpost; the rest of 127.0.0.0/8 is not.
var loopbacks = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}

// InClusterNames are the DNS names by which pods reach the apiserver in a
// cluster whose domain is domain (empty means cluster.local).
func InClusterNames(domain string) []string {
	if domain == "" {
		domain = DefaultClusterDomain
	}
	return []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc." + domain}
}

// Decide decides what to do with a CSR that is pending (neither approved
// nor denied; the caller checks). It is Ignore unless the CSR is for the
// kubelet-serving signer and claims one of the in-cluster names or the
// kubernetes Service's ClusterIP. Such a CSR is approved when all of these
// hold, and denied otherwise:
//
//   - the request's signature verifies;
//   - spec.username is system:node:<n>, and spec.groups has system:nodes;
//   - the subject is CN=system:node:<n>, O=system:nodes, for the same n;
//   - the usages are within digital signature, key encipherment and server
//     auth, and include server auth;
//   - there are no email or URI SANs;
//   - the Node n exists;
//   - every DNS SAN is an in-cluster name, localhost, n itself, or a
//     Hostname, InternalDNS or ExternalDNS address of Node n;
//   - every IP SAN is a ClusterIP of the kubernetes Service, an InternalIP
//     or ExternalIP address of Node n, 127.0.0.1, ::1, or link-local;
//   - and, since a node writes its own status addresses, no DNS SAN is a
//     wildcard or another Service's name in the cluster domain, and no IP
//     SAN is an apiserver's address (the kubernetes Service's endpoints)
//     or the cloud's metadata address.
//
// A request whose PEM or X.509 does not parse names nothing we can read:
// Ignore (the apiserver rejects such requests on create anyway).
func Decide(csr *certificatesv1.CertificateSigningRequest, facts Facts) (Decision, error) {
	if csr.Spec.SignerName != certificatesv1.KubeletServingSignerName {
		return Decision{Verdict: Ignore, Reason: "signer " + csr.Spec.SignerName}, nil
	}
	req, err := parseRequest(csr.Spec.Request)
	if err != nil {
		return Decision{Verdict: Ignore, Reason: err.Error()}, nil
	}

	inCluster := InClusterNames(facts.ClusterDomain)
	var serviceIPs []net.IP
	if len(req.IPAddresses) > 0 { // needed only to read IP SANs
		if serviceIPs, err = facts.ServiceIPs(); err != nil {
			return Decision{}, fmt.Errorf("reading the ClusterIP of the kubernetes Service: %w", err)
		}
	}
	claims := slices.ContainsFunc(req.DNSNames, func(n string) bool { return containsName(inCluster, n) }) ||
		slices.ContainsFunc(req.IPAddresses, func(ip net.IP) bool { return containsIP(serviceIPs, ip) })
	if !claims {
		return Decision{Verdict: Ignore, Reason: "claims no in-cluster name"}, nil
	}

	var fails failures
	if err := req.CheckSignature(); err != nil {
		fails.add(ReasonBadRequest, "the request's signature does not verify: %v", err)
	}
	node, isNode := strings.CutPrefix(csr.Spec.Username, nodeUserPrefix)
	if !isNode || node == "" {
		node = ""
		fails.add(ReasonNotANode, "requester %q is not a node (want %s<name>)", csr.Spec.Username, nodeUserPrefix)
	} else if !slices.Contains(csr.Spec.Groups, nodesGroup) {
		fails.add(ReasonNotInNodesGroup, "requester %q is not in group %s", csr.Spec.Username, nodesGroup)
	}
	if req.Subject.CommonName != csr.Spec.Username {
		fails.add(ReasonSubjectMismatch, "subject CN %q is not the requester %q", req.Subject.CommonName, csr.Spec.Username)
	}
	if !slices.Equal(req.Subject.Organization, []string{nodesGroup}) {
		fails.add(ReasonSubjectMismatch, "subject O %q is not [%s]", req.Subject.Organization, nodesGroup)
	}
	if bad := usagesProblem(csr.Spec.Usages); bad != "" {
		fails.add(ReasonBadUsages, "%s", bad)
	}
	for _, e := range req.EmailAddresses {
		fails.add(ReasonForbiddenSAN, "email SAN %q is not allowed", e)
	}
	for _, u := range req.URIs {
		fails.add(ReasonForbiddenSAN, "URI SAN %q is not allowed", u.String())
	}
	// Names and addresses no node may have signed, whatever its Node
	// object says (a node writes its own status addresses): wildcards,
	// other Services of the cluster, the cloud's metadata address, the
	// apiserver's own addresses.
	domain := facts.ClusterDomain
	if domain == "" {
		domain = DefaultClusterDomain
	}
	for _, name := range req.DNSNames {
		lower := strings.ToLower(name)
		switch {
		case strings.Contains(name, "*"):
			fails.add(ReasonForbiddenSAN, "wildcard DNS SAN %q is not allowed", name)
		case !containsName(inCluster, name) && (strings.HasSuffix(lower, ".svc") || strings.Contains(lower, ".svc.") || strings.HasSuffix(lower, "."+domain)):
			fails.add(ReasonForbiddenSAN, "DNS SAN %q names another Service of the cluster", name)
		}
	}
	var apiservers []net.IP
	if len(req.IPAddresses) > 0 && facts.APIServerIPs != nil {
		if apiservers, err = facts.APIServerIPs(); err != nil {
			return Decision{}, fmt.Errorf("reading the apiserver's addresses: %w", err)
		}
	}
	for _, ip := range req.IPAddresses {
		switch {
		case slices.ContainsFunc(metadataIPs, ip.Equal):
			fails.add(ReasonForbiddenSAN, "IP SAN %s is the cloud's metadata address", ip)
		case containsIP(apiservers, ip):
			fails.add(ReasonForbiddenSAN, "IP SAN %s is an address of the apiserver itself", ip)
		}
	}

	// The node's own names and addresses: only a node's, and only when it
	// exists. A node that names someone else in its subject is already
	// denied; its SANs are still checked against its own node, so that
	// the message lists them too.
	var nodeDNS, nodeIPs []string
	owner := "the requester, which is no node"
	if node != "" {
		owner = "node " + node
		n, err := facts.Node(node)
		if err != nil {
			return Decision{}, fmt.Errorf("reading node %s: %w", node, err)
		}
		switch {
		case n == nil && len(fails) == 0:
			return Decision{Verdict: Wait, Node: node, Reason: ReasonUnknownNode, Message: "node " + node + " is not registered yet"}, nil
		case n == nil:
			fails.add(ReasonUnknownNode, "node %s does not exist", node)
		default:
			nodeDNS, nodeIPs = addresses(n)
		}
		nodeDNS = append(nodeDNS, node)
	}
	for _, name := range req.DNSNames {
		if !containsName(inCluster, name) && !strings.EqualFold(name, localhost) && !containsName(nodeDNS, name) {
			fails.add(ReasonForeignDNSName, "DNS SAN %q is neither an in-cluster name of the apiserver, localhost, nor the name or a DNS address of %s", name, owner)
		}
	}
	for _, ip := range req.IPAddresses {
		if !ownIP(ip, serviceIPs, nodeIPs) {
			fails.add(ReasonForeignIPAddress, "IP SAN %s is neither a ClusterIP of the kubernetes Service, an address of %s, loopback nor link-local", ip, owner)
		}
	}

	if len(fails) > 0 {
		return Decision{Verdict: Deny, Node: node, Reason: fails[0].reason, Message: fails.String()}, nil
	}
	return Decision{
		Verdict: Approve,
		Node:    node,
		Reason:  ReasonApproved,
		Message: fmt.Sprintf("outpost-controller approved the serving certificate of node %s for the in-cluster names of the apiserver", node),
	}, nil
}

// parseRequest reads the PEM CERTIFICATE REQUEST of a CSR.
func parseRequest(pemBytes []byte) (*x509.CertificateRequest, error) {
	block, _ := pem.Decode(pemBytes)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, errors.New("request is not a PEM CERTIFICATE REQUEST")
	}
	req, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing request: %w", err)
	}
	return req, nil
}

// usagesProblem says what is wrong with usages, or "" if nothing is.
func usagesProblem(usages []certificatesv1.KeyUsage) string {
	var extra []string
	for _, u := range usages {
		if !slices.Contains(allowedUsages, u) {
			extra = append(extra, string(u))
		}
	}
	switch {
	case len(extra) > 0:
		return fmt.Sprintf("usages %q are not allowed (want within %q)", extra, allowedUsages)
	case !slices.Contains(usages, certificatesv1.UsageServerAuth):
		return fmt.Sprintf("usages %q lack %q", usages, certificatesv1.UsageServerAuth)
	}
	return ""
}

// addresses returns the DNS names and the IP addresses among the node's
// status addresses.
func addresses(n *corev1.Node) (dns, ips []string) {
	for _, a := range n.Status.Addresses {
		switch a.Type {
		case corev1.NodeHostName, corev1.NodeInternalDNS, corev1.NodeExternalDNS:
			dns = append(dns, a.Address)
		case corev1.NodeInternalIP, corev1.NodeExternalIP:
			ips = append(ips, a.Address)
		}
	}
	return dns, ips
}

// ownIP reports whether an IP SAN is one a node's outpost may claim.
func ownIP(ip net.IP, serviceIPs []net.IP, nodeIPs []string) bool {
	if containsIP(serviceIPs, ip) || containsIP(loopbacks, ip) {
		return true
	}
	// Link-local addresses (169.254.0.0/16, fe80::/10) are node-local by
	// definition: routers never forward them, so a certificate for one can
	// only be presented to a client on the same link — the pods of this
	// node, which reach the outpost at such an address. Claiming one takes
	// nothing from anyone else.
	if ip.IsLinkLocalUnicast() {
		return true
	}
	return slices.ContainsFunc(nodeIPs, func(s string) bool {
		a := net.ParseIP(s)
		return a != nil && a.Equal(ip)
	})
}

func containsIP(ips []net.IP, ip net.IP) bool {
	return slices.ContainsFunc(ips, ip.Equal)
}

// containsName compares DNS names as DNS does, ignoring case.
func containsName(names []string, name string) bool {
	return slices.ContainsFunc(names, func(n string) bool { return strings.EqualFold(n, name) })
}

// failures are the checks a CSR failed, in order.
type failures []failure

type failure struct{ reason, message string }

func (f *failures) add(reason, format string, args ...any) {
	*f = append(*f, failure{reason, fmt.Sprintf(format, args...)})
}

func (f failures) String() string {
	msgs := make([]string, len(f))
	for i, x := range f {
		msgs[i] = x.reason + ": " + x.message
	}
	return "outpost-controller denied this request for the in-cluster names of the apiserver: " + strings.Join(msgs, "; ")
}
