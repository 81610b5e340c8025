package cache

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"reflect"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	cborserializer "k8s.io/apimachinery/pkg/runtime/serializer/cbor"
	"k8s.io/apimachinery/pkg/runtime/serializer/streaming"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/scheme"
	restwatch "k8s.io/client-go/rest/watch"

	"github.com/outposthq/outpost/internal/store"
)

// Media types outpost decodes.
const (
	mediaJSON     = "application/json"
	mediaProtobuf = "application/vnd.kubernetes.protobuf"
	mediaCBOR     = "application/cbor"
)

// ErrUndecodable wraps every failure to understand a recorded body. Such a
// body is dropped (and its view marked stale); it never fails the client.
var ErrUndecodable = errors.New("undecodable body")

// listDoc is the part of a JSON list outpost needs: items stay raw.
type listDoc struct {
	Kind       string `json:"kind"`
	APIVersion string `json:"apiVersion"`
	Metadata   struct {
		ResourceVersion string `json:"resourceVersion"`
		Continue        string `json:"continue"`
	} `json:"metadata"`
	Items []json.RawMessage `json:"items"`
}

// List is a decoded list answer.
type List struct {
	Kind, APIVersion string
	ResourceVersion  string
	Continue         string
	Items            []store.Object
}

func mediaType(contentType string) string {
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return contentType
	}
	return mt
}

// DecodeList decodes a list response body of resource into store objects.
func DecodeList(contentType string, body []byte, resource string) (List, error) {
	switch mediaType(contentType) {
	case mediaJSON:
		var doc listDoc
		if err := json.Unmarshal(body, &doc); err != nil {
			return List{}, fmt.Errorf("%w: json list: %v", ErrUndecodable, err)
		}
		l := List{Kind: doc.Kind, APIVersion: doc.APIVersion, ResourceVersion: doc.Metadata.ResourceVersion, Continue: doc.Metadata.Continue,
			Items: make([]store.Object, 0, len(doc.Items))}
		for _, raw := range doc.Items {
			o, err := objectFromJSON(raw, resource)
			if err != nil {
				return List{}, err
			}
			l.Items = append(l.Items, o)
		}
		return l, nil
	case mediaProtobuf, mediaCBOR:
		obj, err := decodeTyped(contentType, body)
		if err != nil {
			return List{}, err
		}
		lm, err := meta.ListAccessor(obj)
		if err != nil {
			return List{}, fmt.Errorf("%w: not a list: %v", ErrUndecodable, err)
		}
		gvk := obj.GetObjectKind().GroupVersionKind()
		l := List{Kind: gvk.Kind, APIVersion: gvk.GroupVersion().String(), ResourceVersion: lm.GetResourceVersion(), Continue: lm.GetContinue()}
		err = meta.EachListItem(obj, func(item runtime.Object) error {
			o, err := objectFromTyped(item, resource)
			if err == nil {
				l.Items = append(l.Items, o)
			}
			return err
		})
		return l, err
	default:
		return List{}, fmt.Errorf("%w: content type %q", ErrUndecodable, contentType)
	}
}

// DecodeObject decodes a single-object response body. kind and apiVersion
// are the object's own.
func DecodeObject(contentType string, body []byte, resource string) (o store.Object, kind, apiVersion string, err error) {
	switch mediaType(contentType) {
	case mediaJSON:
		var tm struct {
			Kind       string `json:"kind"`
			APIVersion string `json:"apiVersion"`
		}
		if err := json.Unmarshal(body, &tm); err != nil {
			return o, "", "", fmt.Errorf("%w: json object: %v", ErrUndecodable, err)
		}
		o, err = objectFromJSON(body, resource)
		return o, tm.Kind, tm.APIVersion, err
	case mediaProtobuf, mediaCBOR:
		obj, err := decodeTyped(contentType, body)
		if err != nil {
			return o, "", "", err
		}
		gvk := obj.GetObjectKind().GroupVersionKind()
		o, err = objectFromTyped(obj, resource)
		return o, gvk.Kind, gvk.GroupVersion().String(), err
	default:
		return o, "", "", fmt.Errorf("%w: content type %q", ErrUndecodable, contentType)
	}
}

var cborSerializer = cborserializer.NewSerializer(unstructuredCreater{}, unstructuredTyper{})

