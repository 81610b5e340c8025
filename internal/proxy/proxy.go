// Package proxy is outpost's request path: it authenticates the caller,
// parses the request once, and sends it on. It is the one place that knows
// every way a request can be answered: the apiservers (whose answers it
// hands to Record), the cache while none can (Cache), and this node's own
// writes offline (Local).
package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/reader"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/rewrite"
	"github.com/outposthq/outpost/internal/status"
)

// Authenticate returns who sent r, or a Status error to answer with.
type Authenticate func(r *http.Request) (request.Identity, error)

// Answerer answers requests itself while no apiserver can: reads from the
// cache (reader.Reader), this node's own writes (local.Writer).
type Answerer interface {
	// Answers reports whether it may answer r.
	Answers(r *http.Request, info *request.Info) bool
	// Serve answers r, or writes a Status saying why not.
	Serve(w http.ResponseWriter, r *http.Request, info *request.Info)
}

// Sharer answers a request from a shared stream, or reports that it did
// not (writing nothing).
type Sharer interface {
	Serve(w http.ResponseWriter, r *http.Request, info *request.Info) bool
}

// Activity follows the requests being served.
type Activity interface {
	Begin()
	End()
}

// Handler serves local clients. Set the fields, then use it; it must not be
// changed afterwards.
type Handler struct {
	// Authenticate identifies the caller. Required.
	Authenticate Authenticate
	// Upstream sends a request to the apiservers with the credentials of
	// the caller named by the request.Info in its context. Required.
	Upstream http.RoundTripper
	// Record, if set, arranges for an apiserver's answer to be recorded as
	// it streams to the client (recorder.Recorder.Tee).
	Record func(resp *http.Response, info *request.Info)
	// Cache, if set, answers reads offline, and at once when a read's
	// upstream connection fails.
	Cache Answerer
	// Local, if set, answers this node's own writes offline.
	Local Answerer
	// Share, if set, answers online what the apiserver would answer from
	// its watch cache, from streams shared by this node's clients
	// (share.Cache); when it does not, the request goes upstream.
	Share Sharer
	// Online reports whether any apiserver is healthy. Nil: always. While
	// offline, reads the cache answers are served from it at once instead
	// of waiting on a dead link.
	Online func() bool
	// Metrics, if set, records each request.
	Metrics *metrics.Metrics
	// Log receives one line per failed request. Required.
	Log *slog.Logger
	// Stopping, when done, ends long-running requests (watches, upgraded
	// streams) so that a shutdown is not held up by them; ordinary requests
	// are left to drain. Nil: never.
	Stopping context.Context
	// Activity, if set, is told when each request that is not
	// long-running begins and ends (see memory.Releaser).
	Activity Activity
	// Rewrite, if set, changes the answers it names on their way to the
	// client, after Record took its copy, whoever answered.
	Rewrite *rewrite.Rules

	proxy *httputil.ReverseProxy
	// inFlight and responseBytes are Metrics' children resolved once, as
	// their labels take few values.
	inFlight      map[bool]prometheus.Gauge // by long-running
	responseBytes map[string]prometheus.Counter
}

// Init prepares h. It must be called once before ServeHTTP.
func (h *Handler) Init() {
	h.proxy = &httputil.ReverseProxy{
		// The pool sets scheme and host per apiserver; Rewrite only keeps
		// the request as the client sent it (no X-Forwarded-* headers: the
		// apiserver would not use them and they leak local addresses).
		Rewrite:      func(*httputil.ProxyRequest) {},
		Transport:    h.Upstream,
		ErrorHandler: h.upstreamError,
		ModifyResponse: func(resp *http.Response) error {
			info := request.From(resp.Request.Context())
			if info == nil {
				return nil
			}
			if h.Record != nil && !info.Impersonating {
				h.Record(resp, info)
			}
			if info.Watch {
				resp.Body = &watchBody{ReadCloser: resp.Body}
			}
			return nil
		},
		// Watches are flushed event by event: the reverse proxy flushes at
		// once when the response has no Content-Length, as watch and
		// chunked list responses have (recorder.FlushError keeps those
		// flushes for long-running requests only).
		FlushInterval: 0,
		BufferPool:    copyBuffers{},
		ErrorLog:      slog.NewLogLogger(h.Log.Handler(), slog.LevelWarn),
	}
	if h.Metrics != nil {
		h.inFlight = map[bool]prometheus.Gauge{
			false: h.Metrics.InFlight.WithLabelValues("short"),
			true:  h.Metrics.InFlight.WithLabelValues("long-running"),
		}
		h.responseBytes = map[string]prometheus.Counter{}
		for _, by := range []string{servedByUpstream, servedByCache, servedByOutpost, servedByWatchCache} {
			h.responseBytes[by] = h.Metrics.ResponseBytes.WithLabelValues(by)
		}
	}
}

