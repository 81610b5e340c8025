// Package nodecert_test proves outpost's node identity end to end against a
// real kube-apiserver and kube-controller-manager: TLS bootstrap with a
// bootstrap token, renewal of a short-lived certificate under a running
// informer, the serving certificate by a kubelet-serving CSR, and the
// plain-HTTP port acting as this node only.
package nodecert_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

// certLifetime is what kube-controller-manager signs for: short, so that a
// renewal (at 70-90% of the life) happens within a test.
const certLifetime = 60 * time.Second

func TestMain(m *testing.M) {
	os.Exit(framework.Run(m, framework.Options{
		ControllerManager:     true,
		ControllerManagerArgs: []string{"--cluster-signing-duration=" + certLifetime.String()},
	}, &cp))
}

// startOutpost starts outpost for node, with only a bootstrap token or
// with the node's credentials, until the test ends. Its probes are lenient:
// these tests are not about health.
func startOutpost(t *testing.T, bootstrap bool, node string, args ...string) *framework.Outpost {
	t.Helper()
	start := cp.StartOutpostT
	if bootstrap {
		start = cp.StartOutpostBootstrapT
	}
	return start(t, node, append(slices.Clone(framework.LenientProbes), args...)...)
}

// waitUntil polls cond every 200ms until it holds or timeout passes.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	if _, err := framework.Poll(t.Context(), 200*time.Millisecond, timeout, func(context.Context) (bool, string) { return cond() }); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// nodeClient is a client through outpost acting as the node (the test CA's
// node certificate, as kubelet would hold).
func nodeClient(o *framework.Outpost) kubernetes.Interface {
	return kubernetes.NewForConfigOrDie(o.ClientConfig(o.NodeCertFile, o.NodeKeyFile, ""))
}

