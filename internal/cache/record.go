package cache

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"sync"

	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// Tee arranges for resp, the apiserver's answer to info, to be recorded
// while it streams to the client. It must be called before the body is
// read. Answers that are not cacheable, not 200, or of identities not
// recorded are left alone.
func (c *Cache) Tee(resp *http.Response, info *request.Info) {
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
	if resp.StatusCode == http.StatusCreated && isTokenRequest(info) && c.ownNode(info) {
		c.teeToken(resp, info)
		return
	}
	r := resp.Request
	if resp.StatusCode != http.StatusOK {
		return
	}
	k, view, _ := classify(r, info)
	contentType := resp.Header.Get("Content-Type")
	switch k {
	case getObject, listObjects:
		c.teeOrdered(resp, view, func(body []byte) {
			if k == getObject {
				c.recordObject(view, contentType, body)
			} else {
				c.recordList(r, view, contentType, body)
			}
		})
	case table:
		key := tableKey(view.Identity, r)
		c.teeWhole(resp, nil, func(body []byte) {
			c.send(write{doc: &doc{key: key, contentType: contentType, body: body}}, nil, "queue-full")
		})
	case document:
		key := docKey(r)
		c.teeWhole(resp, nil, func(body []byte) {
			c.send(write{doc: &doc{key: key, contentType: contentType, body: body}}, nil, "queue-full")
		})
	case watchObjects:
		c.teeWatch(resp, view, contentType, r.URL.Query().Get("sendInitialEvents") == "true")
	}
}

// teeWhole copies the body as the client reads it and, once it has been
// read to the end, hands the copy to a decoder. A body that is cut off,
// too large, or that finds the queue full is dropped.
func (c *Cache) teeWhole(resp *http.Response, view *store.ViewKey, done func(body []byte)) {
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
func (c *Cache) teeOrdered(resp *http.Response, view store.ViewKey, record func(body []byte)) {
	gz := resp.Header.Get("Content-Encoding") == "gzip"
	resp.Body = &wholeTee{ReadCloser: resp.Body, c: c, limit: c.MaxBody, done: func(body []byte, ok bool, reason string) {
		if !ok {
			c.drop(&view, reason)
			return
		}
		c.hold(view)
		job := func() {
			defer func() { c.writes <- write{release: &view} }() // after the replace, in order
			if gz {
				var err error
				if body, err = gunzip(body); err != nil {
					c.drop(&view, "undecodable")
					return
				}
			}
			record(body)
		}
		select {
		case c.jobs <- job:
		default:
			c.unhold(view)
			c.drop(&view, "queue-full")
		}
	}}
}

func (c *Cache) hold(view store.ViewKey) {
	c.mu.Lock()
	c.pending[view]++
	c.mu.Unlock()
}

func (c *Cache) unhold(view store.ViewKey) (left int) {
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

func (c *Cache) held(view store.ViewKey) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending[view] > 0
}

type wholeTee struct {
	io.ReadCloser
	c        *Cache
	limit    int
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

func (c *Cache) recordObject(view store.ViewKey, contentType string, body []byte) {
	o, kind, apiVersion, err := DecodeObject(contentType, body, view.Resource)
	if err != nil {
		c.undecodable(&view, err)
		return
	}
	if c.unchanged(view, o.ResourceVersion) {
		return
	}
	v := store.View{Key: view, ResourceVersion: o.ResourceVersion, Kind: kind + "List", APIVersion: apiVersion, Updated: c.Now()}
	c.send(write{replace: &replaceView{view: v, objs: []store.Object{o}}}, &view, "queue-full")
}

// pagedList collects the pages of one paginated list until the last.
type pagedList struct {
	next  string // the continue token the next page must be asked with
	items []store.Object
}

// maxPagedObjects bounds what one paginated list may hold in memory.
const maxPagedObjects = 1_000_000

func (c *Cache) recordList(r *http.Request, view store.ViewKey, contentType string, body []byte) {
	if r.URL.Query().Get("continue") == "" && mediaType(contentType) == mediaJSON {
		// Skip decoding a whole list the view already holds.
		if rv, cont, ok := peekListMeta(body); ok && cont == "" && c.unchanged(view, rv) {
			return
		}
	}
	l, err := DecodeList(contentType, body, view.Resource)
	if err != nil {
		c.undecodable(&view, err)
		return
	}
	items := l.Items
	asked := r.URL.Query().Get("continue")
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
	c.send(write{replace: &replaceView{view: v, objs: items}}, &view, "queue-full")
}

// unchanged reports whether view already holds this answer: the same
// resourceVersion, and not stale. Repeated reads of an unchanged object or
// list then cost no write at all.
func (c *Cache) unchanged(view store.ViewKey, rv string) bool {
	if rv == "" {
		return false
	}
	v, ok, err := c.Store.View(view)
	return err == nil && ok && !v.Stale && v.ResourceVersion == rv
}

func (c *Cache) undecodable(view *store.ViewKey, err error) {
	c.Log.Warn("recorded answer not understood; dropped", "resource", view.Resource, "err", err)
	c.drop(view, "undecodable")
}

// teeWatch copies a watch stream into a non-blocking pipe read by a decoder
// goroutine. For a WatchList (sendInitialEvents=true) the initial events
// replace the view when the initial-events-end bookmark arrives.
func (c *Cache) teeWatch(resp *http.Response, view store.ViewKey, contentType string, watchList bool) {
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

func (c *Cache) recordWatch(pipe *pipe, gz bool, view store.ViewKey, contentType string, watchList bool) {
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
	dec, err := NewWatchDecoder(contentType, body, view.Resource)
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
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	_, err = io.Copy(&out, zr)
	return out.Bytes(), err
}

// peekListMeta reads a JSON list's metadata without decoding its items:
// the apiserver writes kind, apiVersion and metadata before items.
func peekListMeta(body []byte) (rv, cont string, ok bool) {
	dec := json.NewDecoder(bytes.NewReader(body))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return "", "", false
	}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return "", "", false
		}
		key, _ := t.(string)
		if key == "items" {
			return "", "", false // metadata not first: decode it all
		}
		if key != "metadata" {
			var skip json.RawMessage
			if dec.Decode(&skip) != nil {
				return "", "", false
			}
			continue
		}
		var md struct {
			ResourceVersion string `json:"resourceVersion"`
			Continue        string `json:"continue"`
		}
		if dec.Decode(&md) != nil {
			return "", "", false
		}
		return md.ResourceVersion, md.Continue, md.ResourceVersion != ""
	}
	return "", "", false
}