// The values of the served_by label.
const (
	servedByUpstream = "upstream"
	servedByCache    = "cache"
	servedByOutpost  = "outpost" // a local write or outpost's own Status
	// servedByWatchCache: online, from a stream shared by this node's
	// clients (share.ServedBy).
	servedByWatchCache = "watch-cache"
)

// copyBuffers lends the reverse proxy its 32 KiB body copy buffers, which
// it would otherwise allocate for every response.
type copyBuffers struct{}

var copyBufferPool = sync.Pool{New: func() any { return new([32 << 10]byte) }}

func (copyBuffers) Get() []byte { return copyBufferPool.Get().(*[32 << 10]byte)[:] }

func (copyBuffers) Put(b []byte) {
	if len(b) == 32<<10 {
		copyBufferPool.Put((*[32 << 10]byte)(b))
	}
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	id, err := h.Authenticate(r)
	if err != nil {
		h.reject(w, r, err)
		return
	}
	info, err := request.Parse(r, id)
	if err != nil {
		status.WriteError(w, status.BadRequest("outpost: cannot parse request: "+err.Error()))
		return
	}

	ctx := request.WithInfo(r.Context(), info)
	if info.LongRunning {
		if h.Stopping != nil {
			var cancel context.CancelFunc
			ctx, cancel = context.WithCancel(ctx)
			stop := context.AfterFunc(h.Stopping, cancel)
			defer stop()
			defer cancel()
		}
	}
	if h.Activity != nil && !info.LongRunning {
		h.Activity.Begin()
		defer h.Activity.End()
	}
	rec := &recorder{ResponseWriter: w, code: http.StatusOK, stream: info.LongRunning}
	if h.Metrics != nil {
		// Counted as the answer begins: a watch (and a WatchList, which is
		// all an informer sends now) may last for hours.
		rec.answered = func() { h.Metrics.ClientRequests.WithLabelValues(clientLabel(info.Identity), rec.servedBy()).Inc() }
	}
	if h.Metrics != nil {
		g := h.inFlight[info.LongRunning]
		g.Inc()
		defer g.Dec()
	}
	r = r.WithContext(ctx)
	// Counted however the request ends: the reverse proxy aborts the
	// handler (panics with http.ErrAbortHandler) when a body breaks off
	// midway, because the client went away or the apiserver's connection
	// broke.
	completed := false
	defer func() {
		if completed {
			rec.finish()
		} else {
			// Aborted: what the buffer holds is dropped with the stream.
			rec.body = nil
			rec.code = statusBadGateway
			if r.Context().Err() != nil {
				rec.code = statusClientClosed
			}
		}
		h.observe(rec, info, start)
	}()
	var out http.ResponseWriter = rec
	if h.Rewrite != nil && r.Method != http.MethodHead {
		out = h.Rewrite.Wrap(rec, info, h.Log)
		if out != http.ResponseWriter(rec) {
			// An answer to rewrite is asked for uncompressed, watches
			// included (kube-apiserver gzips WatchList streams): these
			// few reads cost more bytes upstream, not a stream inflated
			// and compressed again here.
			r.Header = r.Header.Clone()
			r.Header.Del("Accept-Encoding")
		}
	}
	offline := h.Cache != nil && h.Online != nil && !h.Online()
	switch {
	case offline && info.Impersonating:
		// Answered as a user outpost does not know: by the apiserver only.
		rec.local = true
		status.WriteError(rec, status.Unavailable("outpost: the cloud is unreachable; a request with Impersonate-* headers is answered by the apiserver only", 5))
	case offline && h.Cache.Answers(r, info):
		h.Cache.Serve(out, r, info)
	case offline && h.Local != nil && h.Local.Answers(r, info):
		rec.local = true
		h.Local.Serve(out, r, info)
	case offline && r.Method != http.MethodGet && r.Method != http.MethodHead && !info.Upgrade:
		// A write nothing local may answer: say so now rather than after
		// a TLS handshake timeout on a dead link.
		rec.local = true
		status.WriteError(rec, status.Unavailable(fmt.Sprintf("outpost: the cloud is unreachable; %s %s must wait until it returns", info.Verb, r.URL.Path), 5))
	case !offline && h.Share != nil && h.Share.Serve(out, r, info):
	default:
		// Online, or nothing local can answer: the apiservers, which are
		// all still tried while every one is judged unhealthy.
		h.proxy.ServeHTTP(out, r)
	}
	if rw, ok := out.(*rewrite.Writer); ok {
		rw.Finish()
	}
	completed = true
}

