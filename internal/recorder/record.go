package recorder

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"io"
	"net/http"
	"slices"
	"sync"

	"k8s.io/apimachinery/pkg/watch"

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
				// (many clients list the same thing at once), without
				// inflating or decoding the rest.
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
	t := &wholeTee{ReadCloser: resp.Body, c: c, limit: c.MaxBody, pooled: true}
	if n := resp.ContentLength; n > 0 && n <= int64(c.MaxBody) {
		t.size = int(n)
	}
	t.done = func(raw []byte, ok bool, reason string) {
		if !ok {
			c.drop(&view, reason)
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

func (c *Recorder) held(view store.ViewKey) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending[view] > 0
}

type wholeTee struct {
	io.ReadCloser
	c        *Recorder
	limit    int
	size     int  // the body's length when known, to allocate once
	pooled   bool // buf comes from (and goes back to) the body pool
	buf      []byte
	held     int64
	dropped  string
	finished bool
	done     func(body []byte, ok bool, reason string)
}

func (t *wholeTee) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	if n > 0 && t.dropped == "" {
		if len(t.buf)+n > t.limit {
			t.release("too-large")
		} else if t.c.buffered.Add(int64(n)) > t.c.MaxBuffered {
			t.c.buffered.Add(-int64(n))
			t.release("memory")
		} else {
			if t.buf == nil {
				size := t.size
				if size == 0 {
					// No Content-Length: a list the apiserver streams,
					// most likely tens or hundreds of KiB.
					size = max(n, 64<<10)
				}
				if t.pooled {
					t.buf = getBody(size)
				} else {
					t.buf = make([]byte, 0, size)
				}
			}
			t.held += int64(n)
			t.buf = append(t.buf, p[:n]...)
		}
	}
	if err == io.EOF && !t.finished {
		t.finished = true
		if t.dropped != "" {
			t.done(nil, false, t.dropped)
		} else {
			body := t.buf
			t.c.buffered.Add(-t.held)
			t.buf, t.held = nil, 0
			t.done(body, true, "")
		}
	}
	return n, err
}

func (t *wholeTee) release(reason string) {
	t.dropped = reason
	t.c.buffered.Add(-t.held)
	if t.pooled {
		putBody(t.buf)
	}
	t.buf, t.held = nil, 0
}

func (t *wholeTee) Close() error {
	if !t.finished {
		t.finished = true
		if t.dropped == "" {
			t.release("cut-off")
		}
		t.done(nil, false, t.dropped)
	}
	return t.ReadCloser.Close()
}

// recordObject records a GET answer for view. With a claim (see
// Recorder.claim), it was checked already; the claim is released once the
// answer is written or found not to need writing.
func (c *Recorder) recordObject(view store.ViewKey, contentType string, body []byte, cl *claim) {
	queued := false
	defer func() {
		if !queued {
			c.unclaim(cl)
		}
	}()
	if cl == nil && c.holds(view, contentType, body, false, "") {
		return
	}
	o, kind, apiVersion, err := codec.DecodeObject(contentType, body, view.Resource)
	if err != nil {
		c.undecodable(&view, err)
		return
	}
	if c.unchanged(view, o.ResourceVersion) {
		return
	}
	v := store.View{Key: view, ResourceVersion: o.ResourceVersion, Kind: kind + "List", APIVersion: apiVersion, Updated: c.Now()}
	queued = c.send(write{replace: &replaceView{view: v, objs: []store.Object{o}, claim: cl}}, &view, "queue-full")
}

// pagedList collects the pages of one paginated list until the last.
type pagedList struct {
	next  string // the continue token the next page must be asked with
	items []store.Object
}

// maxPagedObjects bounds what one paginated list may hold in memory.
const maxPagedObjects = 1_000_000

