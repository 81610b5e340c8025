package reader

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/local"
	"github.com/outposthq/outpost/internal/memory"
	"github.com/outposthq/outpost/internal/recorder"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/outposthq/outpost/internal/codec/codectest"
	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// Cache is the recorder, the offline reader and local writes over one
// store, as the hub assembles them: what these tests record with Tee they
// read back with Serve.
type Cache struct {
	*recorder.Recorder
	Reader *Reader
	Local  *local.Writer
}

func (c *Cache) Serve(w http.ResponseWriter, r *http.Request, info *request.Info) {
	c.Reader.Serve(w, r, info)
}

func (c *Cache) AnswersWrite(r *http.Request, info *request.Info) bool {
	return c.Local.Answers(r, info)
}

func (c *Cache) ServeWrite(w http.ResponseWriter, r *http.Request, info *request.Info) {
	c.Local.Serve(w, r, info)
}

// newCache runs a recorder, a reader and local writes on a new store, with
// opts applied before it runs.
func newCache(t testing.TB, opts ...func(*Cache)) (*Cache, func()) {
	t.Helper()
	st, err := store.Open(filepath.Join(t.TempDir(), "cache.db"), store.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	lw := &local.Writer{Store: st, Log: log}
	c := &Cache{Recorder: &recorder.Recorder{Store: st, Log: log, BatchDelay: 10 * time.Millisecond, RecordsToken: lw.Records},
		Reader: &Reader{Store: st, Local: lw}, Local: lw}
	for _, o := range opts {
		o(c)
	}
	lw.Load()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(ctx); close(done) }()
	return c, func() { cancel(); <-done; _ = st.Close() }
}

var reader = request.Identity{Kind: request.BearerToken, User: "system:serviceaccount:default:reader"}

// respond feeds body through Tee as the apiserver's answer to target.
func respond(t *testing.T, c *Cache, target, accept, contentType string, body []byte) {
	t.Helper()
	r := httptest.NewRequest(http.MethodGet, target, nil)
	if accept != "" {
		r.Header.Set("Accept", accept)
	}
	info, err := request.Parse(r, reader)
	if err != nil {
		t.Fatal(err)
	}
	resp := &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {contentType}}, Body: io.NopCloser(bytes.NewReader(body)), Request: r}
	c.Tee(resp, info)
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
}

