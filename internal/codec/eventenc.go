package codec

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/internal/status"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer/streaming"
	"k8s.io/apimachinery/pkg/watch"
)

// EventEncoder writes watch events in the client's media type.
type EventEncoder struct {
	ContentType      string
	stream           streaming.Encoder
	embedded         runtime.Encoder
	Protobuf         bool
	kind, apiVersion string
}

// NewEventEncoder picks the encoding of an offline watch's events: the
// one the client asked for, unless that is protobuf for a kind outpost
// can neither decode nor send as recorded (custom resources, which the
// apiserver itself serves only as JSON or CBOR).
func NewEventEncoder(w io.Writer, a Accept, kind, apiVersion string, recordedAsProtobuf bool) (*EventEncoder, error) {
	media := MediaJSON
	if a.Media == MediaProtobuf && kind != "" {
		gvk := schema.FromAPIVersionAndKind(apiVersion, kind)
		if KnownKind(gvk) || recordedAsProtobuf {
			media = MediaProtobuf
		}
	}
	if a.Media == MediaProtobuf && media != MediaProtobuf && !a.PlainJSON {
		return nil, status.BadRequest("outpost cache cannot stream this resource as protobuf")
	}
	info, ok := runtime.SerializerInfoForMediaType(codecs.SupportedMediaTypes(), media)
	if !ok || info.StreamSerializer == nil {
		return nil, apierrors.NewInternalError(fmt.Errorf("no stream serializer for %s", media))
	}
	return &EventEncoder{ContentType: media + ";stream=watch", stream: streaming.NewEncoder(info.StreamSerializer.Framer.NewFrameWriter(w), info.StreamSerializer.Serializer),
		embedded: info.Serializer, Protobuf: media == MediaProtobuf, kind: kind, apiVersion: apiVersion}, nil
}

// Object writes one event for a stored Object: its JSON data, or for a
// protobuf client its protobuf message proto when stored (see
// store.Object.Proto).
func (e *EventEncoder) Object(typ watch.EventType, data, proto []byte) error {
	if e.Protobuf && proto != nil {
		raw := ProtobufEnvelope(e.kind, e.apiVersion, len(proto), func(b []byte) []byte { return append(b, proto...) })
		return e.stream.Encode(&metav1.WatchEvent{Type: string(typ), Object: runtime.RawExtension{Raw: raw}})
	}
	raw := WithTypeMeta(data, e.kind, e.apiVersion)
	if e.Protobuf {
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

// Bookmark writes a BOOKMARK at rv; end marks the end of initial events.
func (e *EventEncoder) Bookmark(rv string, end bool) error {
	md := map[string]any{"resourceVersion": rv}
	if end {
		md["annotations"] = map[string]string{initialEventsEnd: "true"}
	}
	data, _ := json.Marshal(map[string]any{"metadata": md})
	if e.Protobuf && !KnownKind(schema.FromAPIVersionAndKind(e.apiVersion, e.kind)) {
		om := &metav1.ObjectMeta{ResourceVersion: rv}
		if end {
			om.Annotations = map[string]string{initialEventsEnd: "true"}
		}
		msg := protobufMetaMessage(om)
		raw := ProtobufEnvelope(e.kind, e.apiVersion, len(msg), func(b []byte) []byte { return append(b, msg...) })
		return e.stream.Encode(&metav1.WatchEvent{Type: string(watch.Bookmark), Object: runtime.RawExtension{Raw: raw}})
	}
	if e.Protobuf {
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
	return e.stream.Encode(&metav1.WatchEvent{Type: string(watch.Bookmark), Object: runtime.RawExtension{Raw: WithTypeMeta(data, e.kind, e.apiVersion)}})
}

// Status writes an ERROR event carrying st.
func (e *EventEncoder) Status(st *metav1.Status) error {
	st.Kind, st.APIVersion = "Status", "v1"
	var b bytes.Buffer
	if err := e.embedded.Encode(st, &b); err != nil {
		raw, _ := json.Marshal(st)
		b.Reset()
		b.Write(raw)
	}
	return e.stream.Encode(&metav1.WatchEvent{Type: string(watch.Error), Object: runtime.RawExtension{Raw: b.Bytes()}})
}
