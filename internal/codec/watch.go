package codec

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/store"
)

// Event is one decoded watch event.
type Event struct {
	Type   watch.EventType
	Object store.Object
	// Kind and APIVersion are the object's.
	Kind, APIVersion string
	// InitialEventsEnd marks the bookmark that ends the initial events of a
	// WatchList (annotation k8s.io/initial-events-end: "true").
	InitialEventsEnd bool
	// Code is an ERROR event's Status code (410: the resourceVersion
	// expired), 0 when it says none.
	Code int32
}

// eventMeta is what every watch event object says of itself.
type eventMeta struct {
	Kind, APIVersion string
	ResourceVersion  string
	InitialEventsEnd bool
	Code             int32 // of an ERROR event's Status
}

// WatchDecoder reads a watch stream of one content type.
type WatchDecoder struct {
	resource string
	json     *json.Decoder
	protobuf io.Reader // length-delimited metav1.WatchEvent messages
	frame    []byte    // the protobuf frame being decoded
}

// NewWatchDecoder decodes the watch stream r, sent as contentType.
func NewWatchDecoder(contentType string, r io.ReadCloser, resource string) (*WatchDecoder, error) {
	d := &WatchDecoder{resource: resource}
	switch MediaType(contentType) {
	case MediaJSON:
		d.json = json.NewDecoder(r)
	case MediaProtobuf:
		d.protobuf = r
	default:
		return nil, fmt.Errorf("%w: watch content type %q", ErrUndecodable, contentType)
	}
	return d, nil
}

// Next returns the next event, io.EOF at the end of the stream.
func (d *WatchDecoder) Next() (ev Event, err error) {
	if d.json != nil {
		var frame struct {
			Type   watch.EventType `json:"type"`
			Object json.RawMessage `json:"object"`
		}
		if err := d.json.Decode(&frame); err != nil {
			if err == io.EOF {
				return ev, io.EOF
			}
			return ev, fmt.Errorf("%w: json watch frame: %v", ErrUndecodable, err)
		}
		return d.event(frame.Type, func() (store.Object, error) { return ObjectFromJSON(frame.Object, d.resource) }, metaOfJSON(frame.Object))
	}
	return d.nextProtobuf()
}

// maxWatchFrame bounds one protobuf watch event: kube-apiserver refuses
// objects over about 1.5 MiB (etcd's request limit), so a larger frame is
// a broken stream, not an object.
const maxWatchFrame = 64 << 20

// nextProtobuf reads one event of a protobuf watch stream: frames of a
// 4-byte big-endian length and a metav1.WatchEvent message, whose object
// is a protobuf envelope (see generic.go). Kinds outpost has a type for
// are decoded with it; others are filed from their ObjectMeta. Either way
// the object keeps the message the apiserver sent.
func (d *WatchDecoder) nextProtobuf() (Event, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(d.protobuf, hdr[:]); err != nil {
		return Event{}, watchReadError(err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > maxWatchFrame {
		return Event{}, fmt.Errorf("%w: protobuf watch frame of %d bytes", ErrUndecodable, n)
	}
	if cap(d.frame) < int(n) {
		d.frame = make([]byte, n)
	}
	d.frame = d.frame[:n]
	if _, err := io.ReadFull(d.protobuf, d.frame); err != nil {
		return Event{}, watchReadError(err)
	}
	var we metav1.WatchEvent
	if err := unmarshalSafely(&we, d.frame); err != nil {
		return Event{}, fmt.Errorf("%w: protobuf watch frame: %v", ErrUndecodable, err)
	}
	typ := watch.EventType(we.Type)
	apiVersion, kind, msg, ok := protobufEnvelopeParts(we.Object.Raw)
	if !ok {
		return Event{}, fmt.Errorf("%w: protobuf watch event object", ErrUndecodable)
	}
	m := eventMeta{Kind: kind, APIVersion: apiVersion}
	if typ == watch.Bookmark {
		om, err := protobufObjectMeta(msg)
		if err != nil {
			return Event{}, err
		}
		m.ResourceVersion, m.InitialEventsEnd = om.ResourceVersion, om.Annotations[initialEventsEnd] == "true"
	}
	if typ == watch.Error {
		var st metav1.Status
		if unmarshalSafely(&st, msg) == nil {
			m.Code = st.Code
		}
	}
	return d.event(typ, func() (store.Object, error) {
		msg := bytes.Clone(msg) // the object keeps it; the frame is reused
		if !KnownKind(schema.FromAPIVersionAndKind(apiVersion, kind)) {
			return objectFromProtobuf(msg)
		}
		obj, err := decodeTyped(MediaProtobuf, we.Object.Raw)
		if err != nil {
			return store.Object{}, err
		}
		o, err := ObjectFromTyped(obj, d.resource)
		o.Proto = msg
		return o, err
	}, m)
}

// watchReadError is what a failed read of a watch stream means: its end
// (also when it ends mid-frame, as a closed connection does), else an
// undecodable stream that still wraps the reader's own error.
func watchReadError(err error) error {
	if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
		return io.EOF
	}
	return fmt.Errorf("%w: watch stream: %w", ErrUndecodable, err)
}

func (d *WatchDecoder) event(typ watch.EventType, decode func() (store.Object, error), m eventMeta) (Event, error) {
	ev := Event{Type: typ, Kind: m.Kind, APIVersion: m.APIVersion, Code: m.Code}
	switch typ {
	case watch.Added, watch.Modified, watch.Deleted:
		o, err := decode()
		ev.Object = o
		return ev, err
	case watch.Bookmark:
		// Bookmarks carry an object with no name: only its resourceVersion
		// and the initial-events-end marker matter.
		ev.Object = store.Object{ResourceVersion: m.ResourceVersion}
		ev.InitialEventsEnd = m.InitialEventsEnd
		return ev, nil
	case watch.Error:
		return ev, nil
	default:
		return Event{}, fmt.Errorf("%w: watch event type %q", ErrUndecodable, typ)
	}
}

// initialEventsEnd is the annotation of the bookmark that ends a
// WatchList's initial events.
const initialEventsEnd = "k8s.io/initial-events-end"

func metaOfJSON(raw []byte) eventMeta {
	var doc struct {
		Kind       string `json:"kind"`
		APIVersion string `json:"apiVersion"`
		Metadata   struct {
			ResourceVersion string            `json:"resourceVersion"`
			Annotations     map[string]string `json:"annotations"`
		} `json:"metadata"`
		Code int32 `json:"code"`
	}
	_ = json.Unmarshal(raw, &doc)
	return eventMeta{Kind: doc.Kind, APIVersion: doc.APIVersion, ResourceVersion: doc.Metadata.ResourceVersion,
		InitialEventsEnd: doc.Metadata.Annotations[initialEventsEnd] == "true", Code: doc.Code}
}
