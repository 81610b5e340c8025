package cache

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/strategicpatch"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/status"
	"github.com/outposthq/outpost/internal/store"
)

// Local writes. While the cloud is unreachable outpost answers a few
// writes itself, one explicit policy each, so that a restarted kubelet keeps
// working:
//   - this node's Lease renewals (kube-node-lease/<node>);
//   - this node's Node and Node status, and the status of pods bound to it:
//     applied to an overlay that local readers see, dropped when the cloud's
//     truth returns (kubelet re-reports its status online by itself);
//   - Events: appended to a bounded on-disk journal, replayed after
//     reconnect.
// Only this node's own identity may make them. Everything else gets 503.

// Store document prefixes for overlays and the event journal.
const (
	overlayPrefix = "overlay\x00"
	journalPrefix = "journal\x00"
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

func (o *overlays) put(ov *overlay) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.init()
	o.seq++
	ov.seq = o.seq
	o.byKey[overlayKey(ov.resource, ov.namespace, ov.name)] = ov
	close(o.changed)
	o.changed = make(chan struct{})
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
	n := len(o.byKey)
	clear(o.byKey)
	return n
}

// loadOverlays reads overlays written before a restart.
func (c *Cache) loadOverlays() {
	_ = c.Store.Docs(overlayPrefix, func(key, _ string, body []byte) error {
		var rec overlayRecord
		if json.Unmarshal(body, &rec) == nil {
			c.overlays.put(&overlay{resource: rec.Resource, namespace: rec.Namespace, name: rec.Name, kind: rec.Kind, apiVersion: rec.APIVersion, data: rec.Data})
		}
		return nil
	})
}

type overlayRecord struct {
	Resource, Namespace, Name string
	Kind, APIVersion          string
	Data                      json.RawMessage
}

// applyOverlay returns o with the local version of it, if any.
func (c *Cache) applyOverlay(resource string, o store.Object) store.Object {
	if ov := c.overlays.get(strings.TrimSuffix(resource, "#meta"), o.Namespace, o.Name); ov != nil {
		if no, err := codec.ObjectFromJSON(ov.data, resource); err == nil {
			return no
		}
	}
	return o
}

// DropOverlays forgets every local write: the cloud's truth is back.
func (c *Cache) DropOverlays() {
	if n := c.overlays.drop(); n > 0 {
		c.Log.Info("cloud reachable again; local status overlays dropped", "count", n)
	}
	var keys []string
	_ = c.Store.Docs(overlayPrefix, func(key, _ string, _ []byte) error { keys = append(keys, key); return nil })
	for _, k := range keys {
		_ = c.Store.DeleteDoc(k)
	}
}

// localKind names the kinds outpost writes locally.
var localKind = map[string][2]string{
	"coordination.k8s.io/v1/leases": {"Lease", "coordination.k8s.io/v1"},
	"/v1/nodes":                     {"Node", "v1"},
	"/v1/pods":                      {"Pod", "v1"},
}

// writePolicy says how outpost answers a write offline.
type writePolicy int

const (
	noPolicy writePolicy = iota
	overlayWrite
	journalWrite
	recordedToken
)

func (c *Cache) policy(info *request.Info) writePolicy {
	if !info.IsResourceRequest || c.Node == "" {
		return noPolicy
	}
	if !c.ownNode(info) {
		return noPolicy
	}
	if isTokenRequest(info) {
		return recordedToken
	}
	res := info.APIGroup + "/" + info.APIVersion + "/" + info.Resource
	switch {
	case res == "coordination.k8s.io/v1/leases" && info.Namespace == "kube-node-lease" && info.Name == c.Node && info.Subresource == "" &&
		(info.Verb == "update" || info.Verb == "patch"):
		return overlayWrite
	case res == "coordination.k8s.io/v1/leases" && info.Namespace == "kube-node-lease" && info.Verb == "create":
		return overlayWrite
	case res == "/v1/nodes" && info.Name == c.Node && (info.Subresource == "" || info.Subresource == "status") && (info.Verb == "update" || info.Verb == "patch"):
		return overlayWrite
	case res == "/v1/nodes" && info.Verb == "create":
		return overlayWrite // kubelet registering again after a restart: 409 when cached
	case res == "/v1/pods" && info.Subresource == "status" && (info.Verb == "update" || info.Verb == "patch"):
		return overlayWrite // the pod must be bound here: checked against the cached pod
	case (res == "/v1/events" || res == "events.k8s.io/v1/events") && info.Verb == "create":
		return journalWrite
	}
	return noPolicy
}

// AnswersWrite reports whether outpost answers this write itself offline.
func (c *Cache) AnswersWrite(r *http.Request, info *request.Info) bool {
	return r.Method != http.MethodGet && c.policy(info) != noPolicy
}

