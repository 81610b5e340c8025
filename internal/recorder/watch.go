package recorder

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"net/http"
	"sync"

	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/store"
)

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
		if err == nil {
			c.keepJSON(view.Resource, &ev.Object)
		}
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
			e := store.Event{Type: store.EventType(ev.Type), View: view, Object: ev.Object}
			if ev.Kind != "" {
				// A view only this watch fills gets the list kind.
				e.Kind, e.APIVersion = ev.Kind+"List", ev.APIVersion
			}
			c.send(write{events: []store.Event{e}}, &view, "queue-full")
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
