package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/protobuf"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outposthq/outpost/internal/config"
	"github.com/outposthq/outpost/internal/local"
	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/reader"
	recording "github.com/outposthq/outpost/internal/recorder"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
	"github.com/outposthq/outpost/internal/upstream"
)

// BenchmarkProxy measures outpost's own cost per proxied request: a client
// and an apiserver stand-in speaking HTTP/2 over TLS, as in production, with
// the recorder and metrics on. The stand-in answers at once, so the time
// and allocations are the proxy's, the client's and the stand-in's; compare
// runs, not absolute values.
func BenchmarkProxy(b *testing.B) {
	get := protobufBody(b, &corev1.ConfigMap{TypeMeta: metav1.TypeMeta{Kind: "ConfigMap", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{Name: "target", Namespace: "bench", ResourceVersion: "42", Labels: map[string]string{"app": "bench"}},
		Data:       map[string]string{"k": "v"}})
	list := &corev1.ConfigMapList{TypeMeta: metav1.TypeMeta{Kind: "ConfigMapList", APIVersion: "v1"}, ListMeta: metav1.ListMeta{ResourceVersion: "43"}}
	for i := range 1000 {
		list.Items = append(list.Items, corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: "cm-" + strconv.Itoa(i), Namespace: "bench", ResourceVersion: strconv.Itoa(i + 1), Labels: map[string]string{"app": "bench"}},
			Data:       map[string]string{"payload": string(bytes.Repeat([]byte("x"), 256))}})
	}
	listBody := protobufBody(b, list)
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/vnd.kubernetes.protobuf")
		if r.URL.Path == "/api/v1/namespaces/bench/configmaps" {
			// Streamed, as kube-apiserver sends lists: no Content-Length.
			for chunk := range slices.Chunk(listBody, 16<<10) {
				_, _ = w.Write(chunk)
			}
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(get)))
		_, _ = w.Write(get)
	}))
	up.EnableHTTP2 = true
	up.StartTLS()
	defer up.Close()
	u, _ := url.Parse(up.URL)
	pool, err := upstream.New([]*url.URL{u}, upstream.Credentials{TLS: &tls.Config{InsecureSkipVerify: true}}, config.LBRoundRobin)
	if err != nil {
		b.Fatal(err)
	}
	st, err := store.Open(filepath.Join(b.TempDir(), "cache.db"), store.Options{NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	m := metrics.New(prometheus.NewRegistry())
	c := &recording.Recorder{Store: st, Log: log, Metrics: m}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	h := &Handler{
		Authenticate: func(*http.Request) (request.Identity, error) {
			return request.Identity{Kind: request.BearerToken, User: "system:serviceaccount:default:bench", Token: "t"}, nil
		},
		Upstream: pool, Record: c.Tee, Cache: &reader.Reader{Store: st, Local: &local.Writer{Store: st, Log: log}}, Metrics: m, Log: log,
	}
	h.Init()
	front := httptest.NewUnstartedServer(h)
	front.EnableHTTP2 = true
	front.StartTLS()
	defer front.Close()
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, ForceAttemptHTTP2: true}}

	// Each request directly to the stand-in and through outpost, side by
	// side: the difference is outpost's hop.
	for _, bc := range []struct{ name, base, path string }{
		{"get/direct", up.URL, "/api/v1/namespaces/bench/configmaps/target"},
		{"get/outpost", front.URL, "/api/v1/namespaces/bench/configmaps/target"},
		{"list/direct", up.URL, "/api/v1/namespaces/bench/configmaps"},
		{"list/outpost", front.URL, "/api/v1/namespaces/bench/configmaps"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					req, _ := http.NewRequest(http.MethodGet, bc.base+bc.path, nil)
					req.Header.Set("Accept", "application/vnd.kubernetes.protobuf, */*")
					req.Header.Set("Authorization", "Bearer t")
					resp, err := client.Do(req)
					if err != nil {
						b.Error(err)
						return
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						b.Errorf("status %s", resp.Status)
						return
					}
				}
			})
		})
	}
}

func protobufBody(b *testing.B, obj runtime.Object) []byte {
	b.Helper()
	var out bytes.Buffer
	if err := protobuf.NewSerializer(scheme.Scheme, scheme.Scheme).Encode(obj, &out); err != nil {
		b.Fatal(err)
	}
	return out.Bytes()
}
