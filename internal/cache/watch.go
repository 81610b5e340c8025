package cache

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer/streaming"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// serveWatch answers a watch while the cloud is unreachable, from the view
// the caller's list or watch recorded:
//   - sendInitialEvents=true (WatchList): the view's objects as ADDED, then
//     the bookmark annotated k8s.io/initial-events-end, so informers sync;
//   - resourceVersion "" or "0": the view's objects as ADDED first;
//   - a resourceVersion older than the view: 410 Gone, so the client
//     re-lists (from the cache) instead of missing changes;
//   - then BOOKMARKs (when allowed) until timeoutSeconds, the client leaves,
//     or the cloud returns, when the watch ends so the client re-watches
//     upstream.
func (c *Cache) serveWatch(w http.ResponseWriter, r *http.Request, info *request.Info, want store.ViewKey, a accept) error {
	src, ok, err := c.findSource(want)
	if err != nil {
		return asStatus(err)
	}
	if !ok {
		return neverAnswered(describe(info))
	}
	q := r.URL.Query()
	rv := q.Get("resourceVersion")
	sendInitial := q.Get("sendInitialEvents") == "true"
	bookmarks := q.Get("allowWatchBookmarks") == "true"
	timeout := 30*time.Minute + time.Duration(rand.Int64N(int64(30*time.Minute))) // as the apiserver's default
	if s := q.Get("timeoutSeconds"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 0 {
			return BadRequestf("invalid timeoutSeconds %q", s)
		}
		if n > 0 {
			timeout = time.Duration(n) * time.Second
		}
	}
	initial := sendInitial || rv == "" || rv == "0"
	tooOld := false
	if !initial {
		want, err1 := strconv.ParseUint(rv, 10, 64)
		have, err2 := strconv.ParseUint(src.view.ResourceVersion, 10, 64)
		if err1 != nil {
			return BadRequestf("invalid resourceVersion %q", rv)
		}
		tooOld = err2 == nil && want < have
	}

	kind, apiVersion := strings.TrimSuffix(src.view.Kind, "List"), src.view.APIVersion
	if kind == "" {
		kind, apiVersion = guessListKind(info)
		kind = strings.TrimSuffix(kind, "List")
	}
	if strings.HasPrefix(a.as, "PartialObjectMetadata") {
		kind, apiVersion = "PartialObjectMetadata", "meta.k8s.io/v1"
	}
	enc, err := newEventEncoder(w, a, kind, apiVersion, c.recordedAsProtobuf(src.view.Key))
	if err != nil {
		return err
	}
	w.Header().Set(ServedByHeader, "cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()

	if tooOld {
		st := apierrors.NewResourceExpired(fmt.Sprintf("too old resource version: %s (%s); the cloud is unreachable and the cache holds only %s", rv, src.view.ResourceVersion, src.view.ResourceVersion)).Status()
		_ = enc.status(&st)
		_ = rc.Flush()
		return nil
	}
	if initial {
		stop := errors.New("stop")
		err := c.Store.List(src.view.Key, "", 0, func(o store.Object) error {
			o = c.applyOverlay(src.view.Key.Resource, o)
			if !src.keep(o) {
				return nil
			}
			data, proto := o.Data, o.Proto
			if kind == "PartialObjectMetadata" {
				data, proto = metadataOnly(data), nil
			} else if isProtobufOnly(data) && !enc.protobuf {
				st := protobufOnlyError(describe(info)).(apierrors.APIStatus).Status()
				_ = enc.status(&st)
				return stop
			}
			if err := enc.object(watch.Added, data, proto); err != nil {
				return stop // the client went away
			}
			return nil
		})
		if err != nil {
			return nil
		}
	}
	if sendInitial {
		if err := enc.bookmark(src.view.ResourceVersion, true); err != nil {
			return nil
		}
	}
	_ = rc.Flush()

	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	interval := c.BookmarkInterval
	if interval <= 0 {
		interval = 5 * time.Second
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	// Local writes made from now on reach this watcher as MODIFIED events.
	_, seen, local := c.overlays.since(src.view.Key.Resource, ^uint64(0))
	for {
		var changed <-chan struct{}
		if c.Changed != nil {
			changed = c.Changed()
		}
		if c.Online != nil && c.Online() {
			return nil // the cloud is back: the client re-watches upstream
		}
		select {
		case <-r.Context().Done():
			return nil
		case <-deadline.C:
			return nil
		case <-changed:
		case <-local:
			var fresh []*overlay
			fresh, seen, local = c.overlays.since(src.view.Key.Resource, seen)
			for _, ov := range fresh {
				o, err := objectFromJSON(ov.data, src.view.Key.Resource)
				if err != nil || !src.keep(o) {
					continue
				}
				data := o.Data
				if kind == "PartialObjectMetadata" {
					data = metadataOnly(data)
				}
				if err := enc.object(watch.Modified, data, nil); err != nil {
					return nil
				}
			}
			_ = rc.Flush()
		case <-tick.C:
			if bookmarks {
				if err := enc.bookmark(src.view.ResourceVersion, false); err != nil {
					return nil
				}
				_ = rc.Flush()
			}
		}
	}
}

// BadRequestf is a 400 Status error.
func BadRequestf(format string, args ...any) error {
	return apierrors.NewBadRequest(fmt.Sprintf(format, args...))
}

// eventEncoder writes watch events in the client's media type.
type eventEncoder struct {
	w                http.ResponseWriter
	stream           streaming.Encoder
	embedded         runtime.Encoder
	protobuf         bool
	kind, apiVersion string
}

// recordedAsProtobuf reports whether the first member of view k was
// recorded from a protobuf answer: of a kind outpost has no type for,
// only then can its events be sent in protobuf.
func (c *Cache) recordedAsProtobuf(k store.ViewKey) bool {
	found := false
	_ = c.Store.List(k, "", 1, func(o store.Object) error {
		found = o.Proto != nil
		return nil
	})
	return found
}

// newEventEncoder picks the encoding of an offline watch's events: the
// one the client asked for, unless that is protobuf for a kind outpost
// can neither decode nor send as recorded (custom resources, which the
// apiserver itself serves only as JSON or CBOR).
func newEventEncoder(w http.ResponseWriter, a accept, kind, apiVersion string, recordedAsProtobuf bool) (*eventEncoder, error) {
	media := mediaJSON
	if a.media == mediaProtobuf && kind != "" {
		gvk := schema.FromAPIVersionAndKind(apiVersion, kind)
		if knownKind(gvk) || recordedAsProtobuf {
			media = mediaProtobuf
		}
	}
	if a.media == mediaProtobuf && media != mediaProtobuf && !a.plainJSON {
		return nil, apierrors.NewBadRequest("outpost cache cannot stream this resource as protobuf")
	}
	info, ok := runtime.SerializerInfoForMediaType(codecs.SupportedMediaTypes(), media)
	if !ok || info.StreamSerializer == nil {
		return nil, apierrors.NewInternalError(fmt.Errorf("no stream serializer for %s", media))
	}
	w.Header().Set("Content-Type", media+";stream=watch")
	return &eventEncoder{w: w, stream: streaming.NewEncoder(info.StreamSerializer.Framer.NewFrameWriter(w), info.StreamSerializer.Serializer),
		embedded: info.Serializer, protobuf: media == mediaProtobuf, kind: kind, apiVersion: apiVersion}, nil
}

// object writes one event for a stored object: its JSON data, or for a
// protobuf client its protobuf message proto when stored (see
// store.Object.Proto).
func (e *eventEncoder) object(typ watch.EventType, data, proto []byte) error {
	if e.protobuf && proto != nil {
		raw := protobufEnvelope(e.kind, e.apiVersion, len(proto), func(b []byte) []byte { return append(b, proto...) })
		return e.stream.Encode(&metav1.WatchEvent{Type: string(typ), Object: runtime.RawExtension{Raw: raw}})
	}
	raw := withTypeMeta(data, e.kind, e.apiVersion)
	if e.protobuf {
		obj, _, err := codecs.UniversalDeserializer().Decode(raw, nil, nil)
		if err != nil {
			return err
		}
		var b bytes.Buffer
		if err := e.embedded.Encode(obj, &b); err != nil {
			return err
		}
		raw = b.Bytes()
	}
	return e.stream.Encode(&metav1.WatchEvent{Type: string(typ), Object: runtime.RawExtension{Raw: raw}})
}

// bookmark writes a BOOKMARK at rv; end marks the end of initial events.
func (e *eventEncoder) bookmark(rv string, end bool) error {
	md := map[string]any{"resourceVersion": rv}
	if end {
		md["annotations"] = map[string]string{initialEventsEnd: "true"}
	}
	data, _ := json.Marshal(map[string]any{"metadata": md})
	if e.protobuf && !knownKind(schema.FromAPIVersionAndKind(e.apiVersion, e.kind)) {
		om := &metav1.ObjectMeta{ResourceVersion: rv}
		if end {
			om.Annotations = map[string]string{initialEventsEnd: "true"}
		}
		msg := protobufMetaMessage(om)
		raw := protobufEnvelope(e.kind, e.apiVersion, len(msg), func(b []byte) []byte { return append(b, msg...) })
		return e.stream.Encode(&metav1.WatchEvent{Type: string(watch.Bookmark), Object: runtime.RawExtension{Raw: raw}})
	}
	if e.protobuf {
		gvk := schema.FromAPIVersionAndKind(e.apiVersion, e.kind)
		obj, err := cacheScheme.New(gvk)
		if err != nil {
			return err
		}
		obj.GetObjectKind().SetGroupVersionKind(gvk) // the envelope names the kind
		acc, err := meta.Accessor(obj)
		if err != nil {
			return err
		}
		acc.SetResourceVersion(rv)
		if end {
			acc.SetAnnotations(map[string]string{initialEventsEnd: "true"})
		}
		var b bytes.Buffer
		if err := e.embedded.Encode(obj, &b); err != nil {
			return err
		}
		return e.stream.Encode(&metav1.WatchEvent{Type: string(watch.Bookmark), Object: runtime.RawExtension{Raw: b.Bytes()}})
	}
	return e.stream.Encode(&metav1.WatchEvent{Type: string(watch.Bookmark), Object: runtime.RawExtension{Raw: withTypeMeta(data, e.kind, e.apiVersion)}})
}

// status writes an ERROR event carrying st.
func (e *eventEncoder) status(st *metav1.Status) error {
	st.Kind, st.APIVersion = "Status", "v1"
	var b bytes.Buffer
	if err := e.embedded.Encode(st, &b); err != nil {
		raw, _ := json.Marshal(st)
		b.Reset()
		b.Write(raw)
	}
	return e.stream.Encode(&metav1.WatchEvent{Type: string(watch.Error), Object: runtime.RawExtension{Raw: b.Bytes()}})
}
