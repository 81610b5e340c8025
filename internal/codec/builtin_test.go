package codec

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/scheme"
)

// TestBuiltinTypesMatchClientGo keeps builtinTypes in step with client-go:
// after a client-go upgrade that adds an API group version, this fails
// until the group is listed, instead of the cache failing to decode it.
func TestBuiltinTypesMatchClientGo(t *testing.T) {
	ours := runtime.NewScheme()
	if err := builtinTypes.AddToScheme(ours); err != nil {
		t.Fatal(err)
	}
	for gvk := range scheme.Scheme.AllKnownTypes() {
		if gvk.Version == runtime.APIVersionInternal {
			continue
		}
		if !ours.Recognizes(gvk) {
			t.Errorf("%v is known to client-go but not listed in builtinTypes", gvk)
		}
	}
}

func TestProtobufAgrees(t *testing.T) {
	pod := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns", UID: "u1", ResourceVersion: "7"}}
	msg, err := pod.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	data, _ := json.Marshal(&pod)
	if err := ProtobufAgrees(data, msg); err != nil {
		t.Errorf("the same pod: %v", err)
	}
	other := pod
	other.ResourceVersion = "8"
	data, _ = json.Marshal(&other)
	if err := ProtobufAgrees(data, msg); err == nil || !strings.Contains(err.Error(), "resourceVersion 7, JSON at 8") {
		t.Errorf("another version: %v", err)
	}
	if err := ProtobufAgrees(data, []byte("\xff\xff")); err == nil {
		t.Error("garbage protobuf agreed")
	}
}

// A list written in pieces, from its frame, is the list written whole.
func TestListFrames(t *testing.T) {
	items := [][]byte{[]byte(`{"metadata":{"name":"a"}}`), []byte(`{"metadata":{"name":"b"}}`)}
	prefix, suffix := JSONListFrame("ConfigMapList", "v1", "7", "")
	streamed := append(append(append(append(append([]byte{}, prefix...), items[0]...), ','), items[1]...), suffix...)
	if whole := JSONList("ConfigMapList", "v1", "7", "", items); !bytes.Equal(streamed, whole) {
		t.Errorf("JSON:\n%s\n%s", streamed, whole)
	}
	var protos [][]byte
	size := 0
	for _, name := range []string{"a", "b"} {
		cm := corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns", ResourceVersion: "7"}}
		p, _ := cm.Marshal()
		protos = append(protos, p)
		size += ProtobufListItemSize(len(p))
	}
	whole, ok := ProtobufList("ConfigMapList", "v1", "7", "", make([][]byte, 2), protos)
	prefix, suffix, ok2 := ProtobufListFrame("ConfigMapList", "v1", "7", "", size)
	if !ok || !ok2 {
		t.Fatal("no protobuf list")
	}
	streamed = append([]byte{}, prefix...)
	for _, p := range protos {
		streamed = AppendProtobufListItem(streamed, p)
	}
	streamed = append(streamed, suffix...)
	if !bytes.Equal(streamed, whole) {
		t.Errorf("protobuf:\n%x\n%x", streamed, whole)
	}
}