func csrsBy(t *testing.T, user, signer string) []certificatesv1.CertificateSigningRequest {
	t.Helper()
	list, err := cp.Client().CertificatesV1().CertificateSigningRequests().List(t.Context(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out []certificatesv1.CertificateSigningRequest
	for _, c := range list.Items {
		if c.Spec.Username == user && c.Spec.SignerName == signer {
			out = append(out, c)
		}
	}
	return out
}

func approved(c certificatesv1.CertificateSigningRequest) bool {
	for _, cond := range c.Status.Conditions {
		if cond.Type == certificatesv1.CertificateApproved {
			return true
		}
	}
	return false
}

func rotations(t *testing.T, o *framework.Outpost, name string) float64 {
	t.Helper()
	v, err := o.Metric("outpost_certificate_rotations_total", "name="+name)
	if err != nil {
		return -1
	}
	return v
}

func currentLeaf(t *testing.T, o *framework.Outpost) *x509.Certificate {
	t.Helper()
	path := filepath.Join(o.DataDir, "pki", "node-client-current.pem")
	pair, err := tls.LoadX509KeyPair(path, path)
	if err != nil {
		return nil
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return leaf
}

// TestBootstrapAndRotation joins a node with nothing but a bootstrap token:
// outpost files the node client CSR kubelet would, kube-controller-manager
// approves and signs it, outpost serves with it and writes its kubeconfig.
// The certificate lives 60 s; an informer through outpost keeps running
// without a single watch error across the renewal and past the first
// certificate's expiry, and sees every object created meanwhile.
func TestBootstrapAndRotation(t *testing.T) {
	const node = "boot-node"
	o := startOutpost(t, true, node)

	var first *x509.Certificate
	waitUntil(t, 60*time.Second, "the bootstrapped node certificate", func() (bool, string) {
		first = currentLeaf(t, o)
		if first == nil {
			return false, "no node-client-current.pem yet"
		}
		return true, ""
	})
	if first.Subject.CommonName != "system:node:"+node || !slices.Equal(first.Subject.Organization, []string{"system:nodes"}) {
		t.Fatalf("certificate subject %s; want CN=system:node:%s, O=system:nodes", first.Subject, node)
	}
	if err := first.CheckSignatureFrom(caCert(t)); err != nil {
		t.Fatalf("node certificate not signed by the cluster CA: %v", err)
	}
	bootUser := "system:bootstrap:" + strings.Split(cp.BootstrapToken, ".")[0]
	boot := csrsBy(t, bootUser, certificatesv1.KubeAPIServerClientKubeletSignerName)
	if len(boot) != 1 || !approved(boot[0]) {
		t.Fatalf("want one approved kubelet client CSR filed by %s, got %d", bootUser, len(boot))
	}

	// Keys readable by root only; the data dir too.
	for _, p := range []string{filepath.Join(o.DataDir, "pki", "node-client-current.pem"), o.Kubeconfig} {
		var fi os.FileInfo
		waitUntil(t, 10*time.Second, p, func() (bool, string) {
			var err error
			fi, err = os.Stat(p)
			return err == nil, fmt.Sprint(err)
		})
		if fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %v; want no access for group or others", p, fi.Mode().Perm())
		}
	}
	if fi, err := os.Stat(o.DataDir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("data dir mode: %v %v; want 0700", fi.Mode().Perm(), err)
	}

	// The kubeconfig outpost wrote acts as the node against the apiserver.
	written, err := clientcmd.BuildConfigFromFlags("", o.Kubeconfig)
	if err != nil {
		t.Fatalf("kubeconfig outpost wrote: %v", err)
	}
	ssr, err := kubernetes.NewForConfigOrDie(written).AuthenticationV1().SelfSubjectReviews().Create(t.Context(), &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil || ssr.Status.UserInfo.Username != "system:node:"+node {
		t.Fatalf("written kubeconfig authenticates as %v (%v); want system:node:%s", ssr, err, node)
	}

	// The Node object, so that kube-controller-manager's pod GC keeps the
	// pods bound to it.
	cp.CreateNode(t, node, nil)

	// An informer through outpost, as the node.
	client := nodeClient(o)
	var watchErrors atomic.Int32
	var mu sync.Mutex
	var errs []string
	// The node authorizer lets a node list only the pods bound to it, as
	// kubelet does.
	factory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = "spec.nodeName=" + node
	}))
	inf := factory.Core().V1().Pods().Informer()
	_ = inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		watchErrors.Add(1)
		mu.Lock()
		errs = append(errs, err.Error())
		mu.Unlock()
	})
	ctx, cancel := context.WithCancel(t.Context())
	factory.Start(ctx.Done())
	defer func() {
		cancel()
		factory.Shutdown()
	}()
	syncCtx, syncCancel := context.WithTimeout(ctx, time.Minute)
	defer syncCancel()
	if !cache.WaitForCacheSync(syncCtx.Done(), inf.HasSynced) {
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("informer did not sync through outpost: %v", errs)
	}

	// Create a pod bound to the node every second until the certificate was renewed and the
	// first one has expired (plus a margin), while reads go on.
	admin := cp.Client()
	var created []string
	var reads, readFailures int
	end := first.NotAfter.Add(5 * time.Second)
	limit := time.Now().Add(3 * certLifetime)
	for i := 0; ; i++ {
		name := fmt.Sprintf("rot-%03d", i)
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.PodSpec{NodeName: node,
			Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/none"}}}}
		if _, err := admin.CoreV1().Pods("default").Create(t.Context(), pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		created = append(created, "default/"+name)
		t.Cleanup(func() {
			_ = admin.CoreV1().Pods("default").Delete(context.Background(), name, *metav1.NewDeleteOptions(0))
		})
		for range 4 {
			reads++
			// A 403 is the apiserver's answer while its node authorizer
			// has not yet seen the pod's binding: answered, not dropped.
			if _, err := client.CoreV1().Pods("default").Get(t.Context(), name, metav1.GetOptions{}); err != nil && !apierrors.IsForbidden(err) {
				readFailures++
				t.Logf("read through outpost failed: %v", err)
			}
			time.Sleep(250 * time.Millisecond)
		}
		if time.Now().After(end) && rotations(t, o, "node-client") >= 1 {
			break
		}
		if time.Now().After(limit) {
			t.Fatalf("no renewal within %s (rotations %v)", 3*certLifetime, rotations(t, o, "node-client"))
		}
	}
	second := currentLeaf(t, o)
	if second.SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Fatal("the node certificate was not renewed")
	}
	renewals := csrsBy(t, "system:node:"+node, certificatesv1.KubeAPIServerClientKubeletSignerName)
	if len(renewals) == 0 || !approved(renewals[0]) {
		t.Fatalf("want an approved renewal CSR filed by the node itself, got %d", len(renewals))
	}

	waitUntil(t, 20*time.Second, "the informer to see every pod created", func() (bool, string) {
		if n := watchErrors.Load(); n != 0 {
			mu.Lock()
			defer mu.Unlock()
			return false, fmt.Sprintf("%d watch errors: %v", n, errs)
		}
		for _, n := range created {
			if _, ok, _ := inf.GetStore().GetByKey(n); !ok {
				l, err := client.CoreV1().Pods("").List(t.Context(), metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
				return false, fmt.Sprintf("%s missing; the informer holds %d pods; a list through outpost now: %d pods (%v)", n, len(inf.GetStore().ListKeys()), len(l.Items), err)
			}
		}
		return true, ""
	})
	if n := watchErrors.Load(); n != 0 {
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("%d watch errors across the renewal: %v", n, errs)
	}
	if readFailures > 0 {
		t.Errorf("%d of %d reads through outpost failed across the renewal", readFailures, reads)
	}
	t.Logf("first certificate expired %s; renewals %v; %d pods seen by the informer; %d reads, %d failed; 0 watch errors",
		first.NotAfter.Format(time.TimeOnly), rotations(t, o, "node-client"), len(created), reads, readFailures)

	// A second renewal: three pairs written (the bootstrap one and two
	// renewals), the oldest removed, the link on the newest.
	waitUntil(t, 2*certLifetime, "a second renewal", func() (bool, string) {
		n := rotations(t, o, "node-client")
		return n >= 2, fmt.Sprintf("%v renewals", n)
	})
	pki := filepath.Join(o.DataDir, "pki")
	entries, err := os.ReadDir(pki)
	if err != nil {
		t.Fatal(err)
	}
	var pairs []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "node-client-") && e.Name() != "node-client-current.pem" && strings.HasSuffix(e.Name(), ".pem") {
			pairs = append(pairs, e.Name())
		}
	}
	current, err := os.Readlink(filepath.Join(pki, "node-client-current.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if len(pairs) != 2 || pairs[1] != current {
		t.Fatalf("after two renewals %s holds node client pairs %v (current %s); want the previous and the current one", pki, pairs, current)
	}
}

