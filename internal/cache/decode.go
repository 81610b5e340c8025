package cache

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"reflect"
	goruntime "runtime"
	"strings"
	"sync"
	"sync/atomic"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	cborserializer "k8s.io/apimachinery/pkg/runtime/serializer/cbor"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/watch"

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

// List is a decoded list answer.
type List struct {
	Kind, APIVersion string
	ResourceVersion  string
	Continue         string
	Items            []store.Object
}

func mediaType(contentType string) string {
	switch contentType {
	case mediaJSON, mediaProtobuf, mediaCBOR: // as the apiserver sends them
		return contentType
	}
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return contentType
	}
	return mt
}

// DecodeList decodes a list response body of resource into store objects.
func DecodeList(contentType string, body []byte, resource string) (List, error) {
	return decodeList(contentType, body, resource, nil)
}

// stored returns the stored object of this namespace, name and
// resourceVersion, if there is one: an item of a list that has not
// changed since it was stored need not be decoded again, and most items
// of a re-list have not.
type stored func(namespace, name, rv string) (store.Object, bool)

func decodeList(contentType string, body []byte, resource string, known stored) (List, error) {
	switch mediaType(contentType) {
	case mediaJSON:
		return decodeJSONList(body, resource, known)
	case mediaProtobuf, mediaCBOR:
		if l, ok, err := decodeProtobufList(body, resource, known); ok {
			return l, err
		}
		return decodeTypedList(contentType, body, resource)
	default:
		return List{}, fmt.Errorf("%w: content type %q", ErrUndecodable, contentType)
	}
}

// decodeTypedList decodes a protobuf or CBOR list whole.
func decodeTypedList(contentType string, body []byte, resource string) (List, error) {
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
}

// decodeProtobufList decodes a protobuf list item by item, where
// decodeTyped would decode it whole: items known (if not nil) stores
// already are taken from there, and each item keeps its protobuf encoding.
// ok is false when it cannot (not protobuf, a list type it does not know
// the layout of, a malformed body): the caller then decodes the list
// whole, which says what is wrong.
func decodeProtobufList(body []byte, resource string, known stored) (l List, ok bool, err error) {
	env, found := bytes.CutPrefix(body, protobufMagic)
	if !found {
		return List{}, false, nil
	}
	if known == nil {
		known = func(string, string, string) (store.Object, bool) { return store.Object{}, false }
	}
	var typeMeta, raw []byte
	var encoded bool
	if !protoFields(env, func(num uint64, v []byte) bool {
		switch num {
		case 1:
			typeMeta = v
		case 2:
			raw = v
		case 3:
			encoded = len(v) > 0 // a content encoding of the raw bytes
		}
		return true
	}) || raw == nil || encoded {
		return List{}, false, nil
	}
	apiVersion, _, _, ok1 := protoField(typeMeta, 1)
	kind, _, _, ok2 := protoField(typeMeta, 2)
	if !ok1 || !ok2 {
		return List{}, false, nil
	}
	l.APIVersion, l.Kind = string(apiVersion), string(kind)
	gv, err := schema.ParseGroupVersion(l.APIVersion)
	if err != nil {
		return List{}, false, nil
	}
	gvk := gv.WithKind(l.Kind)
	itemType, typed := protobufListItemType(gvk)
	if !typed && knownKind(gvk) {
		return List{}, false, nil // a type of ours with another layout: decoded whole
	}
	defer func() {
		// The generated decoders are fed bytes from the network.
		if r := recover(); r != nil {
			l, ok, err = List{}, true, fmt.Errorf("%w: decoder panic: %v", ErrUndecodable, r)
		}
	}()
	l.Items = []store.Object{}
	// The items' protobuf encodings are kept (see store.Object.Proto),
	// copied into one block: body is a pooled buffer.
	slab := make([]byte, 0, len(raw))
	var todo []int // the items known does not hold, decoded after the walk
	well := protoFields(raw, func(num uint64, v []byte) bool {
		switch num {
		case 1: // ListMeta
			rv, _, short1, ok1 := protoField(v, 2)
			cont, _, short2, ok2 := protoField(v, 3)
			if !ok1 || !ok2 || short1 || short2 {
				err = fmt.Errorf("%w: protobuf list: malformed metadata", ErrUndecodable)
				return false
			}
			l.ResourceVersion, l.Continue = string(rv), string(cont)
		case 2: // an item
			start := len(slab)
			slab = append(slab, v...)
			p := slab[start:len(slab):len(slab)]
			o, ok := knownItem(p, known)
			if !ok {
				todo = append(todo, len(l.Items))
			}
			o.Proto = p
			l.Items = append(l.Items, o)
		}
		return true
	})
	if err == nil && !well {
		err = fmt.Errorf("%w: protobuf list: malformed", ErrUndecodable)
	}
	switch {
	case err != nil:
	case typed:
		err = decodeProtobufItems(l.Items, todo, itemType, resource)
	default:
		// A kind outpost has no type for (see generic.go).
		err = inParallel(len(todo), func(j int) error {
			it := &l.Items[todo[j]]
			o, err := objectFromProtobuf(it.Proto)
			*it = o
			return err
		})
	}
	if err != nil {
		return List{}, true, err
	}
	return l, true, nil
}

