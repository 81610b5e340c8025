// Package csr tests outpost-controller's approval of outposts' serving
// certificates against a real control plane: kube-apiserver, with its
// Node authorizer and CSR approval admission, and kube-controller-manager,
// which signs kubelet-serving CSRs with the cluster CA once approved. The
// controller runs as its own binary with the RBAC of deploy/rbac.yaml;
// nodes file CSRs with the client certificates a kubelet would hold.
package csr

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/internal/cloud/csrapproval"
	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	code := framework.Run(m, framework.Options{ControllerManager: true}, &cp)
	os.Exit(code)
}

const (
	nodeA      = "edge-a"
	nodeB      = "edge-b"
	nodeAIP    = "192.168.50.10"
	linkLocal  = "169.254.2.1" // where pods of the node reach its outpost
	sneakySA   = "system:serviceaccount:default:sneaky"
	pendingFor = 5 * time.Second // how long an ignored CSR must stay pending after the rest were decided
)

var inCluster = []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}

// filing is one CSR the test files and what it expects of it.
type filing struct {
	name   string
	client kubernetes.Interface
	cn     string
	dns    []string
	ips    []string
	want   certificatesv1.RequestConditionType // "" means left pending
	reason string                              // of the condition

	key    crypto.Signer
	csr    string // the name the apiserver gave it
	parsed *x509.CertificateRequest
}

