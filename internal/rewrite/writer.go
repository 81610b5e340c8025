package rewrite

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/internal/request"
)

// Writer rewrites one answer as it is written: a whole body (get, list) at
// Finish, a watch event by event as each is complete. It sits between the
// proxy and the client, after the recorder has taken its copy, and it sees
// the apiserver's answers and the cache's alike.
type Writer struct {
	http.ResponseWriter
	rules *Rules
	kind  kind
	watch bool
	log   *slog.Logger

	mode mode
	code int
	buf  bytes.Buffer
	// failed: the answer could not be rewritten; the rest goes out as is.
	failed bool
}

type mode int

const (
	undecided mode = iota
	passThrough
	wholeJSON
	wholeProtobuf
	eventsJSON     // JSON watch events, one per line
	eventsProtobuf // length-delimited protobuf watch events
)

// Wrap returns the writer to answer info into, or w itself when nothing of
// that answer is to change for its caller. Call Finish on a Writer when the
// answer is complete.
func (r *Rules) Wrap(w http.ResponseWriter, info *request.Info, log *slog.Logger) http.ResponseWriter {
	k := r.target(info)
	if k == none {
		return w
	}
	return &Writer{ResponseWriter: w, rules: r, kind: k, watch: info.Watch, log: log}
}

// WriteHeader decides from the status and media type how to rewrite.
func (w *Writer) WriteHeader(code int) {
	if w.mode != undecided || code < 200 {
		w.ResponseWriter.WriteHeader(code)
		return
	}
	w.mode = w.modeFor(code)
	w.log.Debug("answer may point the kubernetes Service at outpost", "kind", w.kind.String(), "mode", int(w.mode), "content-type", w.Header().Get("Content-Type"), "content-encoding", w.Header().Get("Content-Encoding"), "watch", w.watch)
	switch w.mode {
	case wholeJSON, wholeProtobuf:
		// The length changes; it is set again at Finish.
		w.code = code
		w.Header().Del("Content-Length")
		return
	case eventsJSON, eventsProtobuf:
		w.Header().Del("Content-Length")
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *Writer) modeFor(code int) mode {
	if code != http.StatusOK {
		return passThrough
	}
	h := w.Header()
	ct := h.Get("Content-Type")
	json := strings.HasPrefix(ct, "application/json")
	protobuf := strings.HasPrefix(ct, "application/vnd.kubernetes.protobuf")
	switch enc := h.Get("Content-Encoding"); {
	case w.watch && enc == "" && json:
		return eventsJSON
	case w.watch && enc == "" && protobuf:
		return eventsProtobuf
	case w.watch:
		return passThrough
	case enc != "" && enc != "gzip":
		return passThrough
	case json:
		return wholeJSON
	case protobuf:
		return wholeProtobuf
	}
	// CBOR and anything else go out unchanged (kubelet and kube-proxy
	// speak protobuf, other clients JSON).
	return passThrough
}

// Write takes body bytes in.
func (w *Writer) Write(p []byte) (int, error) {
	if w.mode == undecided {
		w.WriteHeader(http.StatusOK)
	}
	switch w.mode {
	case wholeJSON, wholeProtobuf:
		return w.buf.Write(p)
	case eventsJSON, eventsProtobuf:
		if w.failed {
			return w.ResponseWriter.Write(p)
		}
		w.buf.Write(p)
		if err := w.events(); err != nil {
			return len(p), err
		}
		return len(p), nil
	}
	return w.ResponseWriter.Write(p)
}

// maxFrame bounds one protobuf watch event (kube-apiserver's objects are
// at most a few MB).
const maxFrame = 64 << 20

// events writes out every complete event in buf, rewritten.
func (w *Writer) events() error {
	for {
		data := w.buf.Bytes()
		var frame []byte
		if w.mode == eventsJSON {
			i := bytes.IndexByte(data, '\n')
			if i < 0 {
				return nil
			}
			frame = data[:i+1]
		} else {
			if len(data) < 4 {
				return nil
			}
			n := int(binary.BigEndian.Uint32(data))
			if n > maxFrame {
				// Not a watch event anyone sends: the rest goes out as it
				// comes rather than be held in memory.
				w.fail(fmt.Errorf("watch event of %d bytes", n))
				_, err := w.ResponseWriter.Write(data)
				w.buf.Reset()
				return err
			}
			if len(data) < 4+n {
				return nil
			}
			frame = data[:4+n]
		}
		out, err := w.event(frame)
		if err != nil {
			// Sent as it came: a client gets the apiserver's truth
			// rather than a broken stream.
			w.fail(err)
			out = frame
		}
		w.buf.Next(len(frame))
		if _, err := w.ResponseWriter.Write(out); err != nil {
			return err
		}
		if w.failed {
			_, err := w.ResponseWriter.Write(w.buf.Bytes())
			w.buf.Reset()
			return err
		}
	}
}

// event returns one watch event frame rewritten.
func (w *Writer) event(frame []byte) ([]byte, error) {
	if w.mode == eventsJSON {
		if !mayHoldJSON(frame) {
			return frame, nil
		}
		var ev struct {
			Type   string          `json:"type"`
			Object json.RawMessage `json:"object"`
		}
		if err := json.Unmarshal(frame, &ev); err != nil {
			return nil, fmt.Errorf("decoding watch event: %w", err)
		}
		obj, err := w.rules.rewriteJSON(w.kind, ev.Object)
		if err != nil || bytes.Equal(obj, ev.Object) {
			return frame, err
		}
		ev.Object = bytes.TrimSuffix(obj, []byte("\n"))
		out, err := json.Marshal(ev)
		if err != nil {
			return nil, err
		}
		return append(out, '\n'), nil
	}
	if !mayHoldProtobuf(frame) {
		return frame, nil
	}
	var ev metav1.WatchEvent
	if err := ev.Unmarshal(frame[4:]); err != nil {
		return nil, fmt.Errorf("decoding watch event: %w", err)
	}
	obj, err := w.rules.rewriteProtobuf(w.kind, ev.Object.Raw)
	if err != nil || bytes.Equal(obj, ev.Object.Raw) {
		return frame, err
	}
	ev.Object.Raw = obj
	msg, err := ev.Marshal()
	if err != nil {
		return nil, err
	}
	out := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(msg)), uint32(len(msg)))
	return append(out, msg...), nil
}

