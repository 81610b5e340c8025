package share

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/outposthq/outpost/internal/request"
)

// fakeAPIServer answers a stream's requests as an apiserver without
// WatchList would, and access reviews as told.
type fakeAPIServer struct {
	mu       sync.Mutex
	requests []string
	allowed  bool
	events   chan string // watch events to send, as JSON lines
	// refuse, when set, answers whom it names (by bearer token) with 401
	// (reviews) or 403 (everything else).
	refuse func(token string) bool
}

func (f *fakeAPIServer) RoundTrip(r *http.Request) (*http.Response, error) {
	f.mu.Lock()
	f.requests = append(f.requests, r.Method+" "+r.URL.RequestURI())
	allowed := f.allowed
	f.mu.Unlock()
	q := r.URL.Query()
	answer := func(code int, body io.ReadCloser) *http.Response {
		return &http.Response{StatusCode: code, Header: http.Header{"Content-Type": {"application/json"}}, Body: body, Request: r}
	}
	bearer := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	switch {
	case f.refuse != nil && f.refuse(bearer) && r.Method == http.MethodPost:
		return answer(http.StatusUnauthorized, io.NopCloser(strings.NewReader(`{"kind":"Status","code":401}`))), nil
	case f.refuse != nil && f.refuse(bearer):
		return answer(http.StatusForbidden, io.NopCloser(strings.NewReader(`{"kind":"Status","code":403}`))), nil
	case r.Method == http.MethodPost:
		b, _ := json.Marshal(map[string]any{"status": map[string]any{"allowed": allowed}})
		return answer(http.StatusCreated, io.NopCloser(strings.NewReader(string(b)))), nil
	case q.Get("sendInitialEvents") == "true":
		return answer(http.StatusBadRequest, io.NopCloser(strings.NewReader(`{"kind":"Status","code":400}`))), nil
	case q.Get("watch") == "true":
		pr, pw := io.Pipe()
		go func() {
			for {
				select {
				case ev := <-f.events:
					_, _ = pw.Write([]byte(ev + "\n"))
				case <-r.Context().Done():
					pw.Close()
					return
				}
			}
		}()
		return answer(http.StatusOK, pr), nil
	default:
		return answer(http.StatusOK, io.NopCloser(strings.NewReader(`{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"10"},"items":[`+
			cm("a", "3")+`,`+cm("b", "4")+`]}`))), nil
	}
}

func (f *fakeAPIServer) seen() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.requests...)
}

func cm(name, rv string) string {
	return fmt.Sprintf(`{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":%q,"namespace":"ns","resourceVersion":%q}}`, name, rv)
}

// newTestCache runs a Cache against api, set by opts before it runs.
func newTestCache(t *testing.T, api *fakeAPIServer, opts ...func(*Cache)) *Cache {
	t.Helper()
	c := &Cache{
		As:         func(request.Identity) http.RoundTripper { return api },
		UpstreamAs: func(string) http.RoundTripper { return api },
		Log:        slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	for _, o := range opts {
		o(c)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		_ = c.Run(ctx)
		close(done)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	<-c.startedChan()
	return c
}

var token = request.Identity{Kind: request.BearerToken, User: "system:serviceaccount:ns:agent", Token: "t"}

// TestServeWithoutWatchList follows a stream against an apiserver that
// refuses WatchList: it lists, then watches, and a LIST at
// resourceVersion 0 and a watch from the list's version are answered
// from it, after an access review; a denied review leaves the request
// to the apiserver.
func TestServeWithoutWatchList(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	c := newTestCache(t, api)

	w := httptest.NewRecorder()
	r := httptest.NewRequest("GET", "/api/v1/namespaces/ns/configmaps?resourceVersion=0", nil)
	r.Header.Set("Accept", "application/json")
	info, err := request.Parse(r, token)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Serve(w, r, info) {
		t.Fatalf("not served; upstream saw %v", api.seen())
	}
	body := w.Body.String()
	if w.Code != http.StatusOK || w.Header().Get("X-Outpost-Served-By") != ServedBy || !strings.Contains(body, `"resourceVersion":"10"`) ||
		!strings.Contains(body, `"name":"a"`) || strings.Index(body, `"name":"a"`) > strings.Index(body, `"name":"b"`) {
		t.Fatalf("answer %d %v: %s", w.Code, w.Header(), body)
	}

	// A watch from the list's version gets what follows.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	rw := &pipeWriter{header: http.Header{}, w: pw}
	r = httptest.NewRequest("GET", "/api/v1/namespaces/ns/configmaps?watch=true&resourceVersion=10", nil).WithContext(ctx)
	r.Header.Set("Accept", "application/json")
	info, _ = request.Parse(r, token)
	served := make(chan bool, 1)
	go func() {
		served <- c.Serve(rw, r, info)
		pw.Close()
	}()
	api.events <- `{"type":"ADDED","object":` + cm("c", "11") + `}`
	line := make([]byte, 4096)
	n, err := pr.Read(line)
	if err != nil || !strings.Contains(string(line[:n]), `"name":"c"`) || !strings.Contains(string(line[:n]), `"ADDED"`) {
		t.Fatalf("watch sent %q, %v", line[:n], err)
	}
	cancel()
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	if ok := <-served; !ok {
		t.Fatal("the watch was not served from the stream")
	}

	var lists, watchLists int
	for _, s := range api.seen() {
		switch {
		case strings.Contains(s, "sendInitialEvents=true"):
			watchLists++
		case strings.HasPrefix(s, "GET") && !strings.Contains(s, "watch=true"):
			lists++
		}
	}
	if watchLists != 1 || lists != 1 {
		t.Fatalf("upstream saw %d WatchLists and %d LISTs, want one each: %v", watchLists, lists, api.seen())
	}

	// Denied: the request is left to the apiserver, nothing written.
	api.mu.Lock()
	api.allowed = false
	api.mu.Unlock()
	denied := request.Identity{Kind: request.BearerToken, User: "system:serviceaccount:ns:other", Token: "o"}
	w = httptest.NewRecorder()
	r = httptest.NewRequest("GET", "/api/v1/namespaces/ns/configmaps?resourceVersion=0", nil)
	info, _ = request.Parse(r, denied)
	if c.Serve(w, r, info) || w.Body.Len() != 0 {
		t.Fatalf("a denied caller was served: %s", w.Body.String())
	}
}

// pipeWriter is an http.ResponseWriter into a pipe, flushable.
type pipeWriter struct {
	header http.Header
	w      io.Writer
}

func (p *pipeWriter) Header() http.Header         { return p.header }
func (p *pipeWriter) Write(b []byte) (int, error) { return p.w.Write(b) }
func (p *pipeWriter) WriteHeader(int)             {}
func (p *pipeWriter) Flush()                      {}
