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
	return tx.walk(k, after, limit, func(mk string) error {
		rec, err := tx.record(k, mk)
		if err != nil {
			return err
		}
		var o Object
		o.Namespace, o.Name = splitMemberKey(mk)
		if err := tx.decodeObject(rec, &o, sealed); err != nil {
			return fmt.Errorf("listing view %s: reading %s: %w", k, mk, err)
		}
		o.Proto = bytes.Clone(tx.proto(tx.okey, o.ResourceVersion))
		return fn(o)
	})
}

// ListData is List for callers that need only each member's key
// ("namespace/name") and its JSON, or with protoFirst its protobuf
// encoding when one is stored: fn then gets either data or proto, never
// both, and the object's record is not even read. It skips decoding labels
// and fields, which makes serving a large unfiltered view several times
// cheaper, and a protobuf answer touches only the pages holding protobuf.
// data is valid only during fn, proto until the transaction ends.
func (tx *Tx) ListData(k ViewKey, after string, limit int, protoFirst bool, fn func(key string, data, proto []byte) error) error {
	sealed := tx.seal.resource(k.Resource)
	return tx.walk(k, after, limit, func(mk string) error {
		if protoFirst && !sealed && tx.protos != nil {
			// Writes keep a protobuf encoding at its object's
			// resourceVersion, or delete it (keepProto).
			if rec := tx.protos.Get(tx.okey); rec != nil {
				r := reader{b: rec}
				r.bytes("protobuf record")
				if r.err != nil {
					return fmt.Errorf("listing view %s: reading %s: %w", k, mk, r.err)
				}
				return fn(mk, nil, r.b)
			}
		}
		rec, err := tx.record(k, mk)
		if err != nil {
			return err
		}
		data, err := objectData(rec)
		if err == nil && sealed {
			data, err = tx.openData(tx.plain[:0], data, tx.adFor(adObject, tx.okey))
			if data != nil {
				tx.plain = data
			}
		}
		if err != nil {
			return fmt.Errorf("listing view %s: reading %s: %w", k, mk, err)
		}
		return fn(mk, data, nil)
	})
}

// walk calls fn with the member key of each member of view k after after,
// at most limit of them (0 = all), with the object's key in tx.okey.
func (tx *Tx) walk(k ViewKey, after string, limit int, fn func(mk string) error) error {
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
		if err := fn(string(mk)); err != nil {
			return err
		}
		if n++; limit > 0 && n >= limit {
			break
		}
	}
	return nil
}

// record returns the object record under tx.okey, of member mk of view k.
func (tx *Tx) record(k ViewKey, mk string) ([]byte, error) {
	rec := tx.objects.Get(tx.okey)
	if rec == nil {
		return nil, fmt.Errorf("listing view %s: %w: member %s is not stored", k, ErrCorrupt, mk)
	}
	return rec, nil
}

// HasObjects reports whether any object of resource is stored.
func (tx *Tx) HasObjects(resource string) bool {
	prefix := resourcePrefix(resource)
	k, _ := tx.objects.Cursor().Seek(prefix)
	return k != nil && bytes.HasPrefix(k, prefix)
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
	o.Proto = bytes.Clone(tx.proto(tx.okey, o.ResourceVersion))
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
