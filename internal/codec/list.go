package codec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	goruntime "runtime"
	"strings"
	"sync"
	"sync/atomic"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/outposthq/outpost/internal/store"
)

// List is a decoded list answer.
type List struct {
	Kind, APIVersion string
	ResourceVersion  string
	Continue         string
	Items            []store.Object
}

// Stored returns the stored object of this namespace, name and
// resourceVersion, if there is one: an item of a list that has not
// changed since it was stored need not be decoded again, and most items
// of a re-list have not.
type Stored func(namespace, name, rv string) (store.Object, bool)

// DecodeList decodes a list response body of resource into store objects,
// taking the items known holds (if not nil) from there.
func DecodeList(contentType string, body []byte, resource string, known Stored) (List, error) {
	switch MediaType(contentType) {
	case MediaJSON:
		return decodeJSONList(body, resource, known)
	case MediaProtobuf, MediaCBOR:
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
		o, err := ObjectFromTyped(item, resource)
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
func decodeProtobufList(body []byte, resource string, known Stored) (l List, ok bool, err error) {
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
	if !typed && KnownKind(gvk) {
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
func knownItem(v []byte, known Stored) (store.Object, bool) {
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
		o, err := ObjectFromTyped(obj.(runtime.Object), resource)
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

// decodeJSONList decodes a JSON list, reading each item where it lies in
// body rather than copying it out first.
func decodeJSONList(body []byte, resource string, known Stored) (List, error) {
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
				if o, err = ObjectFromJSON(item, resource); err == nil {
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
func knownJSONItem(item []byte, known Stored) (store.Object, bool) {
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