// ServeWrite answers a write locally, or says why not.
func (c *Cache) ServeWrite(w http.ResponseWriter, r *http.Request, info *request.Info) {
	c.init()
	var err error
	switch c.policy(info) {
	case overlayWrite:
		err = c.writeOverlay(w, r, info)
	case journalWrite:
		err = c.journal(w, r, info)
	case recordedToken:
		err = c.serveToken(w, r, info)
	default:
		err = status.Unavailable(fmt.Sprintf("outpost: the cloud is unreachable; %s %s cannot be done offline", info.Verb, info.Path), 5)
	}
	if err != nil {
		status.WriteError(w, err)
	}
}

const maxWriteBody = 3 << 20

// requestJSON reads a request body as JSON (converting protobuf).
func requestJSON(r *http.Request) ([]byte, string, error) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxWriteBody+1))
	if err != nil {
		return nil, "", apierrors.NewBadRequest("reading request body: " + err.Error())
	}
	if len(body) > maxWriteBody {
		return nil, "", apierrors.NewRequestEntityTooLargeError("request body over 3 MiB")
	}
	ct := codec.MediaType(r.Header.Get("Content-Type"))
	if ct == codec.MediaProtobuf {
		obj, err := codec.Decode(body, nil)
		if err != nil {
			return nil, ct, apierrors.NewBadRequest("decoding protobuf body: " + err.Error())
		}
		body, err = json.Marshal(obj)
		if err != nil {
			return nil, ct, apierrors.NewBadRequest(err.Error())
		}
		ct = codec.MediaJSON
	}
	return body, ct, nil
}

func (c *Cache) writeOverlay(w http.ResponseWriter, r *http.Request, info *request.Info) error {
	res := info.APIGroup + "/" + info.APIVersion + "/" + info.Resource
	kinds := localKind[res]
	body, ct, err := requestJSON(r)
	if err != nil {
		return err
	}
	name := info.Name
	var base []byte
	if info.Verb != "create" {
		if ov := c.overlays.get(res, info.Namespace, name); ov != nil {
			base = ov.data
		} else if o, ok, err := c.Store.Get(res, info.Namespace, name); err != nil {
			return asStatus(err)
		} else if ok {
			base = o.Data
		}
		if base == nil {
			return status.Unavailable(fmt.Sprintf("outpost: the cloud is unreachable and %s %s/%s is not cached", info.Resource, info.Namespace, name), 5)
		}
		if res == "/v1/pods" {
			var p struct {
				Spec struct {
					NodeName string `json:"nodeName"`
				} `json:"spec"`
			}
			if json.Unmarshal(base, &p) != nil || p.Spec.NodeName != c.Node {
				return status.Forbidden("outpost: offline, a node may only update the status of pods bound to it")
			}
		}
	}

	if info.Verb == "create" {
		// As the apiserver: creating what exists is a conflict. A restarted
		// kubelet (or kwok) then reads and updates the existing object
		// instead of taking it over.
		var meta struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		_ = json.Unmarshal(body, &meta)
		if meta.Metadata.Name == "" {
			return apierrors.NewBadRequest("outpost: the object to create has no name")
		}
		if res == "/v1/nodes" && meta.Metadata.Name != c.Node {
			return status.Forbidden("outpost: offline, a node may only register itself")
		}
		if c.overlays.get(res, info.Namespace, meta.Metadata.Name) != nil {
			return apierrors.NewAlreadyExists(schema.GroupResource{Group: info.APIGroup, Resource: info.Resource}, meta.Metadata.Name)
		}
		if _, ok, err := c.Store.Get(res, info.Namespace, meta.Metadata.Name); err != nil {
			return asStatus(err)
		} else if ok {
			return apierrors.NewAlreadyExists(schema.GroupResource{Group: info.APIGroup, Resource: info.Resource}, meta.Metadata.Name)
		}
		if res == "/v1/nodes" {
			return status.Unavailable("outpost: the cloud is unreachable and this node was never seen online, so it cannot register", 5)
		}
	}

	var out []byte
	switch info.Verb {
	case "create", "update":
		out = body
		if info.Subresource == "status" && base != nil {
			out, err = replaceStatus(base, body)
		}
	case "patch":
		out, err = applyPatch(base, body, r.Header.Get("Content-Type"), res)
	}
	if err != nil {
		return err
	}
	if ct != codec.MediaJSON && info.Verb != "patch" {
		return unsupportedMedia(ct)
	}
	obj, err := codec.ObjectFromJSON(out, res)
	if err != nil {
		return apierrors.NewBadRequest("outpost: the written object is not valid: " + err.Error())
	}
	if info.Verb == "create" {
		name = obj.Name
	}
	// Keep the cloud's resourceVersion: when the link returns, the client's
	// next optimistic update (kubelet's Lease renewal) must still match the
	// apiserver's copy. A locally created object gets one of our own.
	rv := obj.ResourceVersion
	if rv == "" || info.Verb == "create" {
		rv = c.localRV()
	}
	if base != nil {
		var b struct {
			Metadata struct {
				ResourceVersion string `json:"resourceVersion"`
			} `json:"metadata"`
		}
		if json.Unmarshal(base, &b) == nil && b.Metadata.ResourceVersion != "" {
			rv = b.Metadata.ResourceVersion
		}
	}
	out, err = setMeta(obj.Data, rv, info.Verb == "create")
	if err != nil {
		return apierrors.NewInternalError(err)
	}
	ov := &overlay{resource: res, namespace: info.Namespace, name: name, kind: kinds[0], apiVersion: kinds[1], data: out}
	rec, _ := json.Marshal(overlayRecord{Resource: res, Namespace: info.Namespace, Name: name, Kind: kinds[0], APIVersion: kinds[1], Data: out})
	if err := c.Store.PutDoc(overlayPrefix+overlayKey(res, info.Namespace, name), codec.MediaJSON, rec); err != nil {
		return apierrors.NewInternalError(fmt.Errorf("saving local write: %w", err))
	}
	c.overlays.put(ov)
	code := http.StatusOK
	if info.Verb == "create" {
		code = http.StatusCreated
	}
	a := info.Accept
	w.Header().Set("X-Outpost-Local-Write", "overlay")
	if code == http.StatusCreated {
		w = statusCodeWriter{ResponseWriter: w, code: code}
	}
	return c.encode(w, codec.WithTypeMeta(out, kinds[0], kinds[1]), a, source{})
}