// recordList records a LIST answer (or a page of one, asked with the
// continue token asked) for view; cl as for recordObject.
func (c *Recorder) recordList(asked string, view store.ViewKey, contentType string, body []byte, cl *claim) {
	queued := false
	defer func() {
		if !queued {
			c.unclaim(cl)
		}
	}()
	if cl == nil && c.holds(view, contentType, body, true, asked) {
		return
	}
	l, err := c.decodeList(view, contentType, body)
	if err != nil {
		c.undecodable(&view, err)
		return
	}
	items := l.Items
	// A paginated list replaces its view only when its last page arrived.
	if asked != "" || l.Continue != "" {
		c.mu.Lock()
		p := c.pages[view]
		switch {
		case asked == "":
			p = &pagedList{}
		case p == nil || p.next != asked:
			// A page of a chain we did not see start: nothing to replace.
			delete(c.pages, view)
			c.mu.Unlock()
			return
		}
		p.items = append(p.items, l.Items...)
		p.next = l.Continue
		if l.Continue != "" && len(p.items) <= maxPagedObjects {
			c.pages[view] = p
			c.mu.Unlock()
			return
		}
		delete(c.pages, view)
		c.mu.Unlock()
		if l.Continue != "" {
			c.drop(&view, "too-large")
			return
		}
		items = p.items
	}
	if c.unchanged(view, l.ResourceVersion) {
		return
	}
	v := store.View{Key: view, ResourceVersion: l.ResourceVersion, Kind: l.Kind, APIVersion: l.APIVersion, Updated: c.Now()}
	queued = c.send(write{replace: &replaceView{view: v, objs: items, claim: cl}}, &view, "queue-full")
}

// decodeList decodes a list answer for view, taking the items that have
// not changed since they were stored (the same resourceVersion) from the
// store instead of decoding them again: a re-list, or a list whose
// resourceVersion moved because anything in the cluster was written, is
// mostly such items.
func (c *Recorder) decodeList(view store.ViewKey, contentType string, body []byte) (l codec.List, err error) {
	rerr := c.Store.Read(func(tx *store.Tx) error {
		var known codec.Stored
		if tx.HasObjects(view.Resource) { // else, as when first listed, no lookups
			known = func(namespace, name, rv string) (store.Object, bool) {
				o, ok, err := tx.Get(view.Resource, namespace, name)
				return o, err == nil && ok && o.ResourceVersion == rv
			}
		}
		l, err = codec.DecodeList(contentType, body, view.Resource, known)
		return nil
	})
	if rerr != nil {
		// The store cannot be read: decode everything.
		return codec.DecodeList(contentType, body, view.Resource, nil)
	}
	return l, err
}

// holds reports whether view already holds the answer body (or the start
// of it) without decoding it: the answer's resourceVersion, read where the
// apiserver writes it, is the view's. Unchanged objects and lists, which
// clients read again and again, then cost neither a decode nor a write. A
// list must be whole (neither a page, asked with a continue token, nor the
// first page of several).
func (c *Recorder) holds(view store.ViewKey, contentType string, body []byte, list bool, asked string) bool {
	rv, cont, ok := codec.PeekMeta(contentType, body, list)
	if !ok || cont != "" || asked != "" {
		return false
	}
	return c.unchanged(view, rv)
}

// A claim marks an answer at one resourceVersion of a view as being
// recorded, from when its start was read until the store holds it (or it
// was found not to need writing, or was dropped). Identical answers that
// arrive meanwhile, as when many clients list the same thing at once, are
// then neither inflated nor decoded nor written again.
type claim struct {
	view store.ViewKey
	rv   string
}