// knownItem returns the stored object of the protobuf list item v when
// known holds it at the item's resourceVersion.
func knownItem(v []byte, known stored) (store.Object, bool) {
	md, found, short, ok := protoField(v, 1) // ObjectMeta
	if !ok || !found || short {
		return store.Object{}, false
	}
	name, _, _, ok1 := protoField(md, 1)
	ns, _, _, ok2 := protoField(md, 3)
	rv, _, _, ok3 := protoField(md, 6)
	if !ok1 || !ok2 || !ok3 || len(name) == 0 || len(rv) == 0 {
		return store.Object{}, false
	}
	return known(string(ns), string(name), string(rv))
}

// decodeProtobufItems decodes items[i] for each i of todo from its
// protobuf encoding (items[i].Proto, which it keeps), spread over the
// cores: a list of 100,000 objects takes seconds on one.
func decodeProtobufItems(items []store.Object, todo []int, itemType reflect.Type, resource string) error {
	return inParallel(len(todo), func(j int) error {
		it := &items[todo[j]]
		obj := reflect.New(itemType).Interface()
		if err := obj.(protobufUnmarshaler).Unmarshal(it.Proto); err != nil {
			return fmt.Errorf("%w: protobuf list item: %v", ErrUndecodable, err)
		}
		o, err := objectFromTyped(obj.(runtime.Object), resource)
		if err != nil {
			return err
		}
		o.Proto = it.Proto
		*it = o
		return nil
	})
}

