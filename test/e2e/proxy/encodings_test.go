package proxy_test

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestAnswersSameAsDirect: for each way a client may ask (the encodings and
// the Table, PartialObjectMetadata and CBOR forms of a list, gzip, errors),
// outpost's answer is the apiserver's: the same status, Content-Type,
// Content-Encoding and body, byte for byte.
func TestAnswersSameAsDirect(t *testing.T) {
	ctx := t.Context()
	o := cp.StartOutpostT(t, "edge-encodings", framework.LenientProbes...)
	token := adminToken(t)
	const ns = "encodings"
	createNamespace(t, ns)
	for i := range 300 { // past kube-apiserver's 128 KiB threshold for gzip
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cm-%03d", i), Labels: map[string]string{"app": "enc"}},
			Data: map[string]string{"payload": string(bytes.Repeat([]byte{'a' + byte(i%26)}, 600))}}
		if _, err := cp.Client().CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	client := func(caFile string) *http.Client {
		return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: framework.CertPool(t, caFile)}, ForceAttemptHTTP2: true, DisableCompression: true}}
	}
	direct, via := client(cp.CAFile), client(o.ServingCAFile)
	type answer struct {
		code                  int
		contentType, encoding string
		body                  []byte
	}
	ask := func(c *http.Client, base, path, accept, encoding string) answer {
		t.Helper()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
		req.Header.Set("Authorization", "Bearer "+token)
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		if encoding != "" {
			req.Header.Set("Accept-Encoding", encoding)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return answer{resp.StatusCode, resp.Header.Get("Content-Type"), resp.Header.Get("Content-Encoding"), body}
	}
	same := func(a, b answer) bool {
		if a.code != b.code || a.contentType != b.contentType || a.encoding != b.encoding {
			return false
		}
		if a.contentType == "application/cbor" {
			// kube-apiserver writes the keys of CBOR maps in no fixed
			// order: two direct answers differ in bytes. Compare what
			// they say.
			var x, y any
			return cbor.Unmarshal(a.body, &x) == nil && cbor.Unmarshal(b.body, &y) == nil && reflect.DeepEqual(x, y)
		}
		return bytes.Equal(a.body, b.body)
	}
	list := "/api/v1/namespaces/" + ns + "/configmaps"
	for _, c := range []struct{ name, path, accept, encoding string }{
		{"json list", list, "application/json", ""},
		{"protobuf list", list, "application/vnd.kubernetes.protobuf", ""},
		{"gzipped list", list, "application/json", "gzip"},
		{"cbor list", list, "application/cbor", ""},
		{"cbor object", list + "/cm-042", "application/cbor", ""},
		{"table", list + "?labelSelector=app%3Denc&limit=50", "application/json;as=Table;v=v1;g=meta.k8s.io", ""},
		{"partial object metadata", list + "?fieldSelector=metadata.name%3Dcm-007", "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io", ""},
		{"protobuf partial object metadata", list, "application/vnd.kubernetes.protobuf;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io", ""},
		{"object", list + "/cm-042", "application/json", ""},
		{"not found", list + "/missing", "application/json", ""},
		{"bad selector", list + "?labelSelector=%3D%3D", "application/json", ""},
		{"unknown subresource", "/api/v1/namespaces/" + ns + "/configmaps/cm-001/nosuchsubresource", "", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			// A write elsewhere in the cluster (the apiservers' leases) may
			// move a list's resourceVersion between two asks: outpost's
			// answer must equal a direct one made just before or after.
			var before, through, after answer
			for range 3 {
				before = ask(direct, cp.URL(0), c.path, c.accept, c.encoding)
				through = ask(via, o.URL, c.path, c.accept, c.encoding)
				after = ask(direct, cp.URL(0), c.path, c.accept, c.encoding)
				if through.code == http.StatusNotAcceptable && c.accept == "application/cbor" {
					t.Fatalf("the apiserver does not serve CBOR: %s", through.body)
				}
				if same(through, before) || same(through, after) {
					t.Logf("%d %s %s, %d bytes", through.code, through.contentType, through.encoding, len(through.body))
					return
				}
			}
			t.Fatalf("through outpost: %d %q %q %d bytes %.200q\ndirect: %d %q %q %d bytes %.200q",
				through.code, through.contentType, through.encoding, len(through.body), through.body,
				after.code, after.contentType, after.encoding, len(after.body), after.body)
		})
	}
}