func TestServingCSRs(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	admin := cp.Client()
	begin := time.Now()
	step := func(format string, args ...any) {
		t.Logf("%6.1fs "+format, append([]any{time.Since(begin).Seconds()}, args...)...)
	}

	// Two nodes, as kubelets would register them.
	for name, ip := range map[string]string{nodeA: nodeAIP, nodeB: "192.168.50.20"} {
		n, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}, {Type: corev1.NodeHostName, Address: name}}
		if _, err := admin.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	svc, err := admin.CoreV1().Services(metav1.NamespaceDefault).Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := svc.Spec.ClusterIP

	// A service account that may file CSRs (as a bootstrapper may).
	if _, err := admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "sneaky-csr"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:node-bootstrapper"},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: sneakySA}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	saConfig := cp.AdminConfig()
	saConfig.Impersonate = rest.ImpersonationConfig{UserName: sneakySA, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated"}}
	asSA := kubernetes.NewForConfigOrDie(saConfig)
	asA, asB := nodeClient(t, nodeA), nodeClient(t, nodeB)

	own := append(slices.Clone(inCluster), nodeA, "localhost")
	filings := []*filing{
		{name: "own", client: asA, dns: own, ips: []string{vip, linkLocal, "127.0.0.1", nodeAIP},
			want: certificatesv1.CertificateApproved, reason: csrapproval.ReasonApproved},
		{name: "foreign IP", client: asA, dns: own, ips: []string{vip, linkLocal, "203.0.113.7"},
			want: certificatesv1.CertificateDenied, reason: csrapproval.ReasonForeignIPAddress},
		{name: "foreign DNS", client: asA, dns: append(slices.Clone(own), "apiserver.example.com"),
			want: certificatesv1.CertificateDenied, reason: csrapproval.ReasonForeignDNSName},
		{name: "another node's name", client: asA, dns: append(slices.Clone(own), nodeB),
			want: certificatesv1.CertificateDenied, reason: csrapproval.ReasonForeignDNSName},
		{name: "another node", client: asB, cn: "system:node:" + nodeA, dns: own,
			want: certificatesv1.CertificateDenied, reason: csrapproval.ReasonSubjectMismatch},
		{name: "service account", client: asSA, dns: own,
			want: certificatesv1.CertificateDenied, reason: csrapproval.ReasonNotANode},
		{name: "kubelet's own", client: asA, dns: []string{nodeA}, ips: []string{nodeAIP}},
	}
	// Filed before any controller decides: the first one is left alone
	// by a controller told not to approve, and found on the list of the
	// next one; the rest are seen by its watch.
	early := []*filing{filings[0], filings[len(filings)-1]}
	for _, f := range early {
		f.file(ctx, t)
	}
	off := cp.StartControllerT(t, "--approve-outpost-serving-csrs=false", "--leader-elect=false")
	time.Sleep(pendingFor)
	for _, f := range early {
		if csr, err := admin.CertificatesV1().CertificateSigningRequests().Get(ctx, f.csr, metav1.GetOptions{}); err != nil || len(csr.Status.Conditions) > 0 {
			t.Errorf("%s: %v, %v; want it pending while approval is off", f.name, csr.Status.Conditions, err)
		}
	}
	if body, err := framework.GetOK(ctx, nil, off.MetricsURL+"/metrics"); err != nil || strings.Contains(string(body), "outpost_controller_csr_decisions_total") {
		t.Errorf("with approval off, /metrics: %v; want no outpost_controller_csr_decisions_total", err)
	}
	off.Stop(t)
	step("with --approve-outpost-serving-csrs=false, nothing decided in %v", pendingFor)

	ctrl := cp.StartControllerT(t)
	step("outpost-controller leading")
	for _, f := range filings {
		if !slices.Contains(early, f) {
			f.file(ctx, t)
		}
	}
	step("filed %d CSRs", len(filings))

	for _, f := range filings {
		if f.want == "" {
			continue
		}
		framework.WaitFor(ctx, t, f.name+" CSR "+string(f.want), func(ctx context.Context) (bool, error) {
			csr, err := admin.CertificatesV1().CertificateSigningRequests().Get(ctx, f.csr, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			for _, c := range csr.Status.Conditions {
				if c.Type == certificatesv1.CertificateApproved || c.Type == certificatesv1.CertificateDenied {
					if c.Type != f.want || c.Reason != f.reason {
						return false, fmt.Errorf("%s: condition %s %s: %s; want %s %s", f.name, c.Type, c.Reason, c.Message, f.want, f.reason)
					}
					t.Logf("%s: %s %s: %s", f.name, c.Type, c.Reason, c.Message)
					return f.want == certificatesv1.CertificateDenied || len(csr.Status.Certificate) > 0, nil
				}
			}
			return false, nil
		})
	}
	step("every CSR claiming the in-cluster names decided; the approved one signed")

	// The approved certificate: issued by kube-controller-manager with the
	// cluster CA, for our key, with every name asked for, and good for
	// what in-cluster clients check.
	approved := filings[0]
	csr, err := admin.CertificatesV1().CertificateSigningRequests().Get(ctx, approved.csr, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(csr.Status.Certificate)
	if block == nil {
		t.Fatalf("status.certificate is not PEM: %q", csr.Status.Certificate)
	}
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !leaf.PublicKey.(*ecdsa.PublicKey).Equal(approved.key.Public()) {
		t.Error("the certificate is not for the requested key")
	}
	if leaf.Subject.CommonName != "system:node:"+nodeA {
		t.Errorf("subject %s", leaf.Subject)
	}
	if !slices.Equal(leaf.DNSNames, approved.parsed.DNSNames) {
		t.Errorf("DNS SANs %v, want %v", leaf.DNSNames, approved.parsed.DNSNames)
	}
	if !slices.EqualFunc(leaf.IPAddresses, approved.parsed.IPAddresses, net.IP.Equal) {
		t.Errorf("IP SANs %v, want %v", leaf.IPAddresses, approved.parsed.IPAddresses)
	}
	roots := framework.CertPool(t, cp.CAFile)
	for _, name := range append(slices.Clone(inCluster), vip, linkLocal) {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: name, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			t.Errorf("as %s, the certificate does not verify against the cluster CA: %v", name, err)
		}
	}

	// An event on each decided CSR, and a log line, once.
	for _, f := range filings {
		if f.want == "" {
			continue
		}
		wantType, wantReason := corev1.EventTypeWarning, csrapproval.EventDenied
		if f.want == certificatesv1.CertificateApproved {
			wantType, wantReason = corev1.EventTypeNormal, csrapproval.EventApproved
		}
		framework.WaitFor(ctx, t, "the event on the "+f.name+" CSR", func(ctx context.Context) (bool, error) {
			events, err := admin.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{FieldSelector: fields.Set{
				"involvedObject.kind": "CertificateSigningRequest", "involvedObject.name": f.csr,
			}.String()})
			if err != nil {
				return false, err
			}
			for _, e := range events.Items {
				if e.Type != wantType || e.Reason != wantReason || e.Count > 1 {
					return false, fmt.Errorf("%s: event %s %s (count %d): %s; want one %s %s", f.name, e.Type, e.Reason, e.Count, e.Message, wantType, wantReason)
				}
				if f.want == certificatesv1.CertificateDenied && !strings.Contains(e.Message, f.reason+": ") {
					return false, fmt.Errorf("%s: event message %q does not say which check failed (%s)", f.name, e.Message, f.reason)
				}
			}
			return len(events.Items) == 1, nil
		})
		verb := "denied"
		if f.want == certificatesv1.CertificateApproved {
			verb = "approved"
		}
		if n := strings.Count(ctrl.Log.String(), "csr="+f.csr+" "); n != 1 {
			t.Errorf("the %s CSR %s was logged %d times; want once (%s)", f.name, f.csr, n, verb)
		}
	}
	step("events and logs checked")

	// Kubelet's own serving CSR is not ours: still pending, no event.
	time.Sleep(pendingFor)
	kubelets := filings[len(filings)-1]
	csr, err = admin.CertificatesV1().CertificateSigningRequests().Get(ctx, kubelets.csr, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(csr.Status.Conditions) > 0 || len(csr.Status.Certificate) > 0 {
		t.Errorf("kubelet's own CSR: %+v; want it left pending", csr.Status)
	}
	if strings.Contains(ctrl.Log.String(), "csr="+kubelets.csr) {
		t.Errorf("kubelet's own CSR %s was logged", kubelets.csr)
	}
	events, err := admin.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + kubelets.csr})
	if err != nil {
		t.Fatal(err)
	}
	if len(events.Items) > 0 {
		t.Errorf("events on kubelet's own CSR: %v", events.Items)
	}
	step("kubelet's own CSR left pending for %v", time.Since(begin).Round(time.Second))

	body, err := framework.GetOK(ctx, nil, ctrl.MetricsURL+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for decision, want := range map[string]float64{"approved": 1, "denied": 5} {
		if v, err := framework.SumMetric(string(body), "outpost_controller_csr_decisions_total", `decision="`+decision+`"`); err != nil || v != want {
			t.Errorf("outpost_controller_csr_decisions_total{decision=%q} = %v, %v; want %v", decision, v, err, want)
		}
	}
}

