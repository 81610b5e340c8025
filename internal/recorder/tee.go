package recorder

import (
	"io"
	"net/http"
	"slices"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/local"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// Tee arranges for resp, the apiserver's answer to info, to be recorded
// while it streams to the client. It must be called before the body is
// read. Answers that are not cacheable, not 200, or of identities not
// recorded are left alone.
func (c *Recorder) Tee(resp *http.Response, info *request.Info) {
	c.init()
	if (resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusCreated) || resp.Request == nil || info == nil {
		return
	}
	if info.Identity.Kind == request.Anonymous || (c.Record != nil && !c.Record(info.Identity)) {
		return
	}
	if enc := resp.Header.Get("Content-Encoding"); enc != "" && enc != "identity" && enc != "gzip" {
		return
	}
	if resp.StatusCode == http.StatusCreated && c.RecordsToken != nil && c.RecordsToken(info) {
		ns, sa, contentType := info.Namespace, info.Name, resp.Header.Get("Content-Type")
		c.teeWhole(resp, nil, func(body []byte) {
			if key, tok, ok := local.RecordedToken(contentType, body, ns, sa); ok {
				c.send(write{doc: &doc{key: key, contentType: codec.MediaJSON, body: tok}}, nil, "queue-full")
			}
		})
		return
	}
	if resp.StatusCode != http.StatusOK {
		return
	}
	view, asked := info.View, info.Options.Continue
	contentType := resp.Header.Get("Content-Type")
	switch info.Class {
	case request.GetObject, request.ListObjects:
		var cl *claim
		c.teeOrdered(resp, view, func(body []byte, whole bool) bool {
			if cl == nil {
				// The answer's start (a gzipped answer's, inflated) is
				// enough to tell one the view holds already, or that
				// another answer at the same version is being recorded
				// (many clients list the same thing at once): the tee
				// asks while the answer streams, and copies no more of
				// it, nor inflates or decodes it.
				var held bool
				if held, cl = c.claim(view, contentType, body, info.Class == request.ListObjects, asked); held {
					return true
				}
			}
			if !whole {
				return false
			}
			if info.Class == request.GetObject {
				c.recordObject(view, contentType, body, cl)
			} else {
				c.recordList(asked, view, contentType, body, cl)
			}
			return true
		})
	case request.Table:
		key := TableKey(info)
		c.teeWhole(resp, nil, func(body []byte) {
			c.send(write{doc: &doc{key: key, contentType: contentType, body: body}}, nil, "queue-full")
		})
	case request.Document:
		key := DocKey(info)
		c.teeWhole(resp, nil, func(body []byte) {
			c.send(write{doc: &doc{key: key, contentType: contentType, body: body}}, nil, "queue-full")
		})
	case request.WatchObjects:
		c.teeWatch(resp, view, contentType, info.Options.SendInitialEvents)
	}
}

// teeWhole copies the body as the client reads it and, once it has been
// read to the end, hands the copy to a decoder. A body that is cut off,
// too large, or that finds the queue full is dropped.
func (c *Recorder) teeWhole(resp *http.Response, view *store.ViewKey, done func(body []byte)) {
	gz := resp.Header.Get("Content-Encoding") == "gzip"
	resp.Body = &wholeTee{ReadCloser: resp.Body, c: c, limit: c.MaxBody, done: func(body []byte, ok bool, reason string) {
		if !ok {
			c.drop(view, reason)
			return
		}
		job := func() {
			if gz {
				var err error
				if body, err = gunzip(body); err != nil {
					c.drop(view, "undecodable")
					return
				}
			}
			done(body)
		}
		select {
		case c.jobs <- job:
		default:
			c.drop(view, "queue-full")
		}
	}}
}

// teeOrdered is teeWhole for answers that replace a view. Watch events
// for the view that arrive while the answer is being decoded are held by
// the writer until it has applied the answer, so an informer's list never
// overwrites the watch events that follow it.
//
// record is called with the whole body (whole), and first, for a gzipped
// body, with its start inflated: when record then says it is done (an
// answer the view holds already) the rest is not inflated.
func (c *Recorder) teeOrdered(resp *http.Response, view store.ViewKey, record func(body []byte, whole bool) (done bool)) {
	gz := resp.Header.Get("Content-Encoding") == "gzip"
	t := &wholeTee{ReadCloser: resp.Body, c: c, limit: c.MaxBody, pooled: true, checkAt: checkFirst}
	if n := resp.ContentLength; n > 0 && n <= int64(c.MaxBody) {
		t.size = int(n)
	}
	checked := false
	t.check = func(start []byte) (skip bool) {
		head := start
		if gz {
			head = inflatePrefix(start, inflateHead)
		}
		skip = record(head, false)
		checked = true
		return skip
	}
	t.done = func(raw []byte, ok bool, reason string) {
		if !ok {
			c.drop(&view, reason)
			return
		}
		if reason == skipped { // the view holds it, or another copy is recorded
			if c.Metrics != nil {
				c.Metrics.CacheSkipped.Inc()
			}
			return
		}
		c.hold(view)
		job := func() {
			defer func() { c.writes <- write{release: &view} }() // after the replace, in order
			defer putBody(raw)
			if !gz {
				record(raw, true)
				return
			}
			if checked {
				// Its start was asked about already, while it streamed.
				body, err := gunzip(raw)
				if err != nil {
					c.drop(&view, "undecodable")
					return
				}
				record(body, true)
				putBody(body)
				return
			}
			body, err := inflate(raw, func(head []byte) bool { return record(head, false) })
			switch {
			case err != nil:
				c.drop(&view, "undecodable")
			case body != nil:
				record(body, true)
				putBody(body)
			}
		}
		select {
		case c.jobs <- job:
		default:
			c.unhold(view)
			putBody(raw)
			c.drop(&view, "queue-full")
		}
	}
	resp.Body = t
}

func (c *Recorder) hold(view store.ViewKey) {
	c.mu.Lock()
	c.pending[view]++
	c.mu.Unlock()
}

func (c *Recorder) unhold(view store.ViewKey) (left int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pending[view] > 0 {
		c.pending[view]--
	}
	left = c.pending[view]
	if left == 0 {
		delete(c.pending, view)
	}
	return left
}

// holdUntilWritten ends a hold once what was queued for view before it is
// written: the writer then applies the events it held. When the queue is
// full the hold ends at once; the events held are applied at the writer's
// next flush.
func (c *Recorder) holdUntilWritten(view store.ViewKey) {
	select {
	case c.writes <- write{release: &view}:
	default:
		c.unhold(view)
	}
}

func (c *Recorder) held(view store.ViewKey) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending[view] > 0
}

