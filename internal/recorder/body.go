package recorder

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"io"
	"slices"
	"sync"
)

func gunzip(b []byte) ([]byte, error) {
	return inflate(b, nil)
}

// inflateHead is how much of a gzipped answer is inflated first to peek at
// its metadata, which the apiserver writes in its first hundred bytes or so.
const inflateHead = 4 << 10

// inflatedSize guesses the size of gzipped b inflated, to allocate once:
// its trailer says it (modulo 4 GiB), unless it lies or b holds several
// members, so the guess is bounded by deflate's greatest ratio (1032:1);
// a little room past it lets the last read see the end without growing.
// Without a trailer: compressed Kubernetes JSON and protobuf are a fifth to
// a tenth of their size.
func inflatedSize(b []byte) int {
	if len(b) < 18 { // the smallest gzip member
		return 4 << 10
	}
	n := int(binary.LittleEndian.Uint32(b[len(b)-4:]))
	if n == 0 || n > 1032*len(b) {
		return min(max(4*len(b), 4<<10), 64<<20)
	}
	return n + 512
}

// inflate decompresses the gzipped b into a buffer from the body pool. If
// head is set, it is first called with the start of the result, and when
// it returns true inflate stops there and returns nil.
func inflate(b []byte, head func([]byte) bool) ([]byte, error) {
	zr, _ := gzipReaders.Get().(*gzip.Reader)
	var err error
	if zr == nil {
		zr, err = gzip.NewReader(bytes.NewReader(b))
	} else {
		err = zr.Reset(bytes.NewReader(b))
	}
	if err != nil {
		return nil, err
	}
	defer gzipReaders.Put(zr)
	size := inflatedSize(b)
	var out []byte
	if head != nil {
		// The start goes into a small buffer of its own: most answers
		// end here, and need no room for the whole.
		start, eof, err := readFull(zr, make([]byte, 0, min(size, inflateHead)))
		switch {
		case err != nil:
			return nil, err
		case head(start):
			return nil, nil
		case eof:
			return start, nil
		}
		out = append(getBody(size), start...)
	} else {
		out = getBody(size)
	}
	for {
		if len(out) == cap(out) {
			out = slices.Grow(out, len(out))
		}
		var eof bool
		if out, eof, err = readFull(zr, out); err != nil {
			putBody(out)
			return nil, err
		}
		if eof {
			return out, nil
		}
	}
}

// inflatePrefix inflates up to n bytes of the start of a gzipped answer of
// which b is only the start, for PeekMeta; what cannot be inflated yet is
// left out (nil if nothing can).
func inflatePrefix(b []byte, n int) []byte {
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil
	}
	out, _, _ := readFull(zr, make([]byte, 0, n))
	return out
}

// readFull reads from r into buf's spare room until it is full (eof false)
// or r ends (eof true).
func readFull(r io.Reader, buf []byte) (_ []byte, eof bool, err error) {
	for len(buf) < cap(buf) {
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, true, nil
		}
		if err != nil {
			return buf, false, err
		}
	}
	return buf, false, nil
}

var gzipReaders sync.Pool

// bodies lends buffers for recorded answers, which are copied and
// decoded off the request path and then dropped: a list of a thousand
// objects is half a megabyte, read again at every re-list. Small bodies
// (single objects) are not worth pooling.
var bodies sync.Pool

// minPooledBody and maxPooledBody bound the buffers kept for reuse; the
// upper bound keeps one huge list from staying in memory after it was
// recorded.
const (
	minPooledBody = 16 << 10
	maxPooledBody = 4 << 20
)

// getBody returns an empty buffer with room for at least n bytes.
func getBody(n int) []byte {
	if n < minPooledBody {
		return make([]byte, 0, n)
	}
	if p, _ := bodies.Get().(*[]byte); p != nil {
		if cap(*p) >= n {
			return (*p)[:0]
		}
		bodies.Put(p)
	}
	return make([]byte, 0, n)
}

// putBody gives b back once nothing refers to it any more.
func putBody(b []byte) {
	if cap(b) < minPooledBody || cap(b) > maxPooledBody {
		return
	}
	b = b[:0]
	bodies.Put(&b)
}