func caCert(t *testing.T) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(cp.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatal("no PEM block in the CA file")
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestServingCertificateByCSR: with --rotate-server-certificates outpost
// files a kubelet-serving CSR for its SANs; until someone approves it (kube-
// controller-manager does not, as for kubelet) it serves its self-signed
// certificate, and then the one the cluster CA signed.
func TestServingCertificateByCSR(t *testing.T) {
	const node = "serve-node"
	o := startOutpost(t, false, node, "--rotate-server-certificates", "--node-ip=127.0.0.1")
	addr := strings.TrimPrefix(o.URL, "https://")
	dial := func(roots *x509.CertPool) (*x509.Certificate, error) {
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"})
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0], nil
	}
	if _, err := dial(framework.CertPool(t, cp.CAFile)); err == nil {
		t.Fatal("outpost served a cluster-signed certificate before any CSR was approved")
	}

	var req certificatesv1.CertificateSigningRequest
	waitUntil(t, 30*time.Second, "a kubelet-serving CSR from the node", func() (bool, string) {
		l := csrsBy(t, "system:node:"+node, certificatesv1.KubeletServingSignerName)
		if len(l) == 0 {
			return false, "none yet"
		}
		req = l[0]
		return true, ""
	})
	req.Status.Conditions = append(req.Status.Conditions, certificatesv1.CertificateSigningRequestCondition{
		Type: certificatesv1.CertificateApproved, Status: corev1.ConditionTrue, Reason: "E2EApproved", Message: "approved by the e2e test"})
	if _, err := cp.Client().CertificatesV1().CertificateSigningRequests().UpdateApproval(t.Context(), req.Name, &req, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}

	var leaf *x509.Certificate
	waitUntil(t, 30*time.Second, "outpost to serve the cluster-signed certificate", func() (bool, string) {
		var err error
		leaf, err = dial(framework.CertPool(t, cp.CAFile))
		return err == nil, fmt.Sprint(err)
	})
	if leaf.Subject.CommonName != "system:node:"+node {
		t.Errorf("serving certificate CN %q", leaf.Subject.CommonName)
	}
	for _, want := range []string{"localhost", node} {
		if !slices.Contains(leaf.DNSNames, want) {
			t.Errorf("serving certificate DNS SANs %v lack %s", leaf.DNSNames, want)
		}
	}
	if !slices.ContainsFunc(leaf.IPAddresses, func(ip net.IP) bool { return ip.Equal(net.ParseIP("127.0.0.1")) }) {
		t.Errorf("serving certificate IP SANs %v lack 127.0.0.1", leaf.IPAddresses)
	}

	// A client trusting only the cluster CA now talks to outpost.
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := framework.WriteKubeconfig(path, o.URL, cp.CAFile, o.NodeCertFile, o.NodeKeyFile, ""); err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		t.Fatal(err)
	}
	ssr, err := kubernetes.NewForConfigOrDie(cfg).AuthenticationV1().SelfSubjectReviews().Create(t.Context(), &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil || ssr.Status.UserInfo.Username != "system:node:"+node {
		t.Fatalf("a request through outpost trusting the cluster CA only: %v %v", ssr, err)
	}
}

