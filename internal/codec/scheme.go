package codec

import (
	"fmt"
	"reflect"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	cborserializer "k8s.io/apimachinery/pkg/runtime/serializer/cbor"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
)

var cborSerializer = cborserializer.NewSerializer(unstructuredCreater{}, unstructuredTyper{})

// cacheScheme and codecs decode and encode the built-in types and the
// meta.k8s.io types (Table, PartialObjectMetadata) that client-go's scheme
// leaves out. They are built when first used, not at start: registering
// every built-in type costs memory that an idle outpost, or one whose
// clients all speak JSON, need not spend.
var (
	cacheScheme lazyScheme
	codecs      lazyCodecs
)

var (
	loadScheme = sync.OnceValue(func() *runtime.Scheme {
		s := runtime.NewScheme()
		utilruntime.Must(builtinTypes.AddToScheme(s))
		metav1.AddMetaToScheme(s)
		return s
	})
	loadCodecs = sync.OnceValue(func() serializer.CodecFactory { return serializer.NewCodecFactory(loadScheme()) })
)

// lazyScheme is the part of *runtime.Scheme the cache uses (it is a
// runtime.ObjectCreater and runtime.ObjectTyper), built at first use.
type lazyScheme struct{}

func (lazyScheme) New(gvk schema.GroupVersionKind) (runtime.Object, error) {
	return loadScheme().New(gvk)
}

func (lazyScheme) ObjectKinds(obj runtime.Object) ([]schema.GroupVersionKind, bool, error) {
	return loadScheme().ObjectKinds(obj)
}

func (lazyScheme) Recognizes(gvk schema.GroupVersionKind) bool { return loadScheme().Recognizes(gvk) }

func (lazyScheme) AllKnownTypes() map[schema.GroupVersionKind]reflect.Type {
	return loadScheme().AllKnownTypes()
}

// lazyCodecs is the part of serializer.CodecFactory the cache uses, built
// at first use.
type lazyCodecs struct{}

func (lazyCodecs) UniversalDeserializer() runtime.Decoder {
	return loadCodecs().UniversalDeserializer()
}

func (lazyCodecs) SupportedMediaTypes() []runtime.SerializerInfo {
	return loadCodecs().SupportedMediaTypes()
}

// decodeTyped decodes protobuf (built-in types, via client-go's scheme) or
// CBOR (into unstructured).
func decodeTyped(contentType string, body []byte) (obj runtime.Object, err error) {
	defer func() {
		// The decoders are generated code fed untrusted bytes.
		if r := recover(); r != nil {
			obj, err = nil, fmt.Errorf("%w: decoder panic: %v", ErrUndecodable, r)
		}
	}()
	if MediaType(contentType) == MediaCBOR {
		u := &unstructured.Unstructured{}
		obj, _, err = cborSerializer.Decode(body, nil, u)
		if err != nil {
			return nil, fmt.Errorf("%w: cbor: %v", ErrUndecodable, err)
		}
		if u.IsList() {
			return u.ToList()
		}
		return obj, nil
	}
	obj, _, err = codecs.UniversalDeserializer().Decode(body, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: protobuf: %v", ErrUndecodable, err)
	}
	return obj, nil
}

type unstructuredCreater struct{}

func (unstructuredCreater) New(gvk schema.GroupVersionKind) (runtime.Object, error) {
	u := &unstructured.Unstructured{}
	u.SetGroupVersionKind(gvk)
	return u, nil
}

type unstructuredTyper struct{}

func (unstructuredTyper) ObjectKinds(obj runtime.Object) ([]schema.GroupVersionKind, bool, error) {
	return []schema.GroupVersionKind{obj.GetObjectKind().GroupVersionKind()}, false, nil
}

func (unstructuredTyper) Recognizes(schema.GroupVersionKind) bool { return true }