// serve asks c for target as the reader (the identity) would, offline.
func serve(t testing.TB, c interface {
	Serve(http.ResponseWriter, *http.Request, *request.Info)
}, target, accept string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(http.MethodGet, target, nil)
	if accept != "" {
		r.Header.Set("Accept", accept)
	}
	info, err := request.Parse(r, reader)
	if err != nil {
		t.Fatal(err)
	}
	w := httptest.NewRecorder()
	c.Serve(w, r, info)
	return w
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func cm(name, ns, rv string, labels map[string]string) corev1.ConfigMap {
	return corev1.ConfigMap{TypeMeta: metav1.TypeMeta{Kind: "ConfigMap", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, ResourceVersion: rv, Labels: labels}, Data: map[string]string{"v": name}}
}

// TestWatchListRecordedThenServed: an informer's WatchList (initial events
// and the initial-events-end bookmark) becomes a view a later list reads,
// filtered by namespace and labels.
func TestWatchListRecordedThenServed(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	a, b := cm("a", "ns1", "10", map[string]string{"tier": "front"}), cm("b", "ns2", "11", map[string]string{"tier": "back"})
	end := &corev1.ConfigMap{TypeMeta: metav1.TypeMeta{Kind: "ConfigMap", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{ResourceVersion: "12", Annotations: map[string]string{"k8s.io/initial-events-end": "true"}}}
	later := cm("c", "ns1", "13", map[string]string{"tier": "front"})
	body := codectest.WatchStream(t, "application/json", []watch.Event{{Type: watch.Added, Object: &a}, {Type: watch.Added, Object: &b},
		{Type: watch.Bookmark, Object: end}, {Type: watch.Added, Object: &later}})
	respond(t, c, "/api/v1/configmaps?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true", "", "application/json", body)

	key := store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps"}
	waitFor(t, "the watch-list view", func() bool {
		v, ok, _ := c.Store.View(key)
		return ok && v.ResourceVersion == "13"
	})
	w := serve(t, c, "/api/v1/namespaces/ns1/configmaps?labelSelector=tier%3Dfront", "")
	var l corev1.ConfigMapList
	if err := json.Unmarshal(w.Body.Bytes(), &l); err != nil || w.Code != 200 {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	if l.Kind != "ConfigMapList" || len(l.Items) != 2 || l.Items[0].Name != "a" || l.Items[1].Name != "c" || w.Header().Get(ServedByHeader) != "cache" {
		t.Fatalf("served %+v", l)
	}
	// Pagination with the cache's own continue tokens.
	w = serve(t, c, "/api/v1/configmaps?limit=1", "")
	_ = json.Unmarshal(w.Body.Bytes(), &l)
	if len(l.Items) != 1 || l.Continue == "" {
		t.Fatalf("first page: %s", w.Body)
	}
	var names []string
	for tok := l.Continue; ; {
		names = append(names, l.Items[0].Name)
		if tok == "" {
			break
		}
		w = serve(t, c, "/api/v1/configmaps?limit=1&continue="+tok, "")
		l = corev1.ConfigMapList{}
		_ = json.Unmarshal(w.Body.Bytes(), &l)
		tok = l.Continue
	}
	if strings.Join(names, ",") != "a,c,b" {
		t.Fatalf("pages gave %v, want a,c,b (namespace/name order)", names)
	}
	// Protobuf, as kubelet asks.
	w = serve(t, c, "/api/v1/namespaces/ns2/configmaps/b", "application/vnd.kubernetes.protobuf")
	if w.Code != 200 || w.Header().Get("Content-Type") != codec.MediaProtobuf {
		t.Fatalf("protobuf get: %d %s", w.Code, w.Header())
	}
	// Metadata only, from the full view.
	w = serve(t, c, "/api/v1/configmaps", "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")
	var pl metav1.PartialObjectMetadataList
	if err := json.Unmarshal(w.Body.Bytes(), &pl); err != nil || pl.Kind != "PartialObjectMetadataList" || len(pl.Items) != 3 {
		t.Fatalf("metadata list: %s", w.Body)
	}
	// Never read: 503; read but absent: 404.
	if w := serve(t, c, "/api/v1/secrets", ""); w.Code != 503 {
		t.Fatalf("never-read secrets: %d", w.Code)
	}
	if w := serve(t, c, "/api/v1/namespaces/ns1/configmaps/zzz", ""); w.Code != 404 {
		t.Fatalf("missing configmap: %d %s", w.Code, w.Body)
	}
}

// TestOfflineWatch: a WatchList served from the cache sends the view's
// objects, the initial-events-end bookmark and then bookmarks; a too-old
// resourceVersion gets 410.
func TestOfflineWatch(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	c.Reader.BookmarkInterval = 100 * time.Millisecond
	a, b := cm("a", "ns1", "10", nil), cm("b", "ns1", "11", nil)
	var list bytes.Buffer
	l := corev1.ConfigMapList{TypeMeta: metav1.TypeMeta{Kind: "ConfigMapList", APIVersion: "v1"}, ListMeta: metav1.ListMeta{ResourceVersion: "20"}, Items: []corev1.ConfigMap{a, b}}
	_ = json.NewEncoder(&list).Encode(l)
	respond(t, c, "/api/v1/namespaces/ns1/configmaps", "", "application/json", list.Bytes())
	waitFor(t, "the list view", func() bool {
		_, ok, _ := c.Store.View(store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "ns1"})
		return ok
	})

	for _, media := range []string{"application/json", "application/vnd.kubernetes.protobuf"} {
		w := serve(t, c, "/api/v1/namespaces/ns1/configmaps?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1", media)
		d, err := codec.NewWatchDecoder(w.Header().Get("Content-Type"), io.NopCloser(bytes.NewReader(w.Body.Bytes())), "/v1/configmaps")
		if err != nil {
			t.Fatal(err)
		}
		var types []string
		sawEnd := false
		for {
			ev, err := d.Next()
			if err != nil {
				if err != io.EOF {
					t.Errorf("%s: decoding the offline watch: %v", media, err)
				}
				break
			}
			types = append(types, string(ev.Type))
			sawEnd = sawEnd || ev.InitialEventsEnd
		}
		got := strings.Join(types, ",")
		if !strings.HasPrefix(got, "ADDED,ADDED,BOOKMARK,BOOKMARK") || !sawEnd {
			t.Fatalf("%s offline watch events %s (end marker %v)", media, got, sawEnd)
		}
	}
	w := serve(t, c, "/api/v1/namespaces/ns1/configmaps?watch=true&resourceVersion=5&timeoutSeconds=1", "")
	if !strings.Contains(w.Body.String(), `"type":"ERROR"`) || !strings.Contains(w.Body.String(), `"code":410`) {
		t.Fatalf("too-old watch: %s", w.Body)
	}
}

// TestGzippedProtobufListsRecorded: lists as kubelet receives them
// (protobuf, gzipped) are recorded, and recorded again when they change;
// the start of a big one is inflated first to see whether it changed.
// protobufGzipped encodes o as the apiserver would in protobuf, and that
// gzipped.
func protobufGzipped(t *testing.T, o runtime.Object) (plain, gzipped []byte) {
	t.Helper()
	pb, err := codec.EncodeProtobuf(o)
	if err != nil {
		t.Fatal(err)
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write(pb)
	_ = zw.Close()
	return pb, gz.Bytes()
}

func TestGzippedProtobufListsRecorded(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	key := store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "ns1"}
	for _, step := range []struct {
		rv string
		n  int
	}{{"10", 200}, {"10", 200}, {"11", 201}} {
		l := &corev1.ConfigMapList{TypeMeta: metav1.TypeMeta{Kind: "ConfigMapList", APIVersion: "v1"}, ListMeta: metav1.ListMeta{ResourceVersion: step.rv}}
		for i := range step.n {
			item := cm(fmt.Sprintf("cm-%03d", i), "ns1", strconv.Itoa(i+1), nil)
			item.Data["payload"] = strings.Repeat("x", 200) + strconv.Itoa(i)
			if i == 5 && step.rv == "11" {
				// Changed since: decoded anew, while the others are
				// taken from the store.
				item.ResourceVersion, item.Data["payload"] = "9999", "changed"
			}
			item.TypeMeta = metav1.TypeMeta{}
			l.Items = append(l.Items, item)
		}
		pb, gz := protobufGzipped(t, l)
		if len(pb) < 8<<10 { // the recorder inflates the first 4 KiB of a gzipped answer first
			t.Fatalf("list of %d bytes is too small to test inflating its start first", len(pb))
		}
		r := httptest.NewRequest(http.MethodGet, "/api/v1/namespaces/ns1/configmaps", nil)
		r.Header.Set("Accept", "application/vnd.kubernetes.protobuf, */*")
		info, _ := request.Parse(r, reader)
		resp := &http.Response{StatusCode: 200, Request: r, Body: io.NopCloser(bytes.NewReader(gz)),
			Header: http.Header{"Content-Type": {codec.MediaProtobuf}, "Content-Encoding": {"gzip"}}}
		c.Tee(resp, info)
		if _, err := io.Copy(io.Discard, resp.Body); err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		waitFor(t, "view at "+step.rv, func() bool {
			v, ok, _ := c.Store.View(key)
			n := 0
			_ = c.Store.List(key, "", 0, func(store.Object) error { n++; return nil })
			return ok && v.ResourceVersion == step.rv && n == step.n
		})
	}
	w := serve(t, c, "/api/v1/namespaces/ns1/configmaps/cm-200", "")
	if w.Code != 200 || !strings.Contains(w.Body.String(), "x200") {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	w = serve(t, c, "/api/v1/namespaces/ns1/configmaps/cm-005", "")
	if w.Code != 200 || !strings.Contains(w.Body.String(), `"payload":"changed"`) || !strings.Contains(w.Body.String(), `"resourceVersion":"9999"`) {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
}

// TestIdenticalAnswersRecordedOnce: many answers at one resourceVersion
// of a view arriving before the first is written (many clients listing the
// same thing at once) are decoded and written once; an answer whose
// recording failed does not keep a later identical one from being
// recorded.
func TestIdenticalAnswersRecordedOnce(t *testing.T) {
	m := metrics.New(prometheus.NewRegistry())
	// Writes wait long enough for every answer below to be looked at
	// before the first is written.
	c, stop := newCache(t, func(c *Cache) { c.Metrics, c.BatchDelay = m, 300*time.Millisecond })
	defer stop()
	key := store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "ns1"}
	list := func(rv string) (plain, gzipped []byte) {
		l := &corev1.ConfigMapList{TypeMeta: metav1.TypeMeta{Kind: "ConfigMapList", APIVersion: "v1"}, ListMeta: metav1.ListMeta{ResourceVersion: rv}}
		for i := range 100 {
			item := cm(fmt.Sprintf("cm-%03d", i), "ns1", strconv.Itoa(i+1), nil)
			item.TypeMeta = metav1.TypeMeta{}
			item.Data["payload"] = strings.Repeat("y", 100)
			l.Items = append(l.Items, item)
		}
		return protobufGzipped(t, l)
	}
	feed := func(body []byte, gzipped bool) {
		r := httptest.NewRequest(http.MethodGet, "/api/v1/namespaces/ns1/configmaps", nil)
		r.Header.Set("Accept", "application/vnd.kubernetes.protobuf, */*")
		info, _ := request.Parse(r, reader)
		h := http.Header{"Content-Type": {codec.MediaProtobuf}}
		if gzipped {
			h.Set("Content-Encoding", "gzip")
		}
		resp := &http.Response{StatusCode: 200, Request: r, Body: io.NopCloser(bytes.NewReader(body)), Header: h}
		c.Tee(resp, info)
		if _, err := io.Copy(io.Discard, resp.Body); err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
	}
	at := func(rv string) func() bool {
		return func() bool {
			v, ok, _ := c.Store.View(key)
			return ok && !v.Stale && v.ResourceVersion == rv
		}
	}
	written := func() float64 {
		var d dto.Metric
		if err := m.CacheLists.Write(&d); err != nil {
			t.Fatal(err)
		}
		return d.GetCounter().GetValue()
	}

	plain, gz := list("10")
	for range 20 {
		feed(plain, false)
		feed(gz, true)
	}
	waitFor(t, "view at 10", at("10"))
	time.Sleep(400 * time.Millisecond) // any second write would be flushed by now
	if n := written(); n != 1 {
		t.Fatalf("40 identical answers were written %v times, want once", n)
	}

	// A recording that fails (the answer is cut off after its metadata)
	// releases its version: the same answer, whole, is then recorded. (The
	// failure marks the view stale, after the batch that holds the whole
	// answer: the next answer clears that.)
	plain, _ = list("11")
	feed(plain[:len(plain)/2], false)
	feed(plain, false)
	waitFor(t, "view at 11", func() bool {
		v, ok, _ := c.Store.View(key)
		return ok && v.ResourceVersion == "11"
	})
	if n := written(); n != 2 {
		t.Fatalf("%v lists written, want 2", n)
	}
}

// TestLargeAnswerReported: serving a large answer is reported to
// LargeAnswer (which returns memory to the system once quiet); a small one
// is not.
func TestLargeAnswerReported(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	var large atomic.Int32
	c.Reader.LargeAnswer = func() { large.Add(1) }

	seedList(t, c, "small", 10, nil)
	seedList(t, c, "large", 15000, nil)
	if w := serve(t, c, "/api/v1/namespaces/small/configmaps", codec.MediaJSON); w.Code != 200 {
		t.Fatalf("small list: %d", w.Code)
	}
	if n := large.Load(); n != 0 {
		t.Fatal("a small answer was reported large")
	}
	w := serve(t, c, "/api/v1/namespaces/large/configmaps", codec.MediaJSON)
	if w.Code != 200 || w.Body.Len() < memory.LargeAnswer {
		t.Fatalf("large list: %d, %d bytes", w.Code, w.Body.Len())
	}
	if n := large.Load(); n != 1 {
		t.Fatalf("serving a large answer reported %d times; want once", n)
	}
}

// TestProtobufAfterJSONRecorded: a protobuf answer at the resourceVersion
// a JSON answer already recorded still records its messages, so offline
// protobuf clients get the apiserver's bytes (and can stream) instead of
// every object converted from JSON. (Claims are per view and version,
// whatever the encoding: a protobuf answer racing the JSON one is not
// recorded, the next is; hence the pause.)
func TestProtobufAfterJSONRecorded(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	l := &corev1.ConfigMapList{TypeMeta: metav1.TypeMeta{Kind: "ConfigMapList", APIVersion: "v1"}, ListMeta: metav1.ListMeta{ResourceVersion: "10"},
		Items: []corev1.ConfigMap{cm("a", "ns1", "5", nil), cm("b", "ns1", "6", nil)}}
	js, _ := json.Marshal(l)
	respond(t, c, "/api/v1/namespaces/ns1/configmaps", "application/json", "application/json", js)
	time.Sleep(300 * time.Millisecond) // the JSON answer is recorded
	pb, _ := protobufGzipped(t, l)
	respond(t, c, "/api/v1/namespaces/ns1/configmaps", codec.MediaProtobuf, codec.MediaProtobuf, pb)
	key := store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "ns1"}
	protos := func() int {
		n := 0
		_ = c.Store.Read(func(tx *store.Tx) error {
			return tx.ListData(key, "", 0, true, func(_ string, _, proto []byte) error {
				if proto != nil {
					n++
				}
				return nil
			})
		})
		return n
	}
	deadline := time.Now().Add(2 * time.Second)
	for protos() != 2 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := protos(); n != 2 {
		t.Errorf("the protobuf answer after the JSON one recorded %d messages of 2", n)
	}
}

// TestConcurrentCopiesCostTheirStart: of many answers at one
// resourceVersion of a view streaming at once (many clients listing the
// same thing), only one is copied for recording; the others cost the start
// that tells their version, while they stream, gzipped or not (issue 20).
// The one copied is recorded once they end.
func TestConcurrentCopiesCostTheirStart(t *testing.T) {
	for _, gzipped := range []bool{false, true} {
		t.Run(fmt.Sprintf("gzip=%v", gzipped), func(t *testing.T) {
			m := metrics.New(prometheus.NewRegistry())
			c, stop := newCache(t, func(c *Cache) { c.Metrics = m })
			defer stop()
			l := &corev1.ConfigMapList{TypeMeta: metav1.TypeMeta{Kind: "ConfigMapList", APIVersion: "v1"}, ListMeta: metav1.ListMeta{ResourceVersion: "50"}}
			rnd := rand.New(rand.NewPCG(1, 2)) // payloads that gzip cannot shrink much
			for i := range 4000 {
				item := cm(fmt.Sprintf("cm-%04d", i), "ns1", strconv.Itoa(i+1), nil)
				item.TypeMeta = metav1.TypeMeta{}
				payload := make([]byte, 200)
				for j := range payload {
					payload[j] = byte(rnd.Uint32())
				}
				item.Data["payload"] = hex.EncodeToString(payload)
				l.Items = append(l.Items, item)
			}
			body, err := json.Marshal(l)
			if err != nil {
				t.Fatal(err)
			}
			h := http.Header{"Content-Type": {codec.MediaJSON}}
			if gzipped {
				var gz bytes.Buffer
				zw, _ := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
				_, _ = zw.Write(body)
				_ = zw.Close()
				body = gz.Bytes()
				h.Set("Content-Encoding", "gzip")
			}
			const answers = 10
			half := len(body) / 2
			if half <= checkLastForTest {
				t.Fatalf("an answer of %d bytes is too small to tell", len(body))
			}
			writers := make([]*io.PipeWriter, answers)
			read := make(chan error, answers)
			for i := range answers {
				pr, pw := io.Pipe()
				writers[i] = pw
				r := httptest.NewRequest(http.MethodGet, "/api/v1/namespaces/ns1/configmaps", nil)
				info, _ := request.Parse(r, reader)
				resp := &http.Response{StatusCode: 200, Request: r, Body: pr, Header: h}
				c.Tee(resp, info)
				go func() {
					_, err := io.Copy(io.Discard, resp.Body)
					read <- errors.Join(err, resp.Body.Close())
				}()
			}
			// Each answer streams its first half; the first has told its
			// version before the others start.
			for _, pw := range writers {
				if _, err := pw.Write(body[:half]); err != nil {
					t.Fatal(err)
				}
			}
			var g dto.Metric
			held := func() float64 {
				if err := m.RecordingBytes.Write(&g); err != nil {
					t.Fatal(err)
				}
				return g.GetGauge().GetValue()
			}
			// (A write to a pipe returns once the reader has the bytes, a
			// moment before the tee has copied them.)
			waitFor(t, "the first half copied", func() bool { return held() >= float64(half) })
			time.Sleep(50 * time.Millisecond)
			if n := held(); n > float64(half+checkLastForTest) {
				t.Errorf("%d answers half-way hold %v bytes for recording; want one half (%d) and little more", answers, n, half)
			}
			for _, pw := range writers {
				if _, err := pw.Write(body[half:]); err != nil {
					t.Fatal(err)
				}
				_ = pw.Close()
			}
			for range answers {
				if err := <-read; err != nil {
					t.Fatal(err)
				}
			}
			key := store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "ns1"}
			waitFor(t, "view at 50", func() bool {
				v, ok, _ := c.Store.View(key)
				return ok && !v.Stale && v.ResourceVersion == "50"
			})
			var skipped dto.Metric
			if err := m.CacheSkipped.Write(&skipped); err != nil {
				t.Fatal(err)
			}
			if n := skipped.GetCounter().GetValue(); n != answers-1 {
				t.Errorf("%v answers skipped, want %d", n, answers-1)
			}
			if n := held(); n != 0 {
				t.Errorf("after the answers ended %v bytes are still held", n)
			}
		})
	}
}

// checkLastForTest is the most of an answer a tee copies before it can tell
// whether it needs recording (recorder's checkLast).
const checkLastForTest = 256 << 10

// TestSlowAnswerHoldsNothingBack: an answer whose client reads it slowly
// neither keeps the next answers at its version from being recorded for
// long (its claim lasts claimPatience), nor, when it ends after a newer
// answer was recorded, takes the view back to its older version.
func TestSlowAnswerHoldsNothingBack(t *testing.T) {
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	c, stop := newCache(t, func(c *Cache) { c.Now = func() time.Time { return time.Unix(0, now.Load()) } })
	defer stop()
	key := store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "ns1"}
	list := func(rv string) []byte { return jsonList(t, rv, 1000) }
	at := func(rv string) func() bool {
		return func() bool {
			v, ok, _ := c.Store.View(key)
			return ok && !v.Stale && v.ResourceVersion == rv
		}
	}
	// The slow answer at 70: its start is read, then nothing for a while.
	slow := list("70")
	pr, pw := io.Pipe()
	r := httptest.NewRequest(http.MethodGet, "/api/v1/namespaces/ns1/configmaps", nil)
	info, _ := request.Parse(r, reader)
	resp := &http.Response{StatusCode: 200, Request: r, Body: pr, Header: http.Header{"Content-Type": {codec.MediaJSON}}}
	c.Tee(resp, info)
	read := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, resp.Body)
		read <- errors.Join(err, resp.Body.Close())
	}()
	if _, err := pw.Write(slow[:64<<10]); err != nil {
		t.Fatal(err)
	}
	// Another answer at 70 within the claim's patience is not recorded;
	// past it, it is.
	respond(t, c, "/api/v1/namespaces/ns1/configmaps", "", codec.MediaJSON, slow)
	time.Sleep(200 * time.Millisecond)
	if v, ok, _ := c.Store.View(key); ok {
		t.Fatalf("an answer at the version a slow one claimed was recorded (view at %s)", v.ResourceVersion)
	}
	now.Add(int64(claimPatienceForTest + time.Second))
	respond(t, c, "/api/v1/namespaces/ns1/configmaps", "", codec.MediaJSON, slow)
	waitFor(t, "view at 70", at("70"))
	// A newer answer is recorded while the slow one still streams, which
	// then ends: the view stays at the newer version.
	now.Add(int64(time.Second))
	respond(t, c, "/api/v1/namespaces/ns1/configmaps", "", codec.MediaJSON, list("71"))
	waitFor(t, "view at 71", at("71"))
	if _, err := pw.Write(slow[64<<10:]); err != nil {
		t.Fatal(err)
	}
	_ = pw.Close()
	if err := <-read; err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // written by now, were it to be
	if !at("71")() {
		v, _, _ := c.Store.View(key)
		t.Fatalf("the slow answer at 70, ended last, took the view to %s (stale %v)", v.ResourceVersion, v.Stale)
	}
}