// claim reports whether the answer starting with body need not be recorded
// (held): the view holds it, or another answer at the same version is
// being recorded. Otherwise it returns the claim the recording must
// release (nil when the start does not tell the version).
func (c *Recorder) claim(view store.ViewKey, contentType string, body []byte, list bool, asked string) (held bool, cl *claim) {
	rv, cont, ok := codec.PeekMeta(contentType, body, list)
	if !ok || rv == "" || cont != "" || asked != "" {
		return false, nil
	}
	if c.unchanged(view, rv) {
		return true, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if other := c.claims[view]; other != nil && other.rv == rv {
		return true, nil
	}
	cl = &claim{view: view, rv: rv}
	c.claims[view] = cl
	return false, cl
}

// unclaim releases cl, unless a newer claim replaced it.
func (c *Recorder) unclaim(cl *claim) {
	if cl == nil {
		return
	}
	c.mu.Lock()
	if c.claims[cl.view] == cl {
		delete(c.claims, cl.view)
	}
	c.mu.Unlock()
}

// unchanged reports whether view already holds this answer: the same
// resourceVersion, and not stale. Repeated reads of an unchanged object or
// list then cost no write at all.
func (c *Recorder) unchanged(view store.ViewKey, rv string) bool {
	if rv == "" {
		return false
	}
	v, ok, err := c.Store.View(view)
	return err == nil && ok && !v.Stale && v.ResourceVersion == rv
}

func (c *Recorder) undecodable(view *store.ViewKey, err error) {
	c.Log.Debug("recorded answer not understood; dropped", "resource", view.Resource, "err", err)
	c.dropped(view, "undecodable", err)
}

// teeWatch copies a watch stream into a non-blocking pipe read by a decoder
// goroutine. For a WatchList (sendInitialEvents=true) the initial events
// replace the view when the initial-events-end bookmark arrives.
func (c *Recorder) teeWatch(resp *http.Response, view store.ViewKey, contentType string, watchList bool) {
	// kube-apiserver gzips watches for clients that accept it, flushing the
	// compressor at every event, so the copy decompresses as it goes.
	gz := resp.Header.Get("Content-Encoding") == "gzip"
	pipe := newPipe(16 << 20)
	resp.Body = &watchTee{ReadCloser: resp.Body, pipe: pipe}
	c.Log.Debug("recording watch", "resource", view.Resource, "identity", view.Identity, "watchList", watchList, "contentType", contentType)
	c.watches.Add(1)
	go func() {
		defer c.watches.Done()
		c.recordWatch(pipe, gz, view, contentType, watchList)
	}()
}

func (c *Recorder) recordWatch(pipe *pipe, gz bool, view store.ViewKey, contentType string, watchList bool) {
	defer pipe.CloseRead()
	var body io.ReadCloser = pipe
	if gz {
		zr, err := gzip.NewReader(pipe)
		if err != nil {
			c.Log.Debug("watch recording ended before it began", "resource", view.Resource, "err", err)
			return
		}
		body = zr
	}
	dec, err := codec.NewWatchDecoder(contentType, body, view.Resource)
	if err != nil {
		c.undecodable(&view, err)
		return
	}
	var initial []store.Object
	initialDone := !watchList
	for {
		ev, err := dec.Next()
		if err != nil {
			c.Log.Debug("watch recording ended", "resource", view.Resource, "identity", view.Identity, "err", err, "initialDone", initialDone)
			if errors.Is(err, errOverflow) {
				c.drop(&view, "watch-behind")
			} else if err != io.EOF && !errors.Is(err, errPipeClosed) {
				c.undecodable(&view, err)
			} else if !initialDone {
				c.drop(&view, "cut-off")
			}
			return
		}
		switch {
		case ev.Type == watch.Error:
			// An expired resourceVersion or the like: the client re-lists.
			return
		case !initialDone && ev.Type == watch.Added:
			initial = append(initial, ev.Object)
		case !initialDone && ev.Type == watch.Bookmark && ev.InitialEventsEnd:
			initialDone = true
			v := store.View{Key: view, ResourceVersion: ev.Object.ResourceVersion, Updated: c.Now(), Kind: ev.Kind + "List", APIVersion: ev.APIVersion}
			c.send(write{replace: &replaceView{view: v, objs: initial}}, &view, "queue-full")
			initial = nil
		case !initialDone:
			// Events before the end of the initial ones are part of them.
			if ev.Type != watch.Bookmark {
				initial = append(initial, ev.Object)
			}
		default:
			c.send(write{events: []store.Event{{Type: store.EventType(ev.Type), View: view, Object: ev.Object}}}, &view, "queue-full")
		}
	}
}

type watchTee struct {
	io.ReadCloser
	pipe *pipe
}

func (t *watchTee) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	if n > 0 {
		t.pipe.Write(p[:n])
	}
	if err != nil {
		t.pipe.CloseWrite()
	}
	return n, err
}

func (t *watchTee) Close() error {
	t.pipe.CloseWrite()
	return t.ReadCloser.Close()
}

var (
	errOverflow   = errors.New("watch recorder fell behind")
	errPipeClosed = errors.New("pipe closed")
)

// pipe is a bounded buffer whose writer never blocks: past its limit it
// drops everything and the reader sees errOverflow.
type pipe struct {
	mu       sync.Mutex // guards the fields below
	cond     *sync.Cond
	buf      bytes.Buffer
	limit    int
	overflow bool
	wclosed  bool
	rclosed  bool
}

func newPipe(limit int) *pipe {
	p := &pipe{limit: limit}
	p.cond = sync.NewCond(&p.mu)
	return p
}

func (p *pipe) Write(b []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.overflow || p.rclosed || p.wclosed {
		return
	}
	if p.buf.Len()+len(b) > p.limit {
		p.overflow = true
		p.buf.Reset()
	} else {
		p.buf.Write(b)
	}
	p.cond.Signal()
}