// inParallel calls fn(j) for each j below n, spread over the cores (one
// worker per 256 calls at most), and returns the errors it met; after the
// first, the workers stop. A panic in fn, which decoders fed bytes from
// the network may raise, is such an error.
func inParallel(n int, fn func(j int) error) error {
	workers := min(goruntime.GOMAXPROCS(0), 1+n/256)
	errs := make([]error, workers)
	var failed atomic.Bool
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			defer func() {
				if r := recover(); r != nil {
					errs[w] = fmt.Errorf("%w: decoder panic: %v", ErrUndecodable, r)
					failed.Store(true)
				}
			}()
			for j := w; j < n && !failed.Load(); j += workers {
				if err := fn(j); err != nil {
					errs[w] = err
					failed.Store(true)
					return
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

type protobufUnmarshaler interface{ Unmarshal([]byte) error }

// protobufListItemType returns the item type of a built-in list kind whose
// protobuf layout is the one every Kubernetes list has, ListMeta in field
// 1 and the items in field 2, with each item's ObjectMeta in its field 1
// (checked on the generated struct tags, not assumed).
func protobufListItemType(gvk schema.GroupVersionKind) (reflect.Type, bool) {
	if t, ok := listItemTypes.Load(gvk); ok {
		item := t.(listLayout).item
		return item, item != nil
	}
	var item reflect.Type
	if obj, err := cacheScheme.New(gvk); err == nil {
		lt := reflect.TypeOf(obj).Elem()
		md, ok1 := lt.FieldByName("ListMeta")
		items, ok2 := lt.FieldByName("Items")
		if ok1 && ok2 && strings.HasPrefix(md.Tag.Get("protobuf"), "bytes,1,") && strings.HasPrefix(items.Tag.Get("protobuf"), "bytes,2,rep,") &&
			items.Type.Kind() == reflect.Slice && items.Type.Elem().Kind() == reflect.Struct {
			it := items.Type.Elem()
			om, ok := it.FieldByName("ObjectMeta")
			_, unmarshals := reflect.New(it).Interface().(protobufUnmarshaler)
			_, isObject := reflect.New(it).Interface().(runtime.Object)
			if ok && strings.HasPrefix(om.Tag.Get("protobuf"), "bytes,1,") && unmarshals && isObject {
				item = it
			}
		}
	}
	listItemTypes.Store(gvk, listLayout{item})
	return item, item != nil
}

// listItemTypes remembers protobufListItemType's answers.
var listItemTypes sync.Map // schema.GroupVersionKind -> listLayout

type listLayout struct{ item reflect.Type } // nil: not one to decode item by item

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
		if apiVersion, kind, msg, ok := protobufEnvelopeParts(body); ok && !knownKind(schema.FromAPIVersionAndKind(apiVersion, kind)) {
			o, err := objectFromProtobuf(bytes.Clone(msg))
			return o, kind, apiVersion, err
		}
		obj, err := decodeTyped(contentType, body)
		if err != nil {
			return o, "", "", err
		}
		gvk := obj.GetObjectKind().GroupVersionKind()
		o, err = objectFromTyped(obj, resource)
		if err == nil && mediaType(contentType) == mediaProtobuf {
			o.Proto = protobufMessage(body)
		}
		return o, gvk.Kind, gvk.GroupVersion().String(), err
	default:
		return o, "", "", fmt.Errorf("%w: content type %q", ErrUndecodable, contentType)
	}
}

var cborSerializer = cborserializer.NewSerializer(unstructuredCreater{}, unstructuredTyper{})

// cacheScheme and codecs decode and encode the built-in types and the
// meta.k8s.io types (Table, PartialObjectMetadata) that client-go's scheme
// leaves out. They are built when first used, not at start: registering
// every built-in type costs memory that an idle outpost, or one whose
// clients all speak JSON, need not spend.
var (
	cacheScheme lazyScheme
	codecs      lazyCodecs
)

var (
	loadScheme = sync.OnceValue(func() *runtime.Scheme {
		s := runtime.NewScheme()
		utilruntime.Must(builtinTypes.AddToScheme(s))
		metav1.AddMetaToScheme(s)
		return s
	})
	loadCodecs = sync.OnceValue(func() serializer.CodecFactory { return serializer.NewCodecFactory(loadScheme()) })
)

// lazyScheme is the part of *runtime.Scheme the cache uses (it is a
// runtime.ObjectCreater and runtime.ObjectTyper), built at first use.
type lazyScheme struct{}

func (lazyScheme) New(gvk schema.GroupVersionKind) (runtime.Object, error) {
	return loadScheme().New(gvk)
}

func (lazyScheme) ObjectKinds(obj runtime.Object) ([]schema.GroupVersionKind, bool, error) {
	return loadScheme().ObjectKinds(obj)
}

func (lazyScheme) Recognizes(gvk schema.GroupVersionKind) bool { return loadScheme().Recognizes(gvk) }

func (lazyScheme) AllKnownTypes() map[schema.GroupVersionKind]reflect.Type {
	return loadScheme().AllKnownTypes()
}

// lazyCodecs is the part of serializer.CodecFactory the cache uses, built
// at first use.
type lazyCodecs struct{}

func (lazyCodecs) UniversalDeserializer() runtime.Decoder {
	return loadCodecs().UniversalDeserializer()
}

func (lazyCodecs) SupportedMediaTypes() []runtime.SerializerInfo {
	return loadCodecs().SupportedMediaTypes()
}

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
	if u, ok := item.(*unstructured.Unstructured); ok {
		c := u.DeepCopy()
		delete(c.Object, "kind")
		delete(c.Object, "apiVersion")
		data, err := json.Marshal(c.Object)
		if err != nil {
			return store.Object{}, fmt.Errorf("%w: re-encoding item: %v", ErrUndecodable, err)
		}
		return objectFromJSON(data, resource)
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
		return objectFromJSON(data, resource)
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
// object, leaving the rest byte for byte. It returns a copy.
func stripTypeMeta(raw []byte) ([]byte, error) {
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
	protobuf io.Reader // length-delimited metav1.WatchEvent messages
	frame    []byte    // the protobuf frame being decoded
}

// NewWatchDecoder decodes the watch stream r, sent as contentType.
func NewWatchDecoder(contentType string, r io.ReadCloser, resource string) (*WatchDecoder, error) {
	d := &WatchDecoder{resource: resource}
	switch mediaType(contentType) {
	case mediaJSON:
		d.json = json.NewDecoder(r)
	case mediaProtobuf:
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
		return d.event(frame.Type, func() (store.Object, error) { return objectFromJSON(frame.Object, d.resource) }, metaOfJSON(frame.Object))
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
	return d.event(typ, func() (store.Object, error) {
		msg := bytes.Clone(msg) // the object keeps it; the frame is reused
		if !knownKind(schema.FromAPIVersionAndKind(apiVersion, kind)) {
			return objectFromProtobuf(msg)
		}
		obj, err := decodeTyped(mediaProtobuf, we.Object.Raw)
		if err != nil {
			return store.Object{}, err
		}
		o, err := objectFromTyped(obj, d.resource)
		o.Proto = msg
		return o, err
	}, m)
}

// watchReadError is what a failed read of a watch stream means: its end
// (also when it ends mid-frame, as a closed connection does), the
// recorder's own pipe errors as they are, else an undecodable stream.
func watchReadError(err error) error {
	switch {
	case err == io.EOF, errors.Is(err, io.ErrUnexpectedEOF):
		return io.EOF
	case errors.Is(err, errOverflow), errors.Is(err, errPipeClosed):
		return err
	}
	return fmt.Errorf("%w: watch stream: %v", ErrUndecodable, err)
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

// decodeJSONList decodes a JSON list, reading each item where it lies in
// body rather than copying it out first.
func decodeJSONList(body []byte, resource string, known stored) (List, error) {
	var l List
	var err error
	ok := jsonMembers(body, func(key []byte, _, vstart, vend int) bool {
		v := body[vstart:vend]
		switch {
		case jsonKeyIs(key, "kind"):
			err = json.Unmarshal(v, &l.Kind)
		case jsonKeyIs(key, "apiVersion"):
			err = json.Unmarshal(v, &l.APIVersion)
		case jsonKeyIs(key, "metadata"):
			var md struct {
				ResourceVersion string `json:"resourceVersion"`
				Continue        string `json:"continue"`
			}
			err = json.Unmarshal(v, &md)
			l.ResourceVersion, l.Continue = md.ResourceVersion, md.Continue
		case jsonKeyIs(key, "items"):
			if string(v) == "null" {
				break
			}
			l.Items = make([]store.Object, 0, 64)
			if !jsonElements(v, func(start, end int) bool {
				item := v[start:end]
				if known != nil {
					if o, ok := knownJSONItem(item, known); ok {
						l.Items = append(l.Items, o)
						return true
					}
				}
				var o store.Object
				if o, err = objectFromJSON(item, resource); err == nil {
					l.Items = append(l.Items, o)
				}
				return err == nil
			}) && err == nil {
				err = fmt.Errorf("%w: json list: malformed items", ErrUndecodable)
			}
		}
		return err == nil
	})
	if err == nil && !ok {
		err = fmt.Errorf("%w: json list: not an object", ErrUndecodable)
	}
	if err != nil {
		if !errors.Is(err, ErrUndecodable) {
			err = fmt.Errorf("%w: json list: %v", ErrUndecodable, err)
		}
		return List{}, err
	}
	if l.Items == nil {
		l.Items = []store.Object{}
	}
	return l, nil
}

// knownJSONItem returns the stored object of the JSON list item's
// namespace, name and resourceVersion, if there is one.
func knownJSONItem(item []byte, known stored) (store.Object, bool) {
	var ns, name, rv string
	plain := true
	jsonMembers(item, func(key []byte, _, vstart, vend int) bool {
		if !jsonKeyIs(key, "metadata") {
			return true
		}
		md := item[vstart:vend]
		jsonMembers(md, func(key []byte, _, vstart, vend int) bool {
			var p *string
			switch {
			case jsonKeyIs(key, "namespace"):
				p = &ns
			case jsonKeyIs(key, "name"):
				p = &name
			case jsonKeyIs(key, "resourceVersion"):
				p = &rv
			default:
				return true
			}
			var ok bool
			*p, ok = jsonPlainString(md[vstart:vend])
			plain = plain && ok
			return plain
		})
		return false
	})
	if !plain || name == "" || rv == "" {
		return store.Object{}, false
	}
	return known(ns, name, rv)
}

// peekMeta reads the resourceVersion (and for a list its continue token)
// of an answer without decoding it: kube-apiserver writes an object's or a
// list's metadata before anything else of size (JSON: after kind and
// apiVersion; protobuf: field 1 of the object in its envelope). body may be
// only the start of the answer; ok is false when the metadata is not all
// there, or the answer looks unlike what the apiserver writes.
func peekMeta(contentType string, body []byte, list bool) (rv, cont string, ok bool) {
	switch mediaType(contentType) {
	case mediaJSON:
		return peekJSONMeta(body, list)
	case mediaProtobuf:
		return peekProtobufMeta(body, list)
	}
	return "", "", false
}

func peekJSONMeta(body []byte, list bool) (rv, cont string, ok bool) {
	found := false
	jsonMembers(body, func(key []byte, _, vstart, vend int) bool {
		if !jsonKeyIs(key, "metadata") {
			return true
		}
		md := body[vstart:vend]
		found = jsonMembers(md, func(key []byte, _, vstart, vend int) bool {
			switch {
			case jsonKeyIs(key, "resourceVersion"):
				rv, ok = jsonPlainString(md[vstart:vend])
			case list && jsonKeyIs(key, "continue"):
				var cok bool
				if cont, cok = jsonPlainString(md[vstart:vend]); !cok {
					// A continue token is base64: no escapes to undo.
					ok = false
					return false
				}
			}
			return true
		})
		return false
	})
	return rv, cont, found && ok && rv != ""
}

// jsonPlainString returns the JSON string v when it holds no escapes.
func jsonPlainString(v []byte) (string, bool) {
	if len(v) < 2 || v[0] != '"' || v[len(v)-1] != '"' || bytes.IndexByte(v, '\\') >= 0 {
		return "", false
	}
	return string(v[1 : len(v)-1]), true
}

// A small JSON scanner: it finds the members of an object and the elements
// of an array without decoding them, for the few places that need only a
// part of a large document (the metadata of a list, its items one by one)
// or must edit it byte for byte (dropping kind and apiVersion). It trusts
// its input to be JSON; on anything else it reports failure, never panics.

// jsonMembers calls fn for each member of the JSON object b: its key as
// written (without quotes), where the member starts and where its value
// starts and ends. It stops early when fn returns false. ok is false when b
// is not an object, or ends before fn stopped or the object closed.
func jsonMembers(b []byte, fn func(key []byte, start, vstart, vend int) bool) (ok bool) {
	i := jsonSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return false
	}
	i = jsonSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return true
	}
	for {
		if i >= len(b) || b[i] != '"' {
			return false
		}
		start := i
		kend := jsonSkipString(b, i)
		if kend < 0 {
			return false
		}
		i = jsonSpace(b, kend)
		if i >= len(b) || b[i] != ':' {
			return false
		}
		vstart := jsonSpace(b, i+1)
		vend := jsonSkip(b, vstart)
		if vend < 0 {
			return false
		}
		if !fn(b[start+1:kend-1], start, vstart, vend) {
			return true
		}
		i = jsonSpace(b, vend)
		if i >= len(b) {
			return false
		}
		switch b[i] {
		case ',':
			i = jsonSpace(b, i+1)
		case '}':
			return true
		default:
			return false
		}
	}
}

// jsonElements calls fn with the bounds of each element of the JSON array
// b, stopping early when fn returns false. ok is as for jsonMembers.
func jsonElements(b []byte, fn func(start, end int) bool) (ok bool) {
	i := jsonSpace(b, 0)
	if i >= len(b) || b[i] != '[' {
		return false
	}
	i = jsonSpace(b, i+1)
	if i < len(b) && b[i] == ']' {
		return true
	}
	for {
		end := jsonSkip(b, i)
		if end < 0 {
			return false
		}
		if !fn(i, end) {
			return true
		}
		i = jsonSpace(b, end)
		if i >= len(b) {
			return false
		}
		switch b[i] {
		case ',':
			i = jsonSpace(b, i+1)
		case ']':
			return true
		default:
			return false
		}
	}
}

// jsonKeyIs reports whether the raw key (as written, without quotes) is
// name, undoing escapes in the rare key that has them.
func jsonKeyIs(key []byte, name string) bool {
	if bytes.IndexByte(key, '\\') < 0 {
		return string(key) == name
	}
	var s string
	q := make([]byte, 0, len(key)+2)
	q = append(append(append(q, '"'), key...), '"')
	return json.Unmarshal(q, &s) == nil && s == name
}

func jsonSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// jsonSkipString returns the index after the string that starts at b[i]
// (a quote), or -1 when b ends first.
func jsonSkipString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return -1
}

// jsonSkip returns the index after the value that starts at b[i], or -1
// when b ends first or holds no value there.
func jsonSkip(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return jsonSkipString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				if i = jsonSkipString(b, i); i < 0 {
					return -1
				}
				continue
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return -1
	case ',', ':', '}', ']':
		return -1
	default: // a number, true, false or null: up to the next delimiter
		start := i
		for i < len(b) {
			switch b[i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				return i
			}
			i++
		}
		// A scalar at the very end: complete only for a bare scalar, which
		// our callers never scan.
		if start == 0 {
			return i
		}
		return -1
	}
}
