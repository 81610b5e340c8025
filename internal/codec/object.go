package codec

import (
	"bytes"
	"encoding/json"
	"fmt"
	"reflect"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/outposthq/outpost/internal/store"
)

// DecodeObject decodes a single-object response body. kind and apiVersion
// are the object's own.
func DecodeObject(contentType string, body []byte, resource string) (o store.Object, kind, apiVersion string, err error) {
	switch MediaType(contentType) {
	case MediaJSON:
		var tm struct {
			Kind       string `json:"kind"`
			APIVersion string `json:"apiVersion"`
		}
		if err := json.Unmarshal(body, &tm); err != nil {
			return o, "", "", fmt.Errorf("%w: json object: %v", ErrUndecodable, err)
		}
		o, err = ObjectFromJSON(body, resource)
		return o, tm.Kind, tm.APIVersion, err
	case MediaProtobuf, MediaCBOR:
		if apiVersion, kind, msg, ok := protobufEnvelopeParts(body); ok && !KnownKind(schema.FromAPIVersionAndKind(apiVersion, kind)) {
			o, err := objectFromProtobuf(bytes.Clone(msg))
			return o, kind, apiVersion, err
		}
		obj, err := decodeTyped(contentType, body)
		if err != nil {
			return o, "", "", err
		}
		gvk := obj.GetObjectKind().GroupVersionKind()
		o, err = ObjectFromTyped(obj, resource)
		if err == nil && MediaType(contentType) == MediaProtobuf {
			o.Proto = protobufMessage(body)
		}
		return o, gvk.Kind, gvk.GroupVersion().String(), err
	default:
		return o, "", "", fmt.Errorf("%w: content type %q", ErrUndecodable, contentType)
	}
}

// ObjectFromTyped turns a decoded item into a stored object (canonical
// JSON without kind/apiVersion, as items appear in a JSON list).
func ObjectFromTyped(item runtime.Object, resource string) (o store.Object, err error) {
	if item == nil || reflectNil(item) {
		return store.Object{}, fmt.Errorf("%w: empty list item", ErrUndecodable)
	}
	defer func() {
		if r := recover(); r != nil {
			o, err = store.Object{}, fmt.Errorf("%w: re-encoding item: %v", ErrUndecodable, r)
		}
	}()
	if u, ok := item.(*unstructured.Unstructured); ok {
		c := u.DeepCopy()
		delete(c.Object, "kind")
		delete(c.Object, "apiVersion")
		data, err := json.Marshal(c.Object)
		if err != nil {
			return store.Object{}, fmt.Errorf("%w: re-encoding item: %v", ErrUndecodable, err)
		}
		return ObjectFromJSON(data, resource)
	}
	// Without its type meta a typed object encodes as a JSON list item.
	item.GetObjectKind().SetGroupVersionKind(schema.GroupVersionKind{})
	data, err := json.Marshal(item)
	if err != nil {
		return store.Object{}, fmt.Errorf("%w: re-encoding item: %v", ErrUndecodable, err)
	}
	// Index it from the typed object rather than by decoding the JSON
	// just written, which would cost as much again.
	doc, ok := typedFieldsDoc(item, resource)
	if !ok {
		return ObjectFromJSON(data, resource)
	}
	f := doc.fields(resource)
	if doc.Metadata.Name == "" {
		return store.Object{}, fmt.Errorf("%w: object without metadata.name", ErrUndecodable)
	}
	return store.Object{
		Namespace:       doc.Metadata.Namespace,
		Name:            doc.Metadata.Name,
		ResourceVersion: doc.Metadata.ResourceVersion,
		Labels:          doc.Metadata.Labels,
		Fields:          f,
		Data:            data,
	}, nil
}

// ObjectFromJSON indexes one JSON object: name, namespace, resourceVersion,
// labels and its field-selector values. Data is stored without kind and
// apiVersion, so that list items read back exactly as the apiserver sent
// them; single-object answers put them back.
func ObjectFromJSON(raw []byte, resource string) (store.Object, error) {
	var doc fieldsDoc
	if err := json.Unmarshal(raw, &doc); err != nil {
		return store.Object{}, fmt.Errorf("%w: json item: %v", ErrUndecodable, err)
	}
	if doc.Metadata.Name == "" {
		return store.Object{}, fmt.Errorf("%w: object without metadata.name", ErrUndecodable)
	}
	data, err := StripTypeMeta(raw)
	if err != nil {
		return store.Object{}, err
	}
	return store.Object{
		Namespace:       doc.Metadata.Namespace,
		Name:            doc.Metadata.Name,
		ResourceVersion: doc.Metadata.ResourceVersion,
		Labels:          doc.Metadata.Labels,
		Fields:          doc.fields(resource),
		Data:            data,
	}, nil
}

// StripTypeMeta removes top-level "kind" and "apiVersion" from a JSON
// object, leaving the rest byte for byte. It returns a copy.
func StripTypeMeta(raw []byte) ([]byte, error) {
	raw = bytes.TrimSpace(raw)
	var keep [][2]int // spans of the members kept
	cut := false
	ok := jsonMembers(raw, func(key []byte, start, _, end int) bool {
		if jsonKeyIs(key, "kind") || jsonKeyIs(key, "apiVersion") {
			cut = true
		} else {
			keep = append(keep, [2]int{start, end})
		}
		return true
	})
	if !ok {
		return nil, fmt.Errorf("%w: json object", ErrUndecodable)
	}
	if !cut {
		return bytes.Clone(raw), nil
	}
	out := make([]byte, 0, len(raw))
	out = append(out, '{')
	for i, k := range keep {
		if i > 0 {
			out = append(out, ',')
		}
		out = append(out, raw[k[0]:k[1]]...)
	}
	return append(out, '}'), nil
}

// WithTypeMeta puts kind and apiVersion back at the front of a stored
// object, as the apiserver writes a single object.
func WithTypeMeta(data []byte, kind, apiVersion string) []byte {
	if kind == "" {
		return data
	}
	var b bytes.Buffer
	b.Grow(len(data) + len(kind) + len(apiVersion) + 32)
	b.WriteString(`{"kind":`)
	k, _ := json.Marshal(kind)
	b.Write(k)
	b.WriteString(`,"apiVersion":`)
	v, _ := json.Marshal(apiVersion)
	b.Write(v)
	rest := bytes.TrimSpace(data)
	if len(rest) > 2 {
		b.WriteByte(',')
		b.Write(rest[1:])
	} else {
		b.WriteByte('}')
	}
	return b.Bytes()
}

// reflectNil reports whether a non-nil interface holds a nil pointer, as
// list items of a malformed body can.
func reflectNil(obj runtime.Object) bool {
	v := reflect.ValueOf(obj)
	return v.Kind() == reflect.Pointer && v.IsNil()
}
