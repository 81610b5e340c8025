package csrapproval

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"

	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	nodeA = "edge-a"
	nodeB = "edge-b"
	vip   = "10.0.0.1"
)

var (
	ds = certificatesv1.UsageDigitalSignature
	ke = certificatesv1.UsageKeyEncipherment
	sa = certificatesv1.UsageServerAuth
	ca = certificatesv1.UsageClientAuth
)

// request describes a CSR for the tests: who files it and what it asks.
type request struct {
	signer   string // empty: kubelet-serving
	username string // empty: system:node:edge-a
	groups   []string
	cn       string   // empty: the username
	orgs     []string // nil: system:nodes
	usages   []certificatesv1.KeyUsage
	dns      []string
	ips      []string
	emails   []string
	uris     []string
	tamper   bool // break the signature
}

// csrOf builds the CSR a requester would file, as the apiserver stores it.
func csrOf(t *testing.T, r request) *certificatesv1.CertificateSigningRequest {
	t.Helper()
	if r.signer == "" {
		r.signer = certificatesv1.KubeletServingSignerName
	}
	if r.username == "" {
		r.username = nodeUserPrefix + nodeA
	}
	if r.groups == nil {
		r.groups = []string{nodesGroup, "system:authenticated"}
	}
	if r.cn == "" {
		r.cn = r.username
	}
	if r.orgs == nil {
		r.orgs = []string{nodesGroup}
	}
	if r.usages == nil {
		r.usages = []certificatesv1.KeyUsage{ds, sa}
	}
	tmpl := &x509.CertificateRequest{
		Subject:        pkix.Name{CommonName: r.cn, Organization: r.orgs},
		DNSNames:       r.dns,
		EmailAddresses: r.emails,
	}
	for _, s := range r.ips {
		ip := net.ParseIP(s)
		if ip == nil {
			t.Fatalf("bad IP %q", s)
		}
		tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
	}
	for _, s := range r.uris {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, u)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	if r.tamper {
		// The signature comes last; its last byte is the end of s. Flipping
		// it keeps the structure valid and the signature wrong.
		der[len(der)-1] ^= 0x01
	}
	return &certificatesv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{Name: "csr-test"},
		Spec: certificatesv1.CertificateSigningRequestSpec{
			Request:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}),
			SignerName: r.signer,
			Usages:     r.usages,
			Username:   r.username,
			Groups:     r.groups,
		},
	}
}

// world is the cluster of the tests: nodes edge-a and edge-b, and the
// kubernetes Service at 10.0.0.1.
func world(domain string, nodes ...string) (Facts, *[]string) {
	var asked []string
	all := map[string]*corev1.Node{
		nodeA: {ObjectMeta: metav1.ObjectMeta{Name: nodeA}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: "192.168.1.10"},
			{Type: corev1.NodeExternalIP, Address: "2001:db8::10"},
			{Type: corev1.NodeHostName, Address: "edge-a.shop.example"},
			{Type: corev1.NodeInternalDNS, Address: "edge-a.internal"},
			// What a compromised node may write into its own status.
			{Type: corev1.NodeInternalDNS, Address: "web.shop.svc.cluster.local"},
			{Type: corev1.NodeExternalDNS, Address: "*.edge.example"},
			{Type: corev1.NodeInternalIP, Address: apiserverIP},
			{Type: corev1.NodeExternalIP, Address: "169.254.169.254"},
		}}},
		nodeB: {ObjectMeta: metav1.ObjectMeta{Name: nodeB}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: "192.168.1.20"},
			{Type: corev1.NodeHostName, Address: "edge-b.shop.example"},
		}}},
	}
	return Facts{
		ClusterDomain: domain,
		ServiceIPs:    func() ([]net.IP, error) { return []net.IP{net.ParseIP(vip)}, nil },
		APIServerIPs:  func() ([]net.IP, error) { return []net.IP{net.ParseIP(apiserverIP)}, nil },
		Node: func(name string) (*corev1.Node, error) {
			asked = append(asked, name)
			for _, n := range nodes {
				if n == name {
					return all[name], nil
				}
			}
			return nil, nil
		},
	}, &asked
}

// apiserverIP is the apiserver's address, the kubernetes Service's endpoint.
const apiserverIP = "10.1.1.1"

var inCluster = []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}