// codecs decode and encode the built-in types and the meta.k8s.io types
// (Table, PartialObjectMetadata) that client-go's scheme leaves out.
var (
	cacheScheme = func() *runtime.Scheme {
		s := runtime.NewScheme()
		utilruntime.Must(scheme.AddToScheme(s))
		metav1.AddMetaToScheme(s)
		return s
	}()
	codecs = serializer.NewCodecFactory(cacheScheme)
)

// decodeTyped decodes protobuf (built-in types, via client-go's scheme) or
// CBOR (into unstructured).
func decodeTyped(contentType string, body []byte) (obj runtime.Object, err error) {
	defer func() {
		// The decoders are generated code fed untrusted bytes.
		if r := recover(); r != nil {
			obj, err = nil, fmt.Errorf("%w: decoder panic: %v", ErrUndecodable, r)
		}
	}()
	if mediaType(contentType) == mediaCBOR {
		u := &unstructured.Unstructured{}
		obj, _, err = cborSerializer.Decode(body, nil, u)
		if err != nil {
			return nil, fmt.Errorf("%w: cbor: %v", ErrUndecodable, err)
		}
		if u.IsList() {
			return u.ToList()
		}
		return obj, nil
	}
	obj, _, err = codecs.UniversalDeserializer().Decode(body, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: protobuf: %v", ErrUndecodable, err)
	}
	return obj, nil
}

// objectFromTyped turns a decoded item into a stored object (canonical
// JSON without kind/apiVersion, as items appear in a JSON list).
func objectFromTyped(item runtime.Object, resource string) (o store.Object, err error) {
	if item == nil || reflectNil(item) {
		return store.Object{}, fmt.Errorf("%w: empty list item", ErrUndecodable)
	}
	defer func() {
		if r := recover(); r != nil {
			o, err = store.Object{}, fmt.Errorf("%w: re-encoding item: %v", ErrUndecodable, r)
		}
	}()
	var data []byte
	if u, ok := item.(*unstructured.Unstructured); ok {
		c := u.DeepCopy()
		delete(c.Object, "kind")
		delete(c.Object, "apiVersion")
		data, err = json.Marshal(c.Object)
	} else {
		item.GetObjectKind().SetGroupVersionKind(schema.GroupVersionKind{})
		data, err = json.Marshal(item)
	}
	if err != nil {
		return store.Object{}, fmt.Errorf("%w: re-encoding item: %v", ErrUndecodable, err)
	}
	return objectFromJSON(data, resource)
}