// statusCodeWriter replaces the 200 of an encoded answer with code.
type statusCodeWriter struct {
	http.ResponseWriter
	code int
}

func (s statusCodeWriter) WriteHeader(int) { s.ResponseWriter.WriteHeader(s.code) }

// replaceStatus returns base with the status of body.
func replaceStatus(base, body []byte) ([]byte, error) {
	var b, n map[string]json.RawMessage
	if json.Unmarshal(base, &b) != nil || json.Unmarshal(body, &n) != nil {
		return nil, apierrors.NewBadRequest("outpost: body is not a JSON object")
	}
	b["status"] = n["status"]
	return json.Marshal(b)
}

// applyPatch applies a patch of the given content type with the
// apimachinery patch libraries.
func applyPatch(base, patch []byte, contentType, res string) ([]byte, error) {
	mt, _, _ := mime.ParseMediaType(contentType)
	switch mt {
	case "application/strategic-merge-patch+json":
		var schema any
		switch res {
		case "/v1/pods":
			schema = corev1.Pod{}
		case "/v1/nodes":
			schema = corev1.Node{}
		default:
			schema = coordinationv1.Lease{}
		}
		out, err := strategicpatch.StrategicMergePatch(base, patch, schema)
		if err != nil {
			return nil, apierrors.NewBadRequest("applying strategic merge patch: " + err.Error())
		}
		return out, nil
	case "application/merge-patch+json":
		out, err := jsonpatch.MergePatch(base, patch)
		if err != nil {
			return nil, apierrors.NewBadRequest("applying merge patch: " + err.Error())
		}
		return out, nil
	case "application/json-patch+json":
		p, err := jsonpatch.DecodePatch(patch)
		if err != nil {
			return nil, apierrors.NewBadRequest("decoding JSON patch: " + err.Error())
		}
		out, err := p.Apply(base)
		if err != nil {
			return nil, apierrors.NewBadRequest("applying JSON patch: " + err.Error())
		}
		return out, nil
	default:
		return nil, unsupportedMedia(mt)
	}
}

// localRV returns a resourceVersion for a local write: above every one
// the cache holds, and increasing.
func (c *Cache) localRV() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := uint64(c.Now().UnixNano())
	if now <= c.lastLocalRV {
		now = c.lastLocalRV + 1
	}
	c.lastLocalRV = now
	return strconv.FormatUint(now, 10)
}

// setMeta sets metadata.resourceVersion (and for a new object its uid and
// creationTimestamp) of a JSON object.
func setMeta(data []byte, rv string, create bool) ([]byte, error) {
	var obj map[string]any
	if err := json.Unmarshal(data, &obj); err != nil {
		return nil, err
	}
	md, _ := obj["metadata"].(map[string]any)
	if md == nil {
		md = map[string]any{}
		obj["metadata"] = md
	}
	md["resourceVersion"] = rv
	if create {
		if _, ok := md["uid"]; !ok {
			md["uid"] = newUID()
		}
		if _, ok := md["creationTimestamp"]; !ok {
			md["creationTimestamp"] = time.Now().UTC().Format(time.RFC3339)
		}
	}
	delete(obj, "kind")
	delete(obj, "apiVersion")
	return json.Marshal(obj)
}

func newUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// journalEntry is one event created offline, kept until it is replayed.
type journalEntry struct {
	Path string          `json:"path"`
	Body json.RawMessage `json:"body"`
}

// journal appends an Event to the on-disk journal and answers 201 with it.
func (c *Cache) journal(w http.ResponseWriter, r *http.Request, info *request.Info) error {
	body, ct, err := requestJSON(r)
	if err != nil {
		return err
	}
	if ct != codec.MediaJSON {
		return unsupportedMedia(ct)
	}
	out, err := setMeta(body, "0", true)
	if err != nil {
		return apierrors.NewBadRequest("outpost: the event is not a JSON object: " + err.Error())
	}
	c.mu.Lock()
	c.journalSeq++
	seq := c.journalSeq
	c.mu.Unlock()
	entry, _ := json.Marshal(journalEntry{Path: info.Path, Body: body})
	if err := c.Store.PutDoc(fmt.Sprintf("%s%020d", journalPrefix, seq), codec.MediaJSON, entry); err != nil {
		return apierrors.NewInternalError(fmt.Errorf("journaling event: %w", err))
	}
	c.trimJournal()
	if c.Metrics != nil {
		c.Metrics.JournalEvents.Inc()
	}
	kind, apiVersion := "Event", "v1"
	if info.APIGroup == "events.k8s.io" {
		apiVersion = "events.k8s.io/v1"
	}
	w.Header().Set("X-Outpost-Local-Write", "journal")
	return c.encode(statusCodeWriter{ResponseWriter: w, code: http.StatusCreated}, codec.WithTypeMeta(out, kind, apiVersion), info.Accept, source{})
}

// trimJournal keeps at most MaxJournal entries, dropping the oldest.
func (c *Cache) trimJournal() {
	var keys []string
	_ = c.Store.Docs(journalPrefix, func(key, _ string, _ []byte) error { keys = append(keys, key); return nil })
	over := len(keys) - c.MaxJournal
	for i := 0; i < over; i++ {
		if c.Store.DeleteDoc(keys[i]) == nil && c.Metrics != nil {
			c.Metrics.JournalDropped.Inc()
		}
	}
	if over > 0 {
		c.Log.Warn("event journal full; oldest events dropped", "dropped", over, "kept", c.MaxJournal)
	}
}

// ReplayJournal posts the journaled events to the apiserver through
// upstream (as the node), at
// most rate per second, deleting each one the apiserver answered. It stops
// at the first failure to reach the apiserver; the rest wait for the next
// reconnect.
func (c *Cache) ReplayJournal(ctx context.Context, rate int, upstream http.RoundTripper) (replayed int, err error) {
	type item struct {
		key   string
		entry journalEntry
	}
	var items []item
	_ = c.Store.Docs(journalPrefix, func(key, _ string, body []byte) error {
		var e journalEntry
		if json.Unmarshal(body, &e) == nil {
			items = append(items, item{key, e})
		} else {
			_ = c.Store.DeleteDoc(key)
		}
		return nil
	})
	if rate <= 0 {
		rate = 10
	}
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for _, it := range items {
		code, err := send(ctx, upstream, http.MethodPost, it.entry.Path, "application/json", it.entry.Body)
		if err != nil {
			return replayed, err
		}
		// 2xx: delivered. 4xx: the apiserver will never take it (an
		// expired namespace, a duplicate): dropping it is final either way.
		if code >= 500 {
			return replayed, fmt.Errorf("replaying event: apiserver answered %d", code)
		}
		_ = c.Store.DeleteDoc(it.key)
		if code < 300 {
			replayed++
		}
		select {
		case <-ctx.Done():
			return replayed, ctx.Err()
		case <-tick.C:
		}
	}
	return replayed, nil
}

func unsupportedMedia(mt string) error {
	return status.UnsupportedMediaType("outpost cannot apply " + mt + " offline")
}

// ReplayStatus sends the last local status of this node and its pods to
// the apiserver when the cloud returns, as merge patches of status through
// upstream (as the node). kubelet believes these statuses were saved
// (outpost answered 200), so it would not send them again by itself.
func (c *Cache) ReplayStatus(ctx context.Context, upstream http.RoundTripper) (int, error) {
	c.overlays.mu.Lock()
	var pending []*overlay
	for _, ov := range c.overlays.byKey {
		if ov.resource == "/v1/pods" || ov.resource == "/v1/nodes" {
			pending = append(pending, ov)
		}
	}
	c.overlays.mu.Unlock()
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