func (w *Writer) fail(err error) {
	if !w.failed {
		w.failed = true
		w.log.Warn("cannot point the kubernetes Service at outpost in an answer; it goes out as the apiserver sent it", "err", err)
	}
}

// FlushError flushes what complete events were written; a whole body is
// flushed by Finish.
func (w *Writer) FlushError() error {
	switch w.mode {
	case wholeJSON, wholeProtobuf:
		return nil
	}
	return http.NewResponseController(w.ResponseWriter).Flush()
}

// Flush is FlushError for callers that assert http.Flusher.
func (w *Writer) Flush() { _ = w.FlushError() }

// Unwrap lets http.ResponseController reach the writer below.
func (w *Writer) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Finish sends a whole body, rewritten, or what remains of a stream.
func (w *Writer) Finish() {
	switch w.mode {
	case wholeJSON, wholeProtobuf:
	case eventsJSON, eventsProtobuf:
		// A partial event at the end of a broken stream, as it came.
		if w.buf.Len() > 0 {
			_, _ = w.ResponseWriter.Write(w.buf.Bytes())
			w.buf.Reset()
		}
		return
	default:
		return
	}
	body := w.buf.Bytes()
	out, err := w.whole(body)
	if err != nil {
		w.fail(err)
		out = body
	} else {
		// whole returns the body uncompressed.
		w.Header().Del("Content-Encoding")
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(out)))
	w.ResponseWriter.WriteHeader(w.code)
	_, _ = w.ResponseWriter.Write(out)
	w.buf.Reset()
}

// whole returns a whole answer rewritten (and no longer compressed).
func (w *Writer) whole(body []byte) ([]byte, error) {
	if w.Header().Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(bytes.NewReader(body))
		if err != nil {
			return nil, fmt.Errorf("inflating answer: %w", err)
		}
		if body, err = io.ReadAll(zr); err != nil {
			return nil, fmt.Errorf("inflating answer: %w", err)
		}
	}
	if w.mode == wholeJSON {
		return w.rules.rewriteJSON(w.kind, body)
	}
	return w.rules.rewriteProtobuf(w.kind, body)
}