func (p *pipe) Read(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.buf.Len() == 0 && !p.overflow && !p.wclosed && !p.rclosed {
		p.cond.Wait()
	}
	switch {
	case p.overflow:
		return 0, errOverflow
	case p.buf.Len() > 0:
		return p.buf.Read(b)
	case p.rclosed:
		return 0, errPipeClosed
	default:
		return 0, io.EOF
	}
}

func (p *pipe) CloseWrite() {
	p.mu.Lock()
	p.wclosed = true
	p.cond.Signal()
	p.mu.Unlock()
}

func (p *pipe) CloseRead() {
	p.mu.Lock()
	p.rclosed = true
	p.buf.Reset()
	p.cond.Signal()
	p.mu.Unlock()
}

// Close lets the pipe be handed to decoders as an io.ReadCloser.
func (p *pipe) Close() error { p.CloseRead(); return nil }

func gunzip(b []byte) ([]byte, error) {
	return inflate(b, nil)
}

// inflateHead is how much of a gzipped answer is inflated first to peek at
// its metadata, which the apiserver writes in its first hundred bytes or so.
const inflateHead = 4 << 10

// inflatedSize guesses the size of gzipped b inflated, to allocate once:
// its trailer says it (modulo 4 GiB), unless it lies or b holds several
// members, so the guess is bounded by deflate's greatest ratio (1032:1);
// a little room past it lets the last read see the end without growing.
// Without a trailer: compressed Kubernetes JSON and protobuf are a fifth to
// a tenth of their size.
func inflatedSize(b []byte) int {
	if len(b) < 18 { // the smallest gzip member
		return 4 << 10
	}
	n := int(binary.LittleEndian.Uint32(b[len(b)-4:]))
	if n == 0 || n > 1032*len(b) {
		return min(max(4*len(b), 4<<10), 64<<20)
	}
	return n + 512
}

// inflate decompresses the gzipped b into a buffer from the body pool. If
// head is set, it is first called with the start of the result, and when
// it returns true inflate stops there and returns nil.
func inflate(b []byte, head func([]byte) bool) ([]byte, error) {
	zr, _ := gzipReaders.Get().(*gzip.Reader)
	var err error
	if zr == nil {
		zr, err = gzip.NewReader(bytes.NewReader(b))
	} else {
		err = zr.Reset(bytes.NewReader(b))
	}
	if err != nil {
		return nil, err
	}
	defer gzipReaders.Put(zr)
	size := inflatedSize(b)
	var out []byte
	if head != nil {
		// The start goes into a small buffer of its own: most answers
		// end here, and need no room for the whole.
		start, eof, err := readFull(zr, make([]byte, 0, min(size, inflateHead)))
		switch {
		case err != nil:
			return nil, err
		case head(start):
			return nil, nil
		case eof:
			return start, nil
		}
		out = append(getBody(size), start...)
	} else {
		out = getBody(size)
	}
	for {
		if len(out) == cap(out) {
			out = slices.Grow(out, len(out))
		}
		var eof bool
		if out, eof, err = readFull(zr, out); err != nil {
			putBody(out)
			return nil, err
		}
		if eof {
			return out, nil
		}
	}
}

// readFull reads from r into buf's spare room until it is full (eof false)
// or r ends (eof true).
func readFull(r io.Reader, buf []byte) (_ []byte, eof bool, err error) {
	for len(buf) < cap(buf) {
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, true, nil
		}
		if err != nil {
			return buf, false, err
		}
	}
	return buf, false, nil
}

var gzipReaders sync.Pool

// bodies lends buffers for recorded answers, which are copied and
// decoded off the request path and then dropped: a list of a thousand
// objects is half a megabyte, read again at every re-list. Small bodies
// (single objects) are not worth pooling.
var bodies sync.Pool

// minPooledBody and maxPooledBody bound the buffers kept for reuse; the
// upper bound keeps one huge list from staying in memory after it was
// recorded.
const (
	minPooledBody = 16 << 10
	maxPooledBody = 4 << 20
)

// getBody returns an empty buffer with room for at least n bytes.
func getBody(n int) []byte {
	if n < minPooledBody {
		return make([]byte, 0, n)
	}
	if p, _ := bodies.Get().(*[]byte); p != nil {
		if cap(*p) >= n {
			return (*p)[:0]
		}
		bodies.Put(p)
	}
	return make([]byte, 0, n)
}

// putBody gives b back once nothing refers to it any more.
func putBody(b []byte) {
	if cap(b) < minPooledBody || cap(b) > maxPooledBody {
		return
	}
	b = b[:0]
	bodies.Put(&b)
}