func TestDecide(t *testing.T) {
	with := func(extra ...string) []string { return append(append([]string(nil), inCluster...), extra...) }
	tests := []struct {
		name    string
		req     request
		domain  string
		nodes   []string // existing nodes; nil: both
		want    Verdict
		reason  string // of the condition
		message string // in the message
	}{
		{name: "own names", req: request{
			dns: with(nodeA, "edge-a.shop.example", "edge-a.internal", "localhost"),
			ips: []string{vip, "169.254.2.1", "fe80::1", "127.0.0.1", "::1", "192.168.1.10", "2001:db8::10"},
		}, want: Approve, reason: ReasonApproved},
		{name: "with key encipherment", req: request{dns: with(), ips: []string{vip, "169.254.2.1"}, usages: []certificatesv1.KeyUsage{ds, ke, sa}}, want: Approve},
		{name: "server auth alone", req: request{dns: with(), usages: []certificatesv1.KeyUsage{sa}}, want: Approve},
		{name: "one in-cluster name", req: request{dns: []string{"kubernetes.default.svc"}, ips: []string{"169.254.2.1"}}, want: Approve},
		{name: "the ClusterIP alone", req: request{ips: []string{vip, "169.254.2.1"}}, want: Approve},
		{name: "names in another case", req: request{dns: []string{"Kubernetes.Default.SVC", "EDGE-A"}}, want: Approve},
		{name: "other cluster domain", domain: "edge.example", req: request{dns: []string{"kubernetes.default.svc.edge.example"}}, want: Approve},

		{name: "foreign IP", req: request{dns: with(), ips: []string{vip, "10.9.9.9"}}, want: Deny, reason: ReasonForeignIPAddress, message: "IP SAN 10.9.9.9"},
		{name: "loopback beyond 127.0.0.1", req: request{dns: with(), ips: []string{"127.0.0.2"}}, want: Deny, reason: ReasonForeignIPAddress},
		{name: "another node's IP", req: request{dns: with(), ips: []string{"192.168.1.20"}}, want: Deny, reason: ReasonForeignIPAddress},
		{name: "foreign DNS", req: request{dns: with("apiserver.example.com")}, want: Deny, reason: ReasonForeignDNSName, message: `"apiserver.example.com"`},
		{name: "below localhost", req: request{dns: with("evil.localhost")}, want: Deny, reason: ReasonForeignDNSName},
		{name: "wildcard", req: request{dns: with("*.default.svc")}, want: Deny, reason: ReasonForbiddenSAN},
		{name: "a wildcard the node gave itself", req: request{dns: with("*.edge.example")}, want: Deny, reason: ReasonForbiddenSAN, message: "wildcard"},
		{name: "another Service the node gave itself", req: request{dns: with("web.shop.svc.cluster.local")}, want: Deny, reason: ReasonForbiddenSAN, message: "another Service"},
		{name: "the apiserver's address the node gave itself", req: request{dns: with(), ips: []string{apiserverIP}}, want: Deny, reason: ReasonForbiddenSAN, message: "the apiserver itself"},
		{name: "the metadata address", req: request{dns: with(), ips: []string{"169.254.169.254"}}, want: Deny, reason: ReasonForbiddenSAN, message: "metadata"},
		{name: "another node's name", req: request{dns: with(nodeB)}, want: Deny, reason: ReasonForeignDNSName, message: `"edge-b"`},
		{name: "another node's hostname", req: request{dns: with("edge-b.shop.example")}, want: Deny, reason: ReasonForeignDNSName},
		{name: "another cluster domain", req: request{dns: []string{"kubernetes.default.svc.edge.example", "kubernetes"}}, want: Deny, reason: ReasonForbiddenSAN},
		{name: "service account", req: request{username: "system:serviceaccount:kube-system:sneaky", groups: []string{"system:serviceaccounts", nodesGroup},
			cn: nodeUserPrefix + nodeA, dns: with()}, want: Deny, reason: ReasonNotANode, message: `requester "system:serviceaccount:kube-system:sneaky" is not a node`},
		{name: "service account naming itself", req: request{username: "system:serviceaccount:kube-system:sneaky", groups: []string{"system:serviceaccounts"}, dns: with()},
			want: Deny, reason: ReasonNotANode},
		{name: "another node for this one", req: request{username: nodeUserPrefix + nodeB, cn: nodeUserPrefix + nodeA, dns: with(nodeA)},
			want: Deny, reason: ReasonSubjectMismatch, message: `subject CN "system:node:edge-a" is not the requester "system:node:edge-b"`},
		{name: "CN and username differ", req: request{cn: nodeUserPrefix + nodeB, dns: with()}, want: Deny, reason: ReasonSubjectMismatch},
		{name: "empty node name", req: request{username: nodeUserPrefix, dns: with()}, want: Deny, reason: ReasonNotANode},
		{name: "not in system:nodes", req: request{groups: []string{"system:authenticated"}, dns: with()}, want: Deny, reason: ReasonNotInNodesGroup},
		{name: "other organization", req: request{orgs: []string{nodesGroup, "system:masters"}, dns: with()}, want: Deny, reason: ReasonSubjectMismatch, message: "subject O"},
		{name: "client auth too", req: request{dns: with(), usages: []certificatesv1.KeyUsage{ds, sa, ca}}, want: Deny, reason: ReasonBadUsages, message: `"client auth"`},
		{name: "no server auth", req: request{dns: with(), usages: []certificatesv1.KeyUsage{ds, ke}}, want: Deny, reason: ReasonBadUsages, message: "lack"},
		{name: "email SAN", req: request{dns: with(), emails: []string{"root@example.com"}}, want: Deny, reason: ReasonForbiddenSAN},
		{name: "URI SAN", req: request{dns: with(), uris: []string{"spiffe://cluster.local/ns/default/sa/x"}}, want: Deny, reason: ReasonForbiddenSAN},
		{name: "node not registered yet", nodes: []string{nodeB}, req: request{dns: with(nodeA)}, want: Wait, reason: ReasonUnknownNode},
		{name: "node not registered, and client auth", nodes: []string{nodeB}, req: request{dns: with(nodeA), usages: []certificatesv1.KeyUsage{ds, sa, ca}}, want: Deny, reason: ReasonBadUsages},
		{name: "bad signature", req: request{dns: with(), tamper: true}, want: Deny, reason: ReasonBadRequest},
		{name: "every failure listed", req: request{cn: nodeUserPrefix + nodeB, dns: with("evil.example"), ips: []string{"8.8.8.8"}},
			want: Deny, reason: ReasonSubjectMismatch, message: `ForeignDNSName: DNS SAN "evil.example" is neither an in-cluster name of the apiserver, localhost, nor the name or a DNS address of node edge-a; ForeignIPAddress: IP SAN 8.8.8.8`},

		{name: "kubelet's own", req: request{dns: []string{nodeA, "edge-a.shop.example"}, ips: []string{"192.168.1.10"}}, want: Ignore},
		{name: "kubelet's own, foreign names", req: request{dns: []string{"evil.example"}, ips: []string{"8.8.8.8"}}, want: Ignore},
		{name: "other signer", req: request{signer: certificatesv1.KubeAPIServerClientSignerName, dns: with()}, want: Ignore},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nodes := tt.nodes
			if nodes == nil {
				nodes = []string{nodeA, nodeB}
			}
			facts, asked := world(tt.domain, nodes...)
			d, err := Decide(csrOf(t, tt.req), facts)
			if err != nil {
				t.Fatal(err)
			}
			if d.Verdict != tt.want {
				t.Fatalf("verdict %v (%s: %s), want %v", d.Verdict, d.Reason, d.Message, tt.want)
			}
			if tt.reason != "" && d.Reason != tt.reason {
				t.Errorf("reason %q, want %q; message %s", d.Reason, tt.reason, d.Message)
			}
			if !strings.Contains(d.Message, tt.message) {
				t.Errorf("message %q lacks %q", d.Message, tt.message)
			}
			if tt.want == Ignore && len(*asked) > 0 {
				t.Errorf("an ignored CSR read nodes %v", *asked)
			}
		})
	}
}

