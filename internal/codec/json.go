package codec

import (
	"bytes"
	"encoding/json"
)

// PeekMeta reads the resourceVersion (and for a list its continue token)
// of an answer without decoding it: kube-apiserver writes an object's or a
// list's metadata before anything else of size (JSON: after kind and
// apiVersion; protobuf: field 1 of the object in its envelope). body may be
// only the start of the answer; ok is false when the metadata is not all
// there, or the answer looks unlike what the apiserver writes.
func PeekMeta(contentType string, body []byte, list bool) (rv, cont string, ok bool) {
	switch MediaType(contentType) {
	case MediaJSON:
		return peekJSONMeta(body, list)
	case MediaProtobuf:
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