// TestInsecurePortActsAsThisNode: the plain-HTTP port, when enabled, is
// this node's kubelet and nothing more. Whatever credentials a caller
// sends there are dropped; the apiserver's node authorizer then limits it
// to what this node may do.
func TestInsecurePortActsAsThisNode(t *testing.T) {
	const node = "plain-node"
	insecure := "127.0.0.1:" + strconv.Itoa(framework.FreePort(t))
	startOutpost(t, false, node, "--insecure-address="+insecure)
	base := "http://" + insecure

	ctx := t.Context()
	admin := cp.Client()
	token := cp.ServiceAccountToken(t, "default", "plain-admin", "cluster-admin")
	if _, err := admin.CoreV1().Secrets("default").Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "not-for-nodes"},
		StringData: map[string]string{"k": "v"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	do := func(method, path, body string, header http.Header) (int, string) {
		req, err := http.NewRequestWithContext(ctx, method, base+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header = header.Clone()
		if req.Header == nil {
			req.Header = http.Header{}
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	review := `{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`
	for _, h := range []http.Header{nil, {"Authorization": {"Bearer " + token}}, {"User-Agent": {"kubectl/v1.37.2"}}} {
		code, body := do(http.MethodPost, "/apis/authentication.k8s.io/v1/selfsubjectreviews", review, h)
		if code != http.StatusCreated || !strings.Contains(body, `"username":"system:node:`+node+`"`) {
			t.Fatalf("self review on the plain port with headers %v: %d %s; want system:node:%s", h, code, body, node)
		}
	}
	// An admin's token does not lend its rights through the plain port.
	code, body := do(http.MethodGet, "/api/v1/namespaces/default/secrets/not-for-nodes", "", http.Header{"Authorization": {"Bearer " + token}})
	if code != http.StatusForbidden || !strings.Contains(body, "system:node:"+node) {
		t.Fatalf("secret not bound to this node via the plain port: %d %s; want 403 for system:node:%s", code, body, node)
	}
	if bytes.Contains([]byte(body), []byte(`"k":`)) {
		t.Fatal("secret data leaked through the plain port")
	}
	// What this node may read, it reads: its own Node object.
	cp.CreateNode(t, node, nil)
	code, body = do(http.MethodGet, "/api/v1/nodes/"+node, "", nil)
	if code != http.StatusOK || !strings.Contains(body, `"name":"`+node+`"`) {
		t.Fatalf("get own node via the plain port: %d %s", code, body)
	}
}