// objectFromJSON indexes one JSON object: name, namespace, resourceVersion,
// labels and its field-selector values. Data is stored without kind and
// apiVersion, so that list items read back exactly as the apiserver sent
// them; single-object answers put them back.
func objectFromJSON(raw []byte, resource string) (store.Object, error) {
	var doc fieldsDoc
	if err := json.Unmarshal(raw, &doc); err != nil {
		return store.Object{}, fmt.Errorf("%w: json item: %v", ErrUndecodable, err)
	}
	if doc.Metadata.Name == "" {
		return store.Object{}, fmt.Errorf("%w: object without metadata.name", ErrUndecodable)
	}
	data, err := stripTypeMeta(raw)
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

// stripTypeMeta removes top-level "kind" and "apiVersion" from a JSON
// object. The apiserver writes them first, so the common case is a cheap
// prefix cut; anything else is re-encoded.
func stripTypeMeta(raw []byte) ([]byte, error) {
	raw = bytes.TrimSpace(raw)
	if !bytes.Contains(raw[:min(len(raw), 200)], []byte(`"kind"`)) && !bytes.Contains(raw[:min(len(raw), 200)], []byte(`"apiVersion"`)) {
		return bytes.Clone(raw), nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("%w: json object: %v", ErrUndecodable, err)
	}
	_, hasKind := m["kind"]
	_, hasAPIVersion := m["apiVersion"]
	if !hasKind && !hasAPIVersion {
		return bytes.Clone(raw), nil
	}
	delete(m, "kind")
	delete(m, "apiVersion")
	return json.Marshal(m)
}

// withTypeMeta puts kind and apiVersion back at the front of a stored
// object, as the apiserver writes a single object.
func withTypeMeta(data []byte, kind, apiVersion string) []byte {
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

// Event is one decoded watch event.
type Event struct {
	Type   watch.EventType
	Object store.Object
	// Kind and APIVersion are the object's.
	Kind, APIVersion string
	// InitialEventsEnd marks the bookmark that ends the initial events of a
	// WatchList (annotation k8s.io/initial-events-end: "true").
	InitialEventsEnd bool
}

// eventMeta is what every watch event object says of itself.
type eventMeta struct {
	Kind, APIVersion string
	ResourceVersion  string
	InitialEventsEnd bool
}

// WatchDecoder reads a watch stream of one content type.
type WatchDecoder struct {
	resource string
	json     *json.Decoder
	typed    *restwatch.Decoder
}

// NewWatchDecoder decodes the watch stream r, sent as contentType.
func NewWatchDecoder(contentType string, r io.ReadCloser, resource string) (*WatchDecoder, error) {
	d := &WatchDecoder{resource: resource}
	switch mediaType(contentType) {
	case mediaJSON:
		d.json = json.NewDecoder(r)
	case mediaProtobuf:
		info, ok := runtime.SerializerInfoForMediaType(codecs.SupportedMediaTypes(), mediaProtobuf)
		if !ok || info.StreamSerializer == nil {
			return nil, fmt.Errorf("%w: no protobuf stream serializer", ErrUndecodable)
		}
		frames := info.StreamSerializer.Framer.NewFrameReader(r)
		d.typed = restwatch.NewDecoder(streaming.NewDecoder(frames, info.StreamSerializer.Serializer), codecs.UniversalDeserializer())
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
		return d.event(frame.Type, func() (store.Object, error) { return objectFromJSON(frame.Object, d.resource) }, metaOfJSON(frame.Object))
	}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: decoder panic: %v", ErrUndecodable, r)
		}
	}()
	typ, obj, err := d.typed.Decode()
	if err != nil {
		if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
			return ev, io.EOF
		}
		return ev, fmt.Errorf("%w: watch frame: %v", ErrUndecodable, err)
	}
	m := metaOfTyped(obj)
	return d.event(typ, func() (store.Object, error) { return objectFromTyped(obj, d.resource) }, m)
}

func (d *WatchDecoder) event(typ watch.EventType, decode func() (store.Object, error), m eventMeta) (Event, error) {
	ev := Event{Type: typ, Kind: m.Kind, APIVersion: m.APIVersion}
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
	}
	_ = json.Unmarshal(raw, &doc)
	return eventMeta{Kind: doc.Kind, APIVersion: doc.APIVersion, ResourceVersion: doc.Metadata.ResourceVersion,
		InitialEventsEnd: doc.Metadata.Annotations[initialEventsEnd] == "true"}
}

func metaOfTyped(obj runtime.Object) eventMeta {
	var m eventMeta
	gvk := obj.GetObjectKind().GroupVersionKind()
	if gvk.Kind == "" {
		if kinds, _, err := cacheScheme.ObjectKinds(obj); err == nil && len(kinds) > 0 {
			gvk = kinds[0]
		}
	}
	m.Kind, m.APIVersion = gvk.Kind, gvk.GroupVersion().String()
	if a, err := meta.Accessor(obj); err == nil {
		m.ResourceVersion = a.GetResourceVersion()
		m.InitialEventsEnd = a.GetAnnotations()[initialEventsEnd] == "true"
	}
	return m
}

type unstructuredCreater struct{}

func (unstructuredCreater) New(gvk schema.GroupVersionKind) (runtime.Object, error) {
	u := &unstructured.Unstructured{}
	u.SetGroupVersionKind(gvk)
	return u, nil
}

type unstructuredTyper struct{}

func (unstructuredTyper) ObjectKinds(obj runtime.Object) ([]schema.GroupVersionKind, bool, error) {
	return []schema.GroupVersionKind{obj.GetObjectKind().GroupVersionKind()}, false, nil
}

func (unstructuredTyper) Recognizes(schema.GroupVersionKind) bool { return true }

// reflectNil reports whether a non-nil interface holds a nil pointer, as
// list items of a malformed body can.
func reflectNil(obj runtime.Object) bool {
	v := reflect.ValueOf(obj)
	return v.Kind() == reflect.Pointer && v.IsNil()
}