// claimPatienceForTest is recorder's claimPatience.
const claimPatienceForTest = 30 * time.Second

// roundTripFunc is an upstream made of a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestRelistSkipsViewsClientsRelisted: after the link returns, a view a
// client's list replaced since is converged already and is not asked of
// the apiserver again; one nobody refreshed is.
func TestRelistSkipsViewsClientsRelisted(t *testing.T) {
	c, stop := newCache(t)
	defer stop()
	body := func(rv string) []byte {
		l := &corev1.ConfigMapList{TypeMeta: metav1.TypeMeta{Kind: "ConfigMapList", APIVersion: "v1"}, ListMeta: metav1.ListMeta{ResourceVersion: rv}}
		l.Items = []corev1.ConfigMap{cm("a", "ns1", "5", nil)}
		b, err := json.Marshal(l)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	key := store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "ns1"}
	respond(t, c, "/api/v1/namespaces/ns1/configmaps", "", codec.MediaJSON, body("20"))
	waitFor(t, "view at 20", func() bool { v, ok, _ := c.Store.View(key); return ok && v.ResourceVersion == "20" })
	var asked atomic.Int32
	upstream := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		asked.Add(1)
		h := http.Header{"Content-Type": {codec.MediaJSON}}
		b := body("21")
		if r.Header.Get("Accept-Encoding") == "gzip" { // as the apiserver answers a re-list
			var gz bytes.Buffer
			zw := gzip.NewWriter(&gz)
			_, _ = zw.Write(b)
			_ = zw.Close()
			b = gz.Bytes()
			h.Set("Content-Encoding", "gzip")
		} else {
			t.Error("a re-list did not ask for gzip")
		}
		return &http.Response{StatusCode: 200, Request: r, Header: h, Body: io.NopCloser(bytes.NewReader(b))}, nil
	})
	// The link returned before the client's list: nothing to ask.
	n, err := c.Relist(t.Context(), reader.Key(), 100, upstream, time.Now().Add(-time.Minute))
	if err != nil || n != 0 || asked.Load() != 0 {
		t.Fatalf("re-listed %d views (%v), asked the apiserver %d times; want none", n, err, asked.Load())
	}
	// It returned after: the view is asked again, and converges.
	n, err = c.Relist(t.Context(), reader.Key(), 100, upstream, time.Now())
	if err != nil || n != 1 || asked.Load() != 1 {
		t.Fatalf("re-listed %d views (%v), asked the apiserver %d times; want one", n, err, asked.Load())
	}
	waitFor(t, "view at 21", func() bool { v, ok, _ := c.Store.View(key); return ok && v.ResourceVersion == "21" })
}

