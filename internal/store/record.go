package store

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Record and key encodings; doc.go describes the layout. Every decoder here
// reads bytes straight from the file, so it bounds-checks every length and
// returns ErrCorrupt rather than panicking (see FuzzDecodeObject).

const (
	objectRecordVersion = 1
	viewRecordVersion   = 1
)

// memberKey is an object's key within a resource: "namespace/name", or
// "name" for a cluster-scoped object. Its byte order is the apiserver's own
// list order (etcd keys are "/registry/<resource>/<namespace>/<name>").
func memberKey(namespace, name string) string {
	if namespace == "" {
		return name
	}
	return namespace + "/" + name
}

// splitMemberKey is the inverse of memberKey.
func splitMemberKey(mk string) (namespace, name string) {
	if i := strings.IndexByte(mk, '/'); i >= 0 {
		return mk[:i], mk[i+1:]
	}
	return "", mk
}

// MemberKey returns the key of an object as List's after argument expects
// it: "namespace/name", or "name" when namespace is empty.
func MemberKey(namespace, name string) string { return memberKey(namespace, name) }

func checkObjectKey(resource, namespace, name string) error {
	switch {
	case resource == "":
		return fmt.Errorf("%w: empty resource", ErrInvalidKey)
	case name == "":
		return fmt.Errorf("%w: %s %q has an empty name", ErrInvalidKey, resource, namespace)
	case strings.IndexByte(name, '/') >= 0 || strings.IndexByte(namespace, '/') >= 0:
		return fmt.Errorf("%w: %s %q/%q holds a slash", ErrInvalidKey, resource, namespace, name)
	}
	return nil
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// objectKey is the key of an object in the objects bucket: the resource,
// length-prefixed, then its member key.
func objectKey(dst []byte, resource, mk string) []byte {
	dst = appendString(dst[:0], resource)
	return append(dst, mk...)
}

// resourcePrefix is the common prefix of the objects and of the views of a
// resource; the length prefix makes it unambiguous.
func resourcePrefix(resource string) []byte { return appendString(nil, resource) }

// encodeViewKey is the key of a view in the views bucket. Resource comes
// first so that the views of a resource, and of an identity within it, are
// each one key range.
func encodeViewKey(k ViewKey) []byte {
	n := len(k.Resource) + len(k.Identity) + len(k.Namespace) + len(k.Name) + len(k.LabelSelector) + len(k.FieldSelector)
	b := make([]byte, 0, n+12)
	b = appendString(b, k.Resource)
	b = appendString(b, k.Identity)
	b = appendString(b, k.Namespace)
	b = appendString(b, k.Name)
	b = appendString(b, k.LabelSelector)
	return appendString(b, k.FieldSelector)
}

// reader decodes length-prefixed fields from a record; the first failure
// sticks, so callers check err once at the end.
type reader struct {
	b   []byte
	err error
	// str, when set, holds the same bytes as b did at the start: string
	// returns slices of it rather than new strings.
	str string
}

func (r *reader) fail(what string) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: truncated or malformed %s", ErrCorrupt, what)
	}
	r.b = nil
}

func (r *reader) uvarint(what string) uint64 {
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail(what)
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) varint(what string) int64 {
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.fail(what)
		return 0
	}
	r.b = r.b[n:]
	return v
}

