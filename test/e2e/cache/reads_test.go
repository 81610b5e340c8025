package cache_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"sort"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
)

// A read is one of the reads a test makes online and again offline: do
// returns a canonical text of what it got, so that the two compare as
// strings.
type read struct {
	name string
	do   func(ctx context.Context) (string, error)
}

// readOnline makes every read while the apiserver is up and returns the
// answers by name; a read that fails or answers nothing fails t, since
// comparing against it later would prove nothing.
func readOnline(ctx context.Context, t *testing.T, reads []read) map[string]string {
	t.Helper()
	online := map[string]string{}
	for _, r := range reads {
		out, err := r.do(ctx)
		if err != nil {
			t.Fatalf("online %s: %v\n%s", r.name, err, out)
		}
		if strings.TrimSpace(out) == "" {
			t.Fatalf("online %s: empty answer", r.name)
		}
		online[r.name] = out
	}
	return online
}

// checkReads makes every read again in phase (offline, after a restart...)
// and reports each that fails or answers other than it did online.
func checkReads(ctx context.Context, t *testing.T, phase string, reads []read, online map[string]string) {
	t.Helper()
	for _, r := range reads {
		out, err := r.do(ctx)
		if err != nil {
			t.Errorf("%s %s: %v\n%s", phase, r.name, err, out)
			continue
		}
		if out != online[r.name] {
			t.Errorf("%s %s differs:\nonline:  %q\noffline: %q", phase, r.name, online[r.name], out)
		}
	}
}

// names is the sorted, space-separated name of each item.
func names[T any](items []T, name func(T) string) string {
	var out []string
	for _, it := range items {
		out = append(out, name(it))
	}
	sort.Strings(out)
	return strings.Join(out, " ")
}

// rawProtobuf reads path as protobuf through c and describes
// the body by its length and digest.
func rawProtobuf(c rest.Interface, path string) func(ctx context.Context) (string, error) {
	return func(ctx context.Context) (string, error) {
		b, err := c.Get().AbsPath(path).SetHeader("Accept", runtime.ContentTypeProtobuf).DoRaw(ctx)
		if err == nil && !bytes.HasPrefix(b, []byte("k8s\x00")) {
			err = fmt.Errorf("not protobuf: %q", b[:min(len(b), 64)])
		}
		return fmt.Sprintf("%d bytes, sha256 %x", len(b), sha256.Sum256(b)), err
	}
}
