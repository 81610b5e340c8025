package codec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer/protobuf"

	"github.com/outposthq/outpost/internal/status"
)

// JSONList writes a JSON list around stored items without decoding them,
// in the apiserver's order: kind, apiVersion, metadata, items.
func JSONList(kind, apiVersion, rv, cont string, items [][]byte) []byte {
	prefix, suffix := JSONListFrame(kind, apiVersion, rv, cont)
	n := len(prefix) + len(suffix)
	for _, item := range items {
		n += len(item) + 1
	}
	b := bytes.NewBuffer(make([]byte, 0, n))
	b.Write(prefix)
	for i, item := range items {
		if i > 0 {
			b.WriteByte(',')
		}
		b.Write(item)
	}
	b.Write(suffix)
	return b.Bytes()
}

// JSONListFrame returns what a JSON list of kind holds before its items
// and after them; the items go between, separated by commas. A list
// written so is byte for byte JSONList's.
func JSONListFrame(kind, apiVersion, rv, cont string) (prefix, suffix []byte) {
	b := bytes.NewBuffer(make([]byte, 0, 64+2*(len(kind)+len(apiVersion)+len(rv)+len(cont))))
	b.WriteString(`{"kind":`)
	writeJSONString(b, kind)
	b.WriteString(`,"apiVersion":`)
	writeJSONString(b, apiVersion)
	b.WriteString(`,"metadata":{"resourceVersion":`)
	writeJSONString(b, rv)
	if cont != "" {
		b.WriteString(`,"continue":`)
		writeJSONString(b, cont)
	}
	b.WriteString(`},"items":[`)
	return b.Bytes(), []byte(`]}`)
}

// ProtobufListFrame returns what the protobuf list of kind holds before
// its items and after them, for items whose encodings take itemsSize
// bytes in all (the sum of ProtobufListItemSize); each item then goes
// between as AppendProtobufListItem appends it. A list written so is byte
// for byte ProtobufList's. ok is false when kind has no protobuf list.
func ProtobufListFrame(kind, apiVersion, rv, cont string, itemsSize int) (prefix, suffix []byte, ok bool) {
	gv, err := schema.ParseGroupVersion(apiVersion)
	if err != nil {
		return nil, nil, false
	}
	if _, typed := protobufListItemType(gv.WithKind(kind)); !typed && KnownKind(gv.WithKind(kind)) {
		return nil, nil, false
	}
	lm := &metav1.ListMeta{ResourceVersion: rv, Continue: cont}
	rawLen := fieldSize(lm.Size()) + itemsSize
	prefix = appendProtobufList(protobufEnvelopeHead(kind, apiVersion, rawLen, fieldSize(lm.Size())), lm, nil)
	return prefix, protobufEnvelopeTail, true
}

// ProtobufListItemSize is what an item of n bytes takes in a protobuf list.
func ProtobufListItemSize(n int) int { return fieldSize(n) }

// AppendProtobufListItem appends item, the protobuf message of one object,
// as an item of a protobuf list.
func AppendProtobufListItem(b, item []byte) []byte {
	return append(appendFieldHeader(b, 2, len(item)), item...)
}

// ProtobufList encodes items (stored JSON) as the protobuf list of kind,
// as kubelet and other clients of built-in types ask, decoding the items
// in parallel: decoding is nearly all the work of an offline list, and
// offline nothing else competes for the cores. ok is false when kind has
// no protobuf encoding or an item does not decode; the caller then takes
// the general path, which says so.
func ProtobufList(kind, apiVersion, rv, cont string, items, protos [][]byte) (body []byte, ok bool) {
	gv, err := schema.ParseGroupVersion(apiVersion)
	if err != nil {
		return nil, false
	}
	itemType, typed := protobufListItemType(gv.WithKind(kind))
	if !typed && KnownKind(gv.WithKind(kind)) {
		return nil, false
	}
	if protos == nil {
		protos = make([][]byte, len(items))
	}
	// Items stored without their protobuf encoding are decoded from JSON
	// and encoded, spread over the cores.
	var missing []int
	for i, p := range protos {
		if p == nil {
			missing = append(missing, i)
		}
	}
	if len(missing) > 0 && !typed {
		// A kind outpost has no type for: only the recorded messages
		// can be sent (see generic.go).
		return nil, false
	}
	errNotProtobuf := errors.New("not protobuf")
	if err := inParallel(len(missing), func(j int) error {
		i := missing[j]
		obj := reflect.New(itemType).Interface()
		m, isMarshaler := obj.(protobufMarshaler)
		if !isMarshaler || json.Unmarshal(items[i], obj) != nil {
			return errNotProtobuf
		}
		p := make([]byte, m.Size())
		if _, err := m.MarshalToSizedBuffer(p); err != nil {
			return err
		}
		protos[i] = p
		return nil
	}); err != nil {
		return nil, false
	}
	lm := &metav1.ListMeta{ResourceVersion: rv, Continue: cont}
	return ProtobufEnvelope(kind, apiVersion, protobufListSize(lm, protos), func(b []byte) []byte {
		return appendProtobufList(b, lm, protos)
	}), true
}

