package codec

import (
	"bytes"
	"encoding/json"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/outposthq/outpost/internal/status"
	"github.com/outposthq/outpost/internal/store"
)

// Kinds outpost has no Go type for. kube-apiserver answers protobuf for
// every kind with generated protobuf code, and not only the built-in ones:
// CustomResourceDefinitions and APIServices are served by its extension and
// aggregation layers, and any aggregated API server built on
// k8s.io/apiserver (metrics-server, for one) serves its own kinds in
// protobuf too. What every such kind shares is the envelope
// (runtime.Unknown: TypeMeta, raw message) and ObjectMeta in field 1 of the
// message, as every list has ListMeta in field 1 and its items in field 2.
// That is enough to file an object (name, namespace, resourceVersion,
// labels) and to answer protobuf clients with the cloud's own bytes; what it
// is not enough for is JSON, since outpost cannot know the rest of the
// message's fields.
//
// Such an object is stored with its protobuf message (store.Object.Proto)
// and, as its JSON, only its metadata behind a marker member no Kubernetes
// object has (protobufOnlyPrefix). Offline, a protobuf client gets the
// recorded messages; a metadata-only or Table client gets what the
// metadata holds; a JSON or CBOR client gets 406 Not Acceptable saying so,
// rather than an object with its spec silently missing. A JSON answer
// recorded for the same object replaces the marker with the whole object.

// protobufOnlyPrefix starts the stored JSON of an object recorded only as
// protobuf. "/" cannot appear in a field name of a Kubernetes type, so no
// apiserver answer starts this way.
var protobufOnlyPrefix = []byte(`{"outpost.io/protobuf-only":true,"metadata":`)

// IsProtobufOnly reports whether stored JSON data is the marker of an
// object recorded only as protobuf.
func IsProtobufOnly(data []byte) bool { return bytes.HasPrefix(data, protobufOnlyPrefix) }

// KnownKind reports whether outpost has a Go type for gvk.
func KnownKind(gvk schema.GroupVersionKind) bool { return cacheScheme.Recognizes(gvk) }

// protobufEnvelopeParts returns the apiVersion and kind named by the
// protobuf envelope body, and the message inside it (aliasing body). ok is
// false when body is not an envelope, or its message is further encoded.
func protobufEnvelopeParts(body []byte) (apiVersion, kind string, msg []byte, ok bool) {
	env, found := bytes.CutPrefix(body, protobufMagic)
	if !found {
		return "", "", nil, false
	}
	var typeMeta []byte
	encoded := false
	if !protoFields(env, func(num uint64, v []byte) bool {
		switch num {
		case 1:
			typeMeta = v
		case 2:
			msg = v
		case 3:
			encoded = len(v) > 0
		}
		return true
	}) || msg == nil || encoded {
		return "", "", nil, false
	}
	av, _, short1, ok1 := protoField(typeMeta, 1)
	k, _, short2, ok2 := protoField(typeMeta, 2)
	if !ok1 || !ok2 || short1 || short2 {
		return "", "", nil, false
	}
	return string(av), string(k), msg, true
}

// protobufObjectMeta decodes the ObjectMeta (field 1) of the protobuf
// message msg of any Kubernetes kind.
func protobufObjectMeta(msg []byte) (metav1.ObjectMeta, error) {
	var om metav1.ObjectMeta
	md, found, short, ok := protoField(msg, 1)
	if !ok || !found || short {
		return om, fmt.Errorf("%w: protobuf object without metadata", ErrUndecodable)
	}
	if err := unmarshalSafely(&om, md); err != nil {
		return om, fmt.Errorf("%w: protobuf object metadata: %v", ErrUndecodable, err)
	}
	return om, nil
}

// objectFromProtobuf files the protobuf message msg of a kind outpost has
// no type for: metadata from its ObjectMeta, msg kept as its protobuf
// encoding (msg must not be changed afterwards), and the marker JSON.
// Only metadata.name and metadata.namespace can be selected on, which is
// what kube-apiserver supports for every kind without field labels of its
// own.
func objectFromProtobuf(msg []byte) (store.Object, error) {
	om, err := protobufObjectMeta(msg)
	if err != nil {
		return store.Object{}, err
	}
	if om.Name == "" {
		return store.Object{}, fmt.Errorf("%w: object without metadata.name", ErrUndecodable)
	}
	md, err := json.Marshal(&om)
	if err != nil {
		return store.Object{}, fmt.Errorf("%w: re-encoding metadata: %v", ErrUndecodable, err)
	}
	data := make([]byte, 0, len(protobufOnlyPrefix)+len(md)+1)
	data = append(append(append(data, protobufOnlyPrefix...), md...), '}')
	return store.Object{
		Namespace:       om.Namespace,
		Name:            om.Name,
		ResourceVersion: om.ResourceVersion,
		Labels:          om.Labels,
		Fields:          map[string]string{"metadata.name": om.Name, "metadata.namespace": om.Namespace},
		Data:            data,
		Proto:           msg,
	}, nil
}

// protobufMetaMessage is the protobuf message of an object of any kind
// that has only metadata: a bookmark's resourceVersion and annotations.
func protobufMetaMessage(om *metav1.ObjectMeta) []byte {
	md := make([]byte, om.Size())
	if _, err := om.MarshalToSizedBuffer(md); err != nil {
		return nil // cannot happen: the buffer has the size Size said
	}
	b := make([]byte, 0, fieldSize(len(md)))
	b = appendFieldHeader(b, 1, len(md))
	return append(b, md...)
}

// unmarshalSafely runs a generated protobuf decoder, which is fed bytes
// from the network, turning a panic into an error.
func unmarshalSafely(m protobufUnmarshaler, b []byte) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("decoder panic: %v", r)
		}
	}()
	return m.Unmarshal(b)
}

// ProtobufOnlyError is the answer to a client that wants JSON (or CBOR)
// of objects recorded only as protobuf.
func ProtobufOnlyError(resource string) error {
	return status.NotAcceptable(fmt.Sprintf("outpost: the cloud is unreachable and %s was recorded only as protobuf, a kind outpost has no type for; "+
		"offline it can be read as application/vnd.kubernetes.protobuf, or as metadata only (as=PartialObjectMetadata)", resource))
}

// ProtobufAgrees checks that proto, the protobuf message kept for an
// object, and data, its JSON, are the same object: the same name,
// namespace, uid and resourceVersion (`outpost cache verify`).
func ProtobufAgrees(data, proto []byte) error {
	om, err := protobufObjectMeta(proto)
	if err != nil {
		return err
	}
	var j struct {
		Metadata struct {
			Name, Namespace, UID, ResourceVersion string
		} `json:"metadata"`
	}
	if err := json.Unmarshal(data, &j); err != nil {
		return fmt.Errorf("%w: JSON of the object: %v", ErrUndecodable, err)
	}
	p, m := om, j.Metadata
	switch {
	case p.Name != m.Name || p.Namespace != m.Namespace:
		return fmt.Errorf("protobuf is of %s/%s, JSON of %s/%s", p.Namespace, p.Name, m.Namespace, m.Name)
	case string(p.UID) != m.UID:
		return fmt.Errorf("protobuf has uid %s, JSON %s", p.UID, m.UID)
	case p.ResourceVersion != m.ResourceVersion:
		return fmt.Errorf("protobuf is at resourceVersion %s, JSON at %s", p.ResourceVersion, m.ResourceVersion)
	}
	return nil
}