// Codes counted for requests that got no whole answer.
const (
	// statusClientClosed: the client went away first (nginx's 499).
	statusClientClosed = 499
	// statusBadGateway: the apiserver's answer broke off midway.
	statusBadGateway = http.StatusBadGateway
)

// observe counts a request that ended in the metrics.
func (h *Handler) observe(rec *recorder, info *request.Info, start time.Time) {
	if h.Metrics != nil {
		resource := info.Resource
		if !info.IsResourceRequest {
			resource = "nonresource"
		} else if info.Subresource != "" {
			resource += "/" + info.Subresource
		}
		servedBy := rec.servedBy()
		h.Metrics.Requests.WithLabelValues(info.Verb, resource, codeString(rec.code), servedBy).Inc()
		if rec.answered != nil {
			// No answer began (the request broke off first).
			rec.answered()
		}
		end := rec.firstWrite
		if !info.LongRunning || end.IsZero() {
			end = time.Now()
		}
		h.Metrics.Duration.WithLabelValues(info.Verb, resource, servedBy).Observe(end.Sub(start).Seconds())
		h.responseBytes[servedBy].Add(float64(rec.bytes))
	}
}

// clientLabel names a caller in outpost_client_requests_total: this node,
// each service account (a node runs few), other users together.
func clientLabel(id request.Identity) string {
	switch {
	case id.Kind == request.NodeCert:
		return "node"
	case strings.HasPrefix(id.User, serviceAccountPrefix):
		ns, name, ok := strings.Cut(strings.TrimPrefix(id.User, serviceAccountPrefix), ":")
		if ok {
			return "serviceaccount:" + ns + "/" + name
		}
		return "user"
	case id.Kind == request.Anonymous:
		return "anonymous"
	}
	return "user"
}

const serviceAccountPrefix = "system:serviceaccount:"

// codeString is strconv.Itoa without an allocation for the usual codes.
func codeString(code int) string {
	switch code {
	case http.StatusOK:
		return "200"
	case http.StatusCreated:
		return "201"
	case http.StatusNotFound:
		return "404"
	case http.StatusConflict:
		return "409"
	}
	return strconv.Itoa(code)
}

func (h *Handler) reject(w http.ResponseWriter, r *http.Request, err error) {
	if h.Metrics != nil {
		reason := "unauthorized"
		if apierrors.IsForbidden(err) {
			reason = "forbidden"
		}
		h.Metrics.AuthFailures.WithLabelValues(reason).Inc()
	}
	h.Log.Info("caller rejected", "remote", r.RemoteAddr, "path", r.URL.Path, "err", err)
	status.WriteError(w, err)
}