func TestDecideFactErrors(t *testing.T) {
	boom := errors.New("boom")
	facts, _ := world("", nodeA)
	facts.ServiceIPs = func() ([]net.IP, error) { return nil, boom }
	if _, err := Decide(csrOf(t, request{ips: []string{vip}}), facts); !errors.Is(err, boom) {
		t.Errorf("Service error: got %v", err)
	}
	facts, _ = world("", nodeA)
	facts.Node = func(string) (*corev1.Node, error) { return nil, boom }
	if _, err := Decide(csrOf(t, request{dns: inCluster}), facts); !errors.Is(err, boom) {
		t.Errorf("Node error: got %v", err)
	}
	// DNS names alone need no Service.
	facts, _ = world("", nodeA)
	facts.ServiceIPs = func() ([]net.IP, error) { return nil, boom }
	if d, err := Decide(csrOf(t, request{dns: inCluster}), facts); err != nil || d.Verdict != Approve {
		t.Errorf("DNS names only: %v %v", d, err)
	}
}

func TestInClusterNames(t *testing.T) {
	got := strings.Join(InClusterNames("edge.example"), ",")
	if want := "kubernetes,kubernetes.default,kubernetes.default.svc,kubernetes.default.svc.edge.example"; got != want {
		t.Errorf("got %s, want %s", got, want)
	}
	if got := InClusterNames("")[3]; got != "kubernetes.default.svc.cluster.local" {
		t.Errorf("default domain: %s", got)
	}
}
