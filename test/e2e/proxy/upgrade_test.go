package proxy_test

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestExecUpgradeThroughApiserver: an exec over SPDY, as client-go's
// SPDY executor and kubectl without WebSockets make it, goes through
// outpost and the real apiserver to the pod's kubelet and back as a
// bidirectional stream, as it does directly. The kubelet is a stand-in on
// loopback that upgrades and echoes in upper case; the apiserver finds it
// from its Node, as it finds a real kubelet.
func TestExecUpgradeThroughApiserver(t *testing.T) {
	ctx := t.Context()
	kubelet := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/exec/upgrades/echo/") || r.Header.Get("Upgrade") != "SPDY/3.1" {
			http.Error(w, "not an exec upgrade: "+r.Method+" "+r.URL.Path+" "+r.Header.Get("Upgrade"), http.StatusBadRequest)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		_, _ = io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n")
		buf := make([]byte, 64)
		for {
			n, err := brw.Read(buf)
			if err != nil {
				return
			}
			_, _ = conn.Write([]byte(strings.ToUpper(string(buf[:n]))))
		}
	}))
	kubelet.StartTLS()
	defer kubelet.Close()
	port, _ := strconv.Atoi(kubelet.URL[strings.LastIndexByte(kubelet.URL, ':')+1:])

	c := cp.Client()
	const node, ns = "upgrade-node", "upgrades"
	n, err := c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.CoreV1().Nodes().Delete(ctx, node, metav1.DeleteOptions{}) }()
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"}}
	n.Status.DaemonEndpoints.KubeletEndpoint.Port = int32(port)
	if _, err := c.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := cp.EnsureNamespace(ctx, ns); err != nil { // with its default service account
		t.Fatal(err)
	}
	if _, err := c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "none"}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	o := cp.StartOutpostT(t, "edge-upgrades", framework.LenientProbes...)
	token := adminToken(t)
	for _, path := range []struct{ name, url, ca string }{{"direct", cp.URL(0), cp.CAFile}, {"outpost", o.URL, o.ServingCAFile}} {
		t.Run(path.name, func(t *testing.T) {
			addr := strings.TrimPrefix(path.url, "https://")
			conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{RootCAs: framework.CertPool(t, path.ca), NextProtos: []string{"http/1.1"}})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
			_, _ = io.WriteString(conn, "POST /api/v1/namespaces/"+ns+"/pods/echo/exec?command=sh&container=c&stdin=true&stdout=true HTTP/1.1\r\n"+
				"Host: "+addr+"\r\nAuthorization: Bearer "+token+"\r\n"+
				"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n")
			br := bufio.NewReader(conn)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != http.StatusSwitchingProtocols {
				b, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %s: %s", resp.Status, b)
			}
			for _, msg := range []string{"hello", "second frame"} {
				_, _ = io.WriteString(conn, msg)
				buf := make([]byte, len(msg))
				if _, err := io.ReadFull(br, buf); err != nil {
					t.Fatal(err)
				}
				if string(buf) != strings.ToUpper(msg) {
					t.Fatalf("echo %q, want %q", buf, strings.ToUpper(msg))
				}
			}
		})
	}
}