// upstreamError answers a request that no apiserver answered. It runs
// before any byte of a response was written.
func (h *Handler) upstreamError(w http.ResponseWriter, r *http.Request, err error) {
	if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
		// The client went away; nobody reads an answer.
		if rec := recorderOf(w); rec != nil {
			rec.code = statusClientClosed
		}
		return
	}
	if info := request.From(r.Context()); info != nil && !info.Impersonating && h.Cache != nil && h.Cache.Answers(r, info) {
		// Answer at once from the cache rather than waiting for a probe to
		// declare the cloud gone.
		h.Log.Debug("no apiserver answered; serving from cache", "path", r.URL.Path, "err", err)
		h.Cache.Serve(w, r, info)
		return
	}
	h.Log.Warn("no apiserver answered", "method", r.Method, "path", r.URL.Path, "err", err)
	if rec := recorderOf(w); rec != nil {
		rec.local = true
	}
	status.WriteError(w, status.Unavailable("outpost: no apiserver reachable: "+err.Error(), 1))
}

// recorderOf finds the recorder in w or below it (under a rewrite.Writer).
func recorderOf(w http.ResponseWriter) *recorder {
	for {
		if rec, ok := w.(*recorder); ok {
			return rec
		}
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return nil
		}
		w = u.Unwrap()
	}
}

// recorder notes what the handler wrote, for metrics. It unwraps for
// http.ResponseController, so hijacking reaches the real writer; flushes do
// only for streams.
type recorder struct {
	http.ResponseWriter
	// stream is set for long-running requests, whose every flush must
	// reach the client at once (watch events, logs, upgraded streams).
	// Other answers without a Content-Length (lists) are sent in writes of
	// 32 KiB (body) and when they end: the reverse proxy would otherwise
	// flush after every read of such a body, and a small read costs as
	// much to send as a large one.
	stream     bool
	body       *bufio.Writer // the buffered body of an answer that is not a stream
	local      bool          // outpost itself answered (an error Status)
	code       int
	bytes      int64
	firstWrite time.Time
	// answered, if set, is called once, as the answer begins.
	answered func()
}

// servedBy is the served_by label of the answer.
func (r *recorder) servedBy() string {
	switch {
	case r.local:
		return servedByOutpost
	case r.Header().Get(reader.ServedByHeader) == servedByWatchCache:
		return servedByWatchCache
	case r.Header().Get(reader.ServedByHeader) != "":
		return servedByCache
	}
	return servedByUpstream
}

// begin notes that the answer begins.
func (r *recorder) begin() {
	r.firstWrite = time.Now()
	if r.answered != nil {
		r.answered()
		r.answered = nil
	}
}

func (r *recorder) WriteHeader(code int) {
	if r.firstWrite.IsZero() {
		r.code = code
		if code >= 200 {
			r.begin()
		}
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (n int, err error) {
	if r.firstWrite.IsZero() {
		r.begin()
	}
	if r.stream || (r.body == nil && r.Header().Get("Content-Length") != "") {
		// A body of known length is never flushed before its end.
		n, err = r.ResponseWriter.Write(b)
	} else {
		if r.body == nil {
			r.body = bodyBuffers.Get().(*bufio.Writer)
			r.body.Reset(r.ResponseWriter)
		}
		n, err = r.body.Write(b)
	}
	r.bytes += int64(n)
	return n, err
}

// finish sends what the body buffer still holds.
func (r *recorder) finish() {
	if r.body == nil {
		return
	}
	_ = r.body.Flush() // a client that went away is not an error of ours
	r.body.Reset(nil)
	bodyBuffers.Put(r.body)
	r.body = nil
}

// bodyBuffers gather an answer's body into writes of 32 KiB: an HTTP/2
// response writer sends each write that reaches past its own 4 KiB buffer
// as DATA frames at once, at the cost of a round trip between goroutines
// and often a write to the socket.
var bodyBuffers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 32<<10) }}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// FlushError is what http.ResponseController.Flush calls.
func (r *recorder) FlushError() error {
	if !r.stream {
		return nil
	}
	return http.NewResponseController(r.ResponseWriter).Flush()
}

// watchBody ends a watch stream cleanly when its apiserver connection
// breaks. A watch may end at any time (the apiserver ends them by timeout);
// clients then re-watch from their last resourceVersion, through a healthy
// server. Passing the break on instead would abort the client's HTTP/2
// stream with INTERNAL_ERROR and make informers log decode errors.
type watchBody struct {
	io.ReadCloser
}

func (b *watchBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		err = io.EOF
	}
	return n, err
}
