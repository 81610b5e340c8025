package codec

import (
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