// bytes returns the next length-prefixed field, aliasing the record.
func (r *reader) bytes(what string) []byte {
	n := r.uvarint(what)
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.fail(what)
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

// string returns the next length-prefixed field as a string.
func (r *reader) string(what string) string {
	if r.str == "" {
		return string(r.bytes(what))
	}
	b := r.bytes(what)
	if r.err != nil {
		return ""
	}
	end := len(r.str) - len(r.b)
	return r.str[end-len(b) : end]
}

func (r *reader) byte(what string) byte {
	if len(r.b) == 0 {
		r.fail(what)
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *reader) stringMap(what string) map[string]string {
	n := r.uvarint(what)
	if r.err != nil || n == 0 {
		return nil
	}
	// Each entry takes at least two bytes: refuse counts the record cannot
	// hold before allocating for them.
	if n > uint64(len(r.b))/2 {
		r.fail(what)
		return nil
	}
	m := make(map[string]string, n)
	for range n {
		k := r.string(what)
		v := r.string(what)
		if r.err != nil {
			return nil
		}
		m[k] = v
	}
	return m
}

// skipStringMap skips a map and returns its pairs, aliasing the record.
func (r *reader) skipStringMap(what string) encodedMap {
	n := r.uvarint(what)
	start := r.b
	for i := uint64(0); i < n && r.err == nil; i++ {
		r.bytes(what)
		r.bytes(what)
	}
	if r.err != nil {
		return nil
	}
	return encodedMap(start[:len(start)-len(r.b)])
}

func decodeViewKey(b []byte) (ViewKey, error) {
	r := reader{b: b}
	k := ViewKey{
		Resource:      string(r.bytes("view key")),
		Identity:      string(r.bytes("view key")),
		Namespace:     string(r.bytes("view key")),
		Name:          string(r.bytes("view key")),
		LabelSelector: string(r.bytes("view key")),
		FieldSelector: string(r.bytes("view key")),
	}
	if r.err == nil && len(r.b) != 0 {
		r.fail("view key")
	}
	return k, r.err
}

// appendObject encodes an object record:
//
//	version byte | uvarint refs | RV | labels | fields | data
//
// where RV is length-prefixed and labels and fields are a uvarint count of
// length-prefixed key/value pairs, sorted by key so that equal objects
// encode to equal bytes. data runs to the end of the record. keys is
// scratch space.
func appendObject(dst []byte, refs uint64, o *Object, keys []string) ([]byte, []string) {
	dst = append(dst, objectRecordVersion)
	dst = binary.AppendUvarint(dst, refs)
	dst = appendString(dst, o.ResourceVersion)
	dst, keys = appendStringMap(dst, o.Labels, keys)
	dst, keys = appendStringMap(dst, o.Fields, keys)
	return append(dst, o.Data...), keys
}

func appendStringMap(dst []byte, m map[string]string, keys []string) ([]byte, []string) {
	dst = binary.AppendUvarint(dst, uint64(len(m)))
	keys = keys[:0]
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		dst = appendString(dst, k)
		dst = appendString(dst, m[k])
	}
	return dst, keys
}

// objectHeader decodes the reference count and resourceVersion of an object
// record without touching the rest. rv aliases rec.
func objectHeader(rec []byte) (refs uint64, rv []byte, err error) {
	r := reader{b: rec}
	if v := r.byte("object record"); r.err == nil && v != objectRecordVersion {
		return 0, nil, fmt.Errorf("%w: object record version %d", ErrCorrupt, v)
	}
	refs = r.uvarint("object record")
	rv = r.bytes("object record")
	return refs, rv, r.err
}

// withRefs returns a copy of the object record rec with its reference count
// set to refs.
func withRefs(rec []byte, refs uint64) ([]byte, error) {
	if len(rec) == 0 || rec[0] != objectRecordVersion {
		return nil, fmt.Errorf("%w: object record version", ErrCorrupt)
	}
	_, n := binary.Uvarint(rec[1:])
	if n <= 0 {
		return nil, fmt.Errorf("%w: truncated object record", ErrCorrupt)
	}
	rest := rec[1+n:]
	out := make([]byte, 0, 1+binary.MaxVarintLen64+len(rest))
	out = append(out, objectRecordVersion)
	out = binary.AppendUvarint(out, refs)
	return append(out, rest...), nil
}

// sameContent reports whether object records a and b hold the same object,
// whatever their reference counts.
func sameContent(a, b []byte) bool {
	if len(a) == 0 || len(b) == 0 || a[0] != b[0] {
		return false
	}
	_, n := binary.Uvarint(a[1:])
	_, m := binary.Uvarint(b[1:])
	return n > 0 && m > 0 && bytes.Equal(a[1+n:], b[1+m:])
}

// decodeObject decodes an object record into o, copying everything out of
// rec (which may be bbolt's memory map). Namespace and Name come from the
// key, not the record. It allocates little, as List calls it for every
// object it serves: the strings are all slices of one string holding the
// record's header.
func decodeObject(rec []byte, o *Object) (refs uint64, err error) {
	data, err := objectData(rec)
	if err != nil {
		return 0, err
	}
	o.Data = slices.Clone(data)
	if o.Data == nil {
		o.Data = []byte{}
	}
	return decodeObjectHeader(rec[:len(rec)-len(data)], o)
}

// decodeObjectHeader decodes the header of an object record, everything
// but the data, into o.
func decodeObjectHeader(header []byte, o *Object) (refs uint64, err error) {
	h := reader{b: header, str: string(header)}
	h.byte("object record")
	refs = h.uvarint("object record")
	o.ResourceVersion = h.string("object record")
	o.Labels = h.stringMap("object labels")
	o.Fields = h.stringMap("object fields")
	return refs, h.err
}

// objectMaps returns the labels and fields of an object record, aliasing
// rec.
func objectMaps(rec []byte) (ls, fs encodedMap, err error) {
	r := reader{b: rec}
	if v := r.byte("object record"); r.err == nil && v != objectRecordVersion {
		return nil, nil, fmt.Errorf("%w: object record version %d", ErrCorrupt, v)
	}
	r.uvarint("object record")
	r.bytes("object record")
	ls = r.skipStringMap("object labels")
	fs = r.skipStringMap("object fields")
	return ls, fs, r.err
}

// objectData returns the data of an object record, aliasing rec.
func objectData(rec []byte) ([]byte, error) {
	r := reader{b: rec}
	if v := r.byte("object record"); r.err == nil && v != objectRecordVersion {
		return nil, fmt.Errorf("%w: object record version %d", ErrCorrupt, v)
	}
	r.uvarint("object record")
	r.bytes("object record")
	r.skipStringMap("object labels")
	r.skipStringMap("object fields")
	return r.b, r.err
}

// viewRecord is the value of a view in the views bucket.
type viewRecord struct {
	id                   uint64 // prefix of the view's member keys
	rv, kind, apiVersion string
	updated              time.Time
	stale                bool
}

const viewStale = 1 << 0

// appendView encodes a view record:
//
//	version byte | uvarint id | RV | Kind | APIVersion | varint updated (Unix ns, 0 = zero time) | flags byte
func appendView(dst []byte, v *viewRecord) []byte {
	dst = append(dst, viewRecordVersion)
	dst = binary.AppendUvarint(dst, v.id)
	dst = appendString(dst, v.rv)
	dst = appendString(dst, v.kind)
	dst = appendString(dst, v.apiVersion)
	var ns int64
	if !v.updated.IsZero() {
		ns = v.updated.UnixNano()
	}
	dst = binary.AppendVarint(dst, ns)
	var flags byte
	if v.stale {
		flags |= viewStale
	}
	return append(dst, flags)
}

func decodeView(b []byte) (viewRecord, error) {
	r := reader{b: b}
	var v viewRecord
	if ver := r.byte("view record"); r.err == nil && ver != viewRecordVersion {
		return v, fmt.Errorf("%w: view record version %d", ErrCorrupt, ver)
	}
	v.id = r.uvarint("view record")
	v.rv = string(r.bytes("view record"))
	v.kind = string(r.bytes("view record"))
	v.apiVersion = string(r.bytes("view record"))
	if ns := r.varint("view record"); ns != 0 {
		v.updated = time.Unix(0, ns)
	}
	v.stale = r.byte("view record")&viewStale != 0
	return v, r.err
}

// NewerRV is newerRV for strings.
func NewerRV(a, b string) bool { return newerRV([]byte(a), []byte(b)) }

// newerRV reports whether resourceVersion a is newer than b. The apiserver
// documents resourceVersions as opaque, but every storage it ships with
// (etcd) uses unsigned integers, and comparing them is what lets an old
// event never overwrite a newer object. When either does not parse, a is
// not newer: the incoming object wins.
func newerRV(a, b []byte) bool {
	x, err := strconv.ParseUint(string(a), 10, 64)
	if err != nil {
		return false
	}
	y, err := strconv.ParseUint(string(b), 10, 64)
	if err != nil {
		return false
	}
	return x > y
}