// checkFirst and checkLast bound how much of an answer a tee copies
// before it asks check: the metadata comes first, within a few hundred
// bytes of JSON or protobuf, but a gzipped answer may need more to inflate
// that far; the tee asks again at twice as much until checkLast.
const (
	checkFirst = 16 << 10
	checkLast  = 256 << 10
)

// skipped is the reason done is given, with ok, for an answer check said
// needs no recording.
const skipped = "skipped"

type wholeTee struct {
	io.ReadCloser
	c        *Recorder
	limit    int
	size     int  // the body's length when known, to allocate once
	pooled   bool // buf comes from (and goes back to) the body pool
	buf      []byte
	held     int64
	dropped  string
	skipped  bool // check said no copy is needed
	finished bool
	// check, if set, is asked with the start of the body once checkAt
	// bytes are copied, until it can tell (it returns once it did or
	// checkLast is passed), whether the answer needs recording at all:
	// skip ends the copy, and done is then called with a nil body.
	check   func(start []byte) (skip bool)
	checkAt int
	done    func(body []byte, ok bool, reason string)
}

func (t *wholeTee) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	if n > 0 && t.dropped == "" && !t.skipped {
		if len(t.buf)+n > t.limit {
			t.release("too-large")
		} else if t.c.buffer(int64(n)) > t.c.MaxBuffered {
			t.c.buffer(-int64(n))
			t.release("memory")
		} else {
			if t.buf == nil {
				size := t.size
				switch {
				case size == 0:
					// No Content-Length: a list the apiserver streams,
					// most likely tens or hundreds of KiB.
					size = max(n, 64<<10)
				case t.check != nil:
					// Room for what check reads first: the rest once
					// check says the copy is needed.
					size = min(size, max(n, 2*checkFirst))
				}
				if t.pooled {
					t.buf = getBody(size)
				} else {
					t.buf = make([]byte, 0, size)
				}
			}
			if len(t.buf)+n > cap(t.buf) {
				// Double, rather than append's quarter once large: a
				// list of 12 MB streamed without a length otherwise
				// allocates five times its size on the way.
				t.buf = slices.Grow(t.buf, max(cap(t.buf), n))
			}
			t.held += int64(n)
			t.buf = append(t.buf, p[:n]...)
			t.ask()
		}
	}
	if err == io.EOF && !t.finished {
		t.finished = true
		switch {
		case t.dropped != "":
			t.done(nil, false, t.dropped)
		case t.skipped:
			t.done(nil, true, skipped)
		default:
			body := t.buf
			t.c.buffer(-t.held)
			t.buf, t.held = nil, 0
			t.done(body, true, "")
		}
	}
	return n, err
}

// buffer adds n to the bytes tees hold, and returns the sum.
func (c *Recorder) buffer(n int64) int64 {
	if c.Metrics != nil {
		c.Metrics.RecordingBytes.Add(float64(n))
	}
	return c.buffered.Add(n)
}

// ask asks check, if it is due.
func (t *wholeTee) ask() {
	if t.check == nil || len(t.buf) < t.checkAt {
		return
	}
	switch {
	case t.check(t.buf):
		t.release("")
		t.skipped = true
		t.check = nil
		return
	case t.checkAt >= checkLast:
		t.check = nil // the whole answer will tell
	default:
		t.checkAt *= 2
	}
	if t.size > cap(t.buf) {
		// Needed, or not told yet: room for the whole, at once.
		t.buf = slices.Grow(t.buf, t.size-len(t.buf))
	}
}

func (t *wholeTee) release(reason string) {
	t.dropped = reason
	t.c.buffer(-t.held)
	if t.pooled {
		putBody(t.buf)
	}
	t.buf, t.held = nil, 0
}

func (t *wholeTee) Close() error {
	if !t.finished {
		t.finished = true
		if t.skipped {
			t.done(nil, true, skipped) // nothing was to be recorded anyway
			return t.ReadCloser.Close()
		}
		if t.dropped == "" {
			t.release("cut-off")
		}
		t.done(nil, false, t.dropped)
	}
	return t.ReadCloser.Close()
}
