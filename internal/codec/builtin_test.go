package codec

import (
	"testing"

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