// file files the CSR as its client, with a new key.
func (f *filing) file(ctx context.Context, t *testing.T) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cn := f.cn
	if cn == "" {
		cn = "system:node:" + nodeA
	}
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn, Organization: []string{"system:nodes"}}, DNSNames: f.dns}
	for _, s := range f.ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(s))
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	if f.parsed, err = x509.ParseCertificateRequest(der); err != nil {
		t.Fatal(err)
	}
	csr, err := f.client.CertificatesV1().CertificateSigningRequests().Create(ctx, &certificatesv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "csr-"},
		Spec: certificatesv1.CertificateSigningRequestSpec{
			Request:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}),
			SignerName: certificatesv1.KubeletServingSignerName,
			Usages:     []certificatesv1.KeyUsage{certificatesv1.UsageDigitalSignature, certificatesv1.UsageServerAuth},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("filing the %s CSR: %v", f.name, err)
	}
	f.key, f.csr = key, csr.Name
	t.Logf("filed %s as %s: %s", f.name, csr.Spec.Username, csr.Name)
}

// nodeClient is a client with the credentials a kubelet of node holds.
func nodeClient(t *testing.T, node string) kubernetes.Interface {
	t.Helper()
	crt, key, err := cp.NodeCredentials(node)
	if err != nil {
		t.Fatal(err)
	}
	return kubernetes.NewForConfigOrDie(&rest.Config{
		Host:            cp.URL(0),
		TLSClientConfig: rest.TLSClientConfig{CAFile: cp.CAFile, CertFile: crt, KeyFile: key},
	})
}
