package codec

import (
	"bytes"
	"encoding/binary"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// Kubernetes protobuf without decoding: reading fields where they lie in
// an answer (its metadata, a list's items), and writing the envelope
// around messages outpost stored as the apiserver sent them.

// protobufMagic starts kube-apiserver's protobuf encoding, an envelope
// (runtime.Unknown) around the object.
var protobufMagic = []byte("k8s\x00")

// protobufMessage returns a copy of the message inside the protobuf
// envelope body, or nil when body is not one or its message is encoded
// further (a content encoding).
func protobufMessage(body []byte) []byte {
	env, found := bytes.CutPrefix(body, protobufMagic)
	if !found {
		return nil
	}
	var raw []byte
	encoded := false
	if !protoFields(env, func(num uint64, v []byte) bool {
		switch num {
		case 2:
			raw = v
		case 3:
			encoded = len(v) > 0
		}
		return true
	}) || raw == nil || encoded {
		return nil
	}
	return bytes.Clone(raw)
}

func peekProtobufMeta(body []byte, list bool) (rv, cont string, ok bool) {
	env, found := bytes.CutPrefix(body, protobufMagic)
	if !found {
		return "", "", false
	}
	raw, found, _, ok := protoField(env, 2) // runtime.Unknown.raw, maybe cut short
	if !ok || !found {
		return "", "", false
	}
	md, found, short, ok := protoField(raw, 1) // ObjectMeta or ListMeta
	if !ok || !found || short {
		return "", "", false
	}
	num := uint64(6) // ObjectMeta.resourceVersion
	if list {
		num = 2 // ListMeta.resourceVersion
	}
	v, found, short, ok := protoField(md, num)
	if !ok || !found || short || len(v) == 0 {
		return "", "", false
	}
	if list {
		c, found, short, ok := protoField(md, 3) // ListMeta.continue
		if !ok || (found && short) {
			return "", "", false
		}
		cont = string(c)
	}
	return string(v), cont, true
}

// protoField finds the first length-delimited field num of the protobuf
// message b. When b ends inside that field, v is what b holds of it and
// short is set. ok is false when b is malformed before the field (or, when
// the field is not found, anywhere).
func protoField(b []byte, num uint64) (v []byte, found, short, ok bool) {
	ok = protoScan(b, func(n uint64, value []byte, cut bool) bool {
		if n != num {
			return true
		}
		v, found, short = value, true, cut
		return false
	})
	return v, found, short, ok || found
}

// protoFields calls fn with each length-delimited field of the protobuf
// message b, in order, until fn returns false. It reports whether b is
// well formed and whole up to where it stopped.
func protoFields(b []byte, fn func(num uint64, v []byte) bool) bool {
	stopped := false
	ok := protoScan(b, func(num uint64, v []byte, cut bool) bool {
		if cut {
			return false
		}
		stopped = !fn(num, v)
		return !stopped
	})
	return ok || stopped
}

// protoScan walks the fields of the protobuf message b, calling fn with
// each length-delimited one: cut says b ends inside it (v then holds what
// there is, and the walk ends). It returns whether it walked all of b
// without finding it malformed or being stopped by fn.
func protoScan(b []byte, fn func(num uint64, v []byte, cut bool) bool) bool {
	for len(b) > 0 {
		tag, n := binary.Uvarint(b)
		if n <= 0 {
			return false
		}
		b = b[n:]
		var skip uint64
		switch tag & 7 {
		case 0: // varint
			if _, n = binary.Uvarint(b); n <= 0 {
				return false
			}
			skip = uint64(n)
		case 1: // fixed64
			skip = 8
		case 5: // fixed32
			skip = 4
		case 2: // length-delimited
			l, n := binary.Uvarint(b)
			if n <= 0 {
				return false
			}
			b = b[n:]
			if l > uint64(len(b)) {
				fn(tag>>3, b, true)
				return false
			}
			if !fn(tag>>3, b[:l], false) {
				return false
			}
			skip = l
		default:
			return false
		}
		if skip > uint64(len(b)) {
			return false
		}
		b = b[skip:]
	}
	return true
}

// ProtobufEnvelope returns kube-apiserver's protobuf encoding of a message
// of kind and apiVersion whose encoding is rawLen bytes long and which
// appendRaw appends: the magic, then runtime.Unknown with its TypeMeta,
// the message as raw, and empty content encoding and type, in the order
// and form the apiserver's serializer writes them.
func ProtobufEnvelope(kind, apiVersion string, rawLen int, appendRaw func([]byte) []byte) []byte {
	head := protobufEnvelopeHead(kind, apiVersion, rawLen, rawLen+len(protobufEnvelopeTail))
	return append(appendRaw(head), protobufEnvelopeTail...)
}

// protobufEnvelopeHead is the envelope up to its raw message of rawLen
// bytes, in a buffer with room for more bytes after it.
func protobufEnvelopeHead(kind, apiVersion string, rawLen, more int) []byte {
	tm := runtime.TypeMeta{APIVersion: apiVersion, Kind: kind}
	tmLen := tm.Size()
	b := make([]byte, 0, len(protobufMagic)+fieldSize(tmLen)+1+uvarintSize(uint64(rawLen))+more)
	b = append(b, protobufMagic...)
	b = appendFieldHeader(b, 1, tmLen)
	b = b[:len(b)+tmLen]
	if _, err := tm.MarshalToSizedBuffer(b[len(b)-tmLen:]); err != nil {
		return nil // cannot happen: the buffer has the size Size said
	}
	return appendFieldHeader(b, 2, rawLen)
}

// protobufEnvelopeTail follows the raw message: empty content encoding
// (field 3) and content type (field 4).
var protobufEnvelopeTail = []byte{3<<3 | 2, 0, 4<<3 | 2, 0}

// appendProtobufList appends the protobuf message of a list: its
// ListMeta (field 1) with rv and cont, then each item (field 2), as every
// built-in list lays them out (protobufListItemType checks it). Its
// length is protobufListSize.
func appendProtobufList(b []byte, lm *metav1.ListMeta, items [][]byte) []byte {
	n := lm.Size()
	b = appendFieldHeader(b, 1, n)
	b = b[:len(b)+n]
	if _, err := lm.MarshalToSizedBuffer(b[len(b)-n:]); err != nil {
		return nil
	}
	for _, item := range items {
		b = appendFieldHeader(b, 2, len(item))
		b = append(b, item...)
	}
	return b
}

func protobufListSize(lm *metav1.ListMeta, items [][]byte) int {
	n := fieldSize(lm.Size())
	for _, item := range items {
		n += fieldSize(len(item))
	}
	return n
}

// fieldSize is the encoded size of a length-delimited field of n bytes
// with a one-byte tag (field numbers below 16).
func fieldSize(n int) int { return 1 + uvarintSize(uint64(n)) + n }

func uvarintSize(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

// appendFieldHeader appends the tag of length-delimited field num (below
// 16) and the length n.
func appendFieldHeader(b []byte, num byte, n int) []byte {
	b = append(b, num<<3|2)
	return binary.AppendUvarint(b, uint64(n))
}
