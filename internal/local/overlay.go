package local

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/store"
)

// overlay is a locally written version of an object.
type overlay struct {
	seq              uint64
	resource         string // "group/version/resource"
	namespace, name  string
	kind, apiVersion string
	data             []byte // JSON without kind/apiVersion, as stored objects
}

type overlays struct {
	mu      sync.Mutex // guards the fields below
	seq     uint64
	gen     uint64              // incremented by drop: overlays of an earlier generation are refused
	byKey   map[string]*overlay // resource \x00 member key
	changed chan struct{}       // closed and replaced at every change
}

func overlayKey(resource, ns, name string) string {
	return resource + "\x00" + store.MemberKey(ns, name)
}

func (o *overlays) init() {
	if o.byKey == nil {
		o.byKey = map[string]*overlay{}
		o.changed = make(chan struct{})
	}
}

func (o *overlays) get(resource, ns, name string) *overlay {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.init()
	return o.byKey[overlayKey(resource, ns, name)]
}

// generation is the current generation of overlays.
func (o *overlays) generation() uint64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.gen
}

// put stores ov if no drop happened since generation gen was read, and
// reports whether it did.
func (o *overlays) put(ov *overlay, gen uint64) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if gen != o.gen {
		return false
	}
	o.init()
	o.seq++
	ov.seq = o.seq
	o.byKey[overlayKey(ov.resource, ov.namespace, ov.name)] = ov
	close(o.changed)
	o.changed = make(chan struct{})
	return true
}

// since returns the overlays of resource written after seq, and the
// channel closed at the next change.
func (o *overlays) since(resource string, seq uint64) ([]*overlay, uint64, <-chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.init()
	var out []*overlay
	for _, ov := range o.byKey {
		if ov.resource == resource && ov.seq > seq {
			out = append(out, ov)
		}
	}
	return out, o.seq, o.changed
}

// has reports whether any overlay of resource exists.
func (o *overlays) has(resource string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, ov := range o.byKey {
		if ov.resource == strings.TrimSuffix(resource, "#meta") {
			return true
		}
	}
	return false
}

func (o *overlays) drop() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.init()
	o.gen++
	n := len(o.byKey)
	clear(o.byKey)
	return n
}

// loadOverlays reads overlays written before a restart.
func (l *Writer) loadOverlays() {
	_ = l.Store.Docs(overlayPrefix, func(key, _ string, body []byte) error {
		var rec overlayRecord
		if json.Unmarshal(body, &rec) == nil {
			l.overlays.put(&overlay{resource: rec.Resource, namespace: rec.Namespace, name: rec.Name, kind: rec.Kind, apiVersion: rec.APIVersion, data: rec.Data}, l.overlays.generation())
		}
		return nil
	})
}

type overlayRecord struct {
	Resource, Namespace, Name string
	Kind, APIVersion          string
	Data                      json.RawMessage
}

// Apply returns o, an object of resource, as written locally, if it was.
func (l *Writer) Apply(resource string, o store.Object) store.Object {
	if ov := l.overlays.get(strings.TrimSuffix(resource, "#meta"), o.Namespace, o.Name); ov != nil {
		if no, err := codec.ObjectFromJSON(ov.data, resource); err == nil {
			return no
		}
	}
	return o
}

// Has reports whether any object of resource was written locally.
func (l *Writer) Has(resource string) bool { return l.overlays.has(resource) }

// Get returns the object of resource in namespace ns named name as written
// locally, and its kind and apiVersion, if it was.
func (l *Writer) Get(resource, ns, name string) (o store.Object, kind, apiVersion string, ok bool) {
	ov := l.overlays.get(resource, ns, name)
	if ov == nil {
		return store.Object{}, "", "", false
	}
	o, err := codec.ObjectFromJSON(ov.data, resource)
	return o, ov.kind, ov.apiVersion, err == nil
}

// Since returns the objects of resource written locally after the write
// numbered seq (^uint64(0): none, only the number of the last one), the
// number of the last write, and a channel closed at the next write.
func (l *Writer) Since(resource string, seq uint64) ([]store.Object, uint64, <-chan struct{}) {
	fresh, last, changed := l.overlays.since(resource, seq)
	objs := make([]store.Object, 0, len(fresh))
	for _, ov := range fresh {
		if o, err := codec.ObjectFromJSON(ov.data, resource); err == nil {
			objs = append(objs, o)
		}
	}
	return objs, last, changed
}

// DropOverlays forgets every local write: the cloud's truth is back.
func (l *Writer) DropOverlays() {
	// With putOverlay: a write that began offline does not outlive the
	// drop, in memory or in the store.
	l.overlayMu.Lock()
	defer l.overlayMu.Unlock()
	if n := l.overlays.drop(); n > 0 {
		l.Log.Info("cloud reachable again; local status overlays dropped", "count", n)
	}
	var keys []string
	_ = l.Store.Docs(overlayPrefix, func(key, _ string, _ []byte) error { keys = append(keys, key); return nil })
	for _, k := range keys {
		_ = l.Store.DeleteDoc(k)
	}
}

// ReplayStatus sends the last local status of this node and its pods to
// the apiserver when the cloud returns, as merge patches of status through
// upstream (as the node). kubelet believes these statuses were saved
// (outpost answered 200), so it would not send them again by itself.
func (l *Writer) ReplayStatus(ctx context.Context, upstream http.RoundTripper) (int, error) {
	l.overlays.mu.Lock()
	var pending []*overlay
	for _, ov := range l.overlays.byKey {
		if ov.resource == "/v1/pods" || ov.resource == "/v1/nodes" {
			pending = append(pending, ov)
		}
	}
	l.overlays.mu.Unlock()
	sent := 0
	for _, ov := range pending {
		var obj struct {
			Status json.RawMessage `json:"status"`
		}
		if json.Unmarshal(ov.data, &obj) != nil || len(obj.Status) == 0 {
			continue
		}
		patch, _ := json.Marshal(map[string]json.RawMessage{"status": obj.Status})
		path := "/api/v1/nodes/" + ov.name + "/status"
		if ov.resource == "/v1/pods" {
			path = "/api/v1/namespaces/" + ov.namespace + "/pods/" + ov.name + "/status"
		}
		code, err := send(ctx, upstream, http.MethodPatch, path, "application/merge-patch+json", patch)
		if err != nil {
			return sent, err
		}
		if code < 300 {
			sent++
		}
	}
	return sent, nil
}

// send makes one request of outpost's own through upstream and returns
// the apiserver's status code.
func send(ctx context.Context, upstream http.RoundTripper, method, path, contentType string, body []byte) (int, error) {
	r, err := http.NewRequestWithContext(ctx, method, "https://upstream"+path, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	r.Header.Set("Content-Type", contentType)
	resp, err := upstream.RoundTrip(r)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}
