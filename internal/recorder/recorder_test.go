package recorder

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"testing"
)

func TestInflate(t *testing.T) {
	gz := func(b []byte) []byte {
		var out bytes.Buffer
		zw := gzip.NewWriter(&out)
		_, _ = zw.Write(b)
		_ = zw.Close()
		return out.Bytes()
	}
	for _, size := range []int{0, 100, inflateHead - 1, inflateHead, 5 * inflateHead} {
		plain := bytes.Repeat([]byte("0123456789abcdef"), size/16+1)[:size]
		for _, stop := range []bool{false, true} {
			var heads []int
			got, err := inflate(gz(plain), func(head []byte) bool {
				if !bytes.HasPrefix(plain, head) {
					t.Fatalf("size %d: head is not the start of the body", size)
				}
				heads = append(heads, len(head))
				return stop
			})
			if err != nil || len(heads) != 1 || heads[0] < min(size, inflateHead) {
				t.Fatalf("size %d: %v, heads %v", size, err, heads)
			}
			if stop && got != nil || !stop && !bytes.Equal(got, plain) {
				t.Fatalf("size %d stop %v: got %d bytes", size, stop, len(got))
			}
		}
		if size > 0 {
			cut := gz(plain)
			if _, err := inflate(cut[:len(cut)-5], nil); err == nil {
				t.Errorf("size %d: a cut-off gzip stream inflated without an error", size)
			}
		}
		// The buffer is sized from the trailer once, and a trailer that
		// lies changes nothing but the guess.
		z := gz(plain)
		if got, err := inflate(z, nil); err != nil || !bytes.Equal(got, plain) || cap(got) != inflatedSize(z) && size > 4<<10 {
			t.Errorf("size %d: %d bytes (cap %d, guessed %d), %v", size, len(got), cap(got), inflatedSize(z), err)
		}
		for _, lie := range []uint32{1, 1 << 31} {
			binary.LittleEndian.PutUint32(z[len(z)-4:], lie)
			// gzip checks the size at the end: the body is refused.
			if got, err := inflate(z, nil); err == nil || inflatedSize(z) > 1032*len(z)+512 {
				t.Errorf("size %d, trailer saying %d: inflated %d bytes, %v, guessed %d", size, lie, len(got), err, inflatedSize(z))
			}
		}
	}
}

// FuzzInflate: inflating whatever an apiserver's gzipped answer holds
// returns an error or a body, never panics.
func FuzzInflate(f *testing.F) {
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write([]byte(`{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[]}`))
	_ = zw.Close()
	f.Add(gz.Bytes())
	f.Add([]byte{0x1f, 0x8b, 8, 0})
	f.Fuzz(func(t *testing.T, body []byte) {
		_, _ = gunzip(body)
		_, _ = inflate(body, func([]byte) bool { return false })
	})
}
