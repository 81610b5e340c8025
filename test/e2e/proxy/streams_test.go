package proxy_test

import (
	"compress/gzip"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestProtobufAndHTTP2: protobuf lists and many concurrent HTTP/2 streams
// through outpost give what direct access gives.
func TestProtobufAndHTTP2(t *testing.T) {
	ctx := t.Context()
	// Lenient probes: this test is about encodings and streams, and a
	// probe timing out on a loaded machine would send a read to the cache.
	o := cp.StartOutpostT(t, "edge-streams", framework.LenientProbes...)
	token := adminToken(t)
	const ns = "streams"
	createNamespace(t, ns)
	for i := range 50 {
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cm-%02d", i)}, Data: map[string]string{"i": fmt.Sprint(i)}}
		if _, err := cp.Client().CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	viaCfg := o.ClientConfig("", "", token)
	viaCfg.ContentType = runtime.ContentTypeProtobuf
	viaCfg.AcceptContentTypes = runtime.ContentTypeProtobuf
	via := kubernetes.NewForConfigOrDie(viaCfg)
	list, err := via.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	directList, err := cp.Client().CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{ResourceVersion: list.ResourceVersion, ResourceVersionMatch: metav1.ResourceVersionMatchExact})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 50 || len(directList.Items) != 50 {
		t.Fatalf("protobuf list through outpost: %d items, direct %d; want 50", len(list.Items), len(directList.Items))
	}
	for i := range list.Items {
		if list.Items[i].Name != directList.Items[i].Name || list.Items[i].Data["i"] != directList.Items[i].Data["i"] {
			t.Fatalf("item %d differs: %v vs %v", i, list.Items[i].Name, directList.Items[i].Name)
		}
	}

	// 200 concurrent requests on HTTP/2 streams, with gzip asked for.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: framework.CertPool(t, o.ServingCAFile)}, ForceAttemptHTTP2: true, DisableCompression: true}}
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for i := range 200 {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, o.URL+"/api/v1/namespaces/"+ns+"/configmaps/"+fmt.Sprintf("cm-%02d", i%50), nil)
			req.Header.Set("Authorization", "Bearer "+token)
			resp, err := hc.Do(req)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			_, _ = io.Copy(io.Discard, resp.Body)
			if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
				errs <- fmt.Errorf("request %d: %s over %s", i, resp.Status, resp.Proto)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	// A large answer comes gzipped when the client asks, as directly.
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, o.URL+"/openapi/v2", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Accept-Encoding", "gzip")
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.Header.Get("Content-Encoding") != "gzip" {
		t.Fatalf("openapi through outpost with gzip asked: Content-Encoding %q", resp.Header.Get("Content-Encoding"))
	}
	zr, err := gzip.NewReader(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, zr)
	if err != nil || n < 100000 {
		t.Fatalf("gunzipped openapi: %d bytes, %v", n, err)
	}
}
