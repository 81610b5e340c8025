package store

import (
	"bytes"
	"fmt"
)

// Object is one stored Kubernetes object, decoded by the caller into what
// the store needs to file and select it.
type Object struct {
	Namespace, Name string
	ResourceVersion string
	Labels          map[string]string
	// Fields holds the field-selector values of the object, e.g.
	// "metadata.name", "metadata.namespace", "spec.nodeName",
	// "status.phase". A field selector on a field missing here matches as
	// if the field were empty, so the caller must fill in every field the
	// apiserver supports for the resource.
	Fields map[string]string
	// Data is the whole object, JSON-encoded.
	Data []byte
	// Proto, when not nil, is the same object in protobuf: the message
	// alone, as a list's item (no envelope, no kind). It is stored only as
	// received from the apiserver, never derived, so that a protobuf
	// client offline gets the cloud's bytes without a decode. An object
	// written without it at the resourceVersion already stored keeps the
	// stored one; at any other resourceVersion it is dropped. The objects
	// of sealed resources never keep it.
	Proto []byte
}

// List calls fn for the members of view k in key order, which is the
// apiserver's: by namespace then name, compared as "namespace/name"
// strings. It starts after the member key after ("" = from the start; see
// MemberKey), and stops after limit objects (0 = no limit), or when fn
// returns an error, which List returns. A view that does not exist has no
// members; call View in the same Read to tell it from an empty one.
//
// Everything fn receives is a copy it may keep.
func (tx *Tx) List(k ViewKey, after string, limit int, fn func(Object) error) error {
	sealed := tx.seal.resource(k.Resource)
	return tx.walk(k, after, limit, func(mk string, rec []byte) error {
		var o Object
		o.Namespace, o.Name = splitMemberKey(mk)
		if err := tx.decodeObject(rec, &o, sealed); err != nil {
			return fmt.Errorf("listing view %s: reading %s: %w", k, mk, err)
		}
		return fn(o)
	})
}

// ListData is List for callers that need only each member's key
// ("namespace/name"), JSON and protobuf encoding (nil: none stored): it
// skips decoding labels and fields, which makes serving a large unfiltered
// view several times cheaper. data and proto are valid only during fn.
func (tx *Tx) ListData(k ViewKey, after string, limit int, fn func(key string, data, proto []byte) error) error {
	sealed := tx.seal.resource(k.Resource)
	return tx.walk(k, after, limit, func(mk string, rec []byte) error {
		proto, data, err := objectBodies(rec)
		if err == nil && sealed {
			// walk left the object's key in tx.okey.
			data, err = tx.openData(tx.plain[:0], data, tx.adFor(adObject, tx.okey))
			if data != nil {
				tx.plain = data
			}
		}
		if err != nil {
			return fmt.Errorf("listing view %s: reading %s: %w", k, mk, err)
		}
		return fn(mk, data, proto)
	})
}

// walk calls fn with the member key and object record of each member of
// view k after after, at most limit of them (0 = all).
func (tx *Tx) walk(k ViewKey, after string, limit int, fn func(mk string, rec []byte) error) error {
	vs, err := tx.view(k, false)
	if err != nil || vs == nil {
		return err
	}
	start := append(vs.prefix[:len(vs.prefix):len(vs.prefix)], after...)
	n := 0
	c := tx.members.Cursor()
	for key, _ := c.Seek(start); key != nil && bytes.HasPrefix(key, vs.prefix[:]); key, _ = c.Next() {
		mk := key[len(vs.prefix):]
		if after != "" && string(mk) == after {
			continue
		}
		tx.okey = objectKey(tx.okey, k.Resource, string(mk))
		rec := tx.objects.Get(tx.okey)
		if rec == nil {
			return fmt.Errorf("listing view %s: %w: member %s is not stored", k, ErrCorrupt, mk)
		}
		if err := fn(string(mk), rec); err != nil {
			return err
		}
		if n++; limit > 0 && n >= limit {
			break
		}
	}
	return nil
}

// Get returns the stored object of resource with namespace and name.
func (tx *Tx) Get(resource, namespace, name string) (Object, bool, error) {
	tx.okey = objectKey(tx.okey, resource, memberKey(namespace, name))
	rec := tx.objects.Get(tx.okey)
	if rec == nil {
		return Object{}, false, nil
	}
	o := Object{Namespace: namespace, Name: name}
	if err := tx.decodeObject(rec, &o, tx.seal.resource(resource)); err != nil {
		return Object{}, false, fmt.Errorf("reading %s %s/%s: %w", resource, namespace, name, err)
	}
	return o, true, nil
}

// decodeObject decodes the object record rec, stored under tx.okey, into
// o, opening its data when sealed.
func (tx *Tx) decodeObject(rec []byte, o *Object, sealed bool) error {
	if !sealed {
		_, err := decodeObject(rec, o)
		return err
	}
	data, err := objectData(rec)
	if err != nil {
		return err
	}
	// A fresh slice: o is the caller's to keep.
	if o.Data, err = tx.openData(nil, data, tx.adFor(adObject, tx.okey)); err != nil {
		return err
	}
	if o.Data == nil {
		o.Data = []byte{}
	}
	_, err = decodeObjectHeader(rec[:len(rec)-len(data)], o)
	return err
}