// TestLostClaimRelisted: when the one copy of an answer being recorded is
// lost (its client went away midway) after other copies of it were passed
// over, the view is re-listed on its own (as its identity), rather than
// left behind while the link holds; a view stale from that is not held back
// by the guard against older answers.
func TestLostClaimRelisted(t *testing.T) {
	list := func(rv string) []byte { return jsonList(t, rv, 1000) }
	var asked atomic.Int32
	c, stop := newCache(t, func(c *Cache) {
		c.UpstreamAs = func(identity string) http.RoundTripper {
			if identity != reader.Key() {
				return nil
			}
			return roundTripFunc(func(r *http.Request) (*http.Response, error) {
				asked.Add(1)
				return &http.Response{StatusCode: 200, Request: r, Header: http.Header{"Content-Type": {codec.MediaJSON}}, Body: io.NopCloser(bytes.NewReader(list("30")))}, nil
			})
		}
	})
	defer stop()
	key := store.ViewKey{Identity: reader.Key(), Resource: "/v1/configmaps", Namespace: "ns1"}
	respond(t, c, "/api/v1/namespaces/ns1/configmaps", "", codec.MediaJSON, list("10"))
	waitFor(t, "view at 10", func() bool { v, ok, _ := c.Store.View(key); return ok && v.ResourceVersion == "10" })

	body := list("20")
	start := func() (*io.PipeWriter, *http.Response) {
		pr, pw := io.Pipe()
		r := httptest.NewRequest(http.MethodGet, "/api/v1/namespaces/ns1/configmaps", nil)
		info, _ := request.Parse(r, reader)
		resp := &http.Response{StatusCode: 200, Request: r, Body: pr, Header: http.Header{"Content-Type": {codec.MediaJSON}}}
		c.Tee(resp, info)
		return pw, resp
	}
	// The first copy claims 20, the second is passed over and ends.
	pw1, resp1 := start()
	copied := make(chan struct{})
	go func() { _, _ = io.CopyN(io.Discard, resp1.Body, 64<<10); close(copied) }()
	if _, err := pw1.Write(body[:64<<10]); err != nil {
		t.Fatal(err)
	}
	pw2, resp2 := start()
	done := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, resp2.Body); _ = resp2.Body.Close(); close(done) }()
	if _, err := pw2.Write(body); err != nil {
		t.Fatal(err)
	}
	_ = pw2.Close()
	<-done
	// The first one's client goes away (once done reading: a body is not
	// read and closed at once).
	<-copied
	_ = resp1.Body.Close()
	_ = pw1.Close()
	waitFor(t, "the view re-listed on its own", func() bool {
		v, ok, _ := c.Store.View(key)
		return ok && !v.Stale && v.ResourceVersion == "30"
	})
	if n := asked.Load(); n != 1 {
		t.Errorf("the apiserver was asked %d times; want once", n)
	}
}

// jsonList is the apiserver's JSON answer listing n ConfigMaps of ns1 at
// rv, each of about 100 bytes of data that name rv.
func jsonList(t *testing.T, rv string, n int) []byte {
	t.Helper()
	l := &corev1.ConfigMapList{TypeMeta: metav1.TypeMeta{Kind: "ConfigMapList", APIVersion: "v1"}, ListMeta: metav1.ListMeta{ResourceVersion: rv}}
	for i := range n {
		item := cm(fmt.Sprintf("cm-%03d", i), "ns1", strconv.Itoa(i+1), nil)
		item.TypeMeta = metav1.TypeMeta{}
		item.Data["payload"] = strings.Repeat("s", 100) + rv
		l.Items = append(l.Items, item)
	}
	body, err := json.Marshal(l)
	if err != nil {
		t.Fatal(err)
	}
	return body
}
