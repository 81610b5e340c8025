package reader

import (
	"net/http"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

func (rd *Reader) serveGet(w http.ResponseWriter, info *request.Info) error {
	want, a := info.View, info.Accept
	base := strings.TrimSuffix(want.Resource, "#meta")
	// The object's own GET view, else a view that holds it.
	var kind, apiVersion string
	found := false
	if v, ok, err := rd.Store.View(store.ViewKey{Identity: want.Identity, Resource: base, Namespace: want.Namespace, Name: want.Name}); err != nil {
		return asStatus(err)
	} else if ok {
		kind, apiVersion, found = v.Kind, v.APIVersion, true
	}
	o, exists, err := rd.Store.Get(base, want.Namespace, want.Name)
	if err != nil {
		return asStatus(err)
	}
	if lo, lkind, lapiVersion, ok := rd.Local.Get(base, want.Namespace, want.Name); ok {
		// A local write of this node's own object (offline status).
		o, exists = lo, true
		if !found && info.Identity.Kind == request.NodeCert {
			kind, apiVersion, found = lkind+"List", lapiVersion, true
		}
	}
	if !found {
		views, err := rd.Store.Views(want.Identity, base)
		if err != nil {
			return asStatus(err)
		}
		for _, v := range views {
			k := v.Key
			if k.Name != "" || (k.Namespace != "" && k.Namespace != want.Namespace) {
				continue
			}
			ls, _ := labels.Parse(k.LabelSelector)
			fs, _ := fields.ParseSelector(k.FieldSelector)
			if exists && (ls == nil || !ls.Matches(labels.Set(o.Labels)) || fs == nil || !fs.Matches(fields.Set(o.Fields))) {
				continue
			}
			if !exists && (k.LabelSelector != "" || k.FieldSelector != "") {
				continue // a selective list says nothing of objects outside it
			}
			kind, apiVersion, found = v.Kind, v.APIVersion, true
			break
		}
	}
	if !found {
		return neverAnswered(describe(info))
	}
	if !exists {
		gr := schema.GroupResource{Group: info.APIGroup, Resource: info.Resource}
		return apierrors.NewNotFound(gr, want.Name)
	}
	kind = strings.TrimSuffix(kind, "List")
	if kind == "" {
		kind, apiVersion = codec.GuessListKind(info.APIGroup, info.APIVersion, info.Resource)
		kind = strings.TrimSuffix(kind, "List")
	}
	if a.Media == codec.MediaProtobuf && a.As == "" && o.Proto != nil {
		// As the apiserver sent it to a protobuf client (an overlay has
		// none: it was written locally, in JSON).
		rd.writeAnswer(w, codec.MediaProtobuf, codec.ProtobufEnvelope(kind, apiVersion, len(o.Proto), func(b []byte) []byte { return append(b, o.Proto...) }), source{})
		return nil
	}
	data := o.Data
	if strings.HasPrefix(a.As, "PartialObjectMetadata") {
		data = codec.MetadataOnly(data)
		kind, apiVersion = "PartialObjectMetadata", "meta.k8s.io/v1"
	} else if codec.IsProtobufOnly(data) {
		if a.As == "Table" {
			// A Table needs only the metadata, which is all outpost
			// knows of an object recorded only from protobuf.
			return rd.writeTable(w, codec.JSONList(kind+"List", apiVersion, o.ResourceVersion, "", [][]byte{data}), source{})
		}
		return codec.ProtobufOnlyError(describe(info))
	}
	body := codec.WithTypeMeta(data, kind, apiVersion)
	return rd.encode(w, body, a, source{})
}
