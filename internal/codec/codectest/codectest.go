// Package codectest builds what kube-apiserver sends, for the tests of
// the packages that decode it.
package codectest

import (
	"bytes"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/streaming"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/scheme"
)

// WatchStream encodes events as kube-apiserver streams a watch in
// contentType (JSON or protobuf).
func WatchStream(t testing.TB, contentType string, events []watch.Event) []byte {
	t.Helper()
	info, ok := runtime.SerializerInfoForMediaType(scheme.Codecs.SupportedMediaTypes(), contentType)
	if !ok {
		t.Fatal("no serializer")
	}
	var buf bytes.Buffer
	enc := streaming.NewEncoder(info.StreamSerializer.Framer.NewFrameWriter(&buf), info.StreamSerializer.Serializer)
	for _, ev := range events {
		var raw bytes.Buffer
		if err := info.Serializer.Encode(ev.Object, &raw); err != nil {
			t.Fatal(err)
		}
		if err := enc.Encode(&metav1.WatchEvent{Type: string(ev.Type), Object: runtime.RawExtension{Raw: raw.Bytes()}}); err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}