// protobufMarshaler is what the protobuf serializer needs of an object.
type protobufMarshaler interface {
	Size() int
	MarshalToSizedBuffer([]byte) (int, error)
}

// GuessListKind names the list of a view recorded without a kind, from the
// scheme's built-in types.
func GuessListKind(group, version, resource string) (string, string) {
	gv := schema.GroupVersion{Group: group, Version: version}
	for gvk := range cacheScheme.AllKnownTypes() {
		if gvk.GroupVersion() == gv && strings.HasSuffix(gvk.Kind, "List") &&
			strings.EqualFold(strings.TrimSuffix(gvk.Kind, "List")+"s", resource) {
			return gvk.Kind, gv.String()
		}
	}
	return "List", gv.String()
}

func writeJSONString(b *bytes.Buffer, s string) {
	q, _ := json.Marshal(s)
	b.Write(q)
}

// MetadataOnly keeps only the metadata of a stored object.
func MetadataOnly(data []byte) []byte {
	var doc struct {
		Metadata json.RawMessage `json:"metadata"`
	}
	if json.Unmarshal(data, &doc) != nil || len(doc.Metadata) == 0 {
		return []byte(`{"metadata":{}}`)
	}
	out := make([]byte, 0, len(doc.Metadata)+14)
	out = append(out, `{"metadata":`...)
	out = append(out, doc.Metadata...)
	return append(out, '}')
}

var protobufSerializer = protobuf.NewSerializer(cacheScheme, cacheScheme)

// Encode encodes a JSON answer in the media type a asks for.
func Encode(jsonBody []byte, a Accept) (contentType string, body []byte, err error) {
	if a.Media == MediaJSON || (a.PlainJSON && a.Media != MediaProtobuf && a.Media != MediaCBOR) {
		return MediaJSON, jsonBody, nil
	}
	switch a.Media {
	case MediaProtobuf:
		obj, _, err := codecs.UniversalDeserializer().Decode(jsonBody, nil, nil)
		if err == nil {
			var out bytes.Buffer
			if err = protobufSerializer.Encode(obj, &out); err == nil {
				return MediaProtobuf, out.Bytes(), nil
			}
		}
		if a.PlainJSON {
			return MediaJSON, jsonBody, nil
		}
		return "", nil, status.NotAcceptable(fmt.Sprintf("outpost cache cannot encode this answer as protobuf: %v", err))
	case MediaCBOR:
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(jsonBody); err != nil {
			return "", nil, apierrors.NewInternalError(err)
		}
		var obj runtime.Object = u
		if u.IsList() {
			l, err := u.ToList()
			if err != nil {
				return "", nil, apierrors.NewInternalError(err)
			}
			obj = l
		}
		var out bytes.Buffer
		if err := cborSerializer.Encode(obj, &out); err != nil {
			return "", nil, apierrors.NewInternalError(err)
		}
		return MediaCBOR, out.Bytes(), nil
	}
	return MediaJSON, jsonBody, nil
}

// Table builds the Table the apiserver's default printer would of a JSON
// list: name and creation time, each row with the object's metadata.
func Table(listJSON []byte) ([]byte, error) {
	var l struct {
		Metadata metav1.ListMeta  `json:"metadata"`
		Items    []map[string]any `json:"items"`
	}
	if err := json.Unmarshal(listJSON, &l); err != nil {
		return nil, err
	}
	t := metav1.Table{TypeMeta: metav1.TypeMeta{Kind: "Table", APIVersion: "meta.k8s.io/v1"}, ListMeta: l.Metadata,
		ColumnDefinitions: []metav1.TableColumnDefinition{
			{Name: "Name", Type: "string", Format: "name", Description: "Name of the object"},
			{Name: "Created At", Type: "date", Description: "When the object was created"},
		}}
	for _, item := range l.Items {
		md, _ := item["metadata"].(map[string]any)
		name, _ := md["name"].(string)
		created, _ := md["creationTimestamp"].(string)
		pom, _ := json.Marshal(map[string]any{"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": md})
		t.Rows = append(t.Rows, metav1.TableRow{Cells: []any{name, created}, Object: runtime.RawExtension{Raw: pom}})
	}
	return json.Marshal(t)
}

// Decode decodes a body (protobuf or JSON, in kube-apiserver's encoding)
// of a kind outpost has a type for, into into when it is not nil and of
// the body's type.
func Decode(body []byte, into runtime.Object) (runtime.Object, error) {
	obj, _, err := codecs.UniversalDeserializer().Decode(body, nil, into)
	return obj, err
}

// EncodeProtobuf encodes obj as kube-apiserver does for protobuf clients.
func EncodeProtobuf(obj runtime.Object) ([]byte, error) {
	var b bytes.Buffer
	err := protobufSerializer.Encode(obj, &b)
	return b.Bytes(), err
}
