package reader

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/memory"
	"github.com/outposthq/outpost/internal/recorder"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/status"
	"github.com/outposthq/outpost/internal/store"
)

// Answers reports whether the cache may answer r at all (a read of a kind
// it records). The proxy asks before falling back to Serve.
func (rd *Reader) Answers(_ *http.Request, info *request.Info) bool {
	return info.Class != request.NotCached
}

// Serve answers r from the store with what this identity read online. It
// always writes a response: the answer, or a Status saying why not.
func (rd *Reader) Serve(w http.ResponseWriter, r *http.Request, info *request.Info) {
	var err error
	switch info.Class {
	case request.Document:
		err = rd.serveDoc(w, recorder.DocKey(info), info.Path)
	case request.Table:
		if ok, derr := rd.serveRecordedTable(w, recorder.TableKey(info)); ok || derr != nil {
			err = derr
			break
		}
		if info.Verb == "get" {
			err = rd.serveGet(w, info)
		} else {
			err = rd.serveList(w, info)
		}
	case request.GetObject:
		err = rd.serveGet(w, info)
	case request.ListObjects:
		err = rd.serveList(w, info)
	case request.WatchObjects:
		err = rd.serveWatch(w, r, info)
	default:
		err = status.Unavailable(fmt.Sprintf("outpost: the cloud is unreachable and %s %s cannot be answered from the cache", info.Verb, info.Path), 5)
	}
	if err != nil {
		status.WriteError(w, err)
	}
}

func neverAnswered(what string) error {
	// No Retry-After: client-go would retry the same unanswerable request
	// ten times; the caller's own backoff is the right one.
	return status.Unavailable("outpost: the cloud is unreachable, and "+what+" was never answered online for this caller, so it cannot be answered from the cache", 0)
}

func (rd *Reader) serveDoc(w http.ResponseWriter, key, path string) error {
	ct, body, ok, err := rd.Store.Doc(key)
	if err != nil {
		return apierrors.NewInternalError(fmt.Errorf("reading cache: %w", err))
	}
	if !ok {
		return neverAnswered("GET " + path)
	}
	writeBody(w, ct, body)
	return nil
}

func (rd *Reader) serveRecordedTable(w http.ResponseWriter, key string) (bool, error) {
	ct, body, ok, err := rd.Store.Doc(key)
	if err != nil {
		return false, apierrors.NewInternalError(fmt.Errorf("reading cache: %w", err))
	}
	if ok {
		writeBody(w, ct, body)
	}
	return ok, nil
}

func writeBody(w http.ResponseWriter, contentType string, body []byte) {
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set(ServedByHeader, "cache")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}

// source is the view an answer is read from, and what must still be
// filtered out of it locally.
type source struct {
	view      store.View
	namespace string // "" or the namespace to keep
	labels    labels.Selector
	fields    fields.Selector
	filter    bool
	meta      bool // the view holds metadata-only copies
}

func (s source) keep(o store.Object) bool {
	if !s.filter {
		return true
	}
	if s.namespace != "" && o.Namespace != s.namespace {
		return false
	}
	return s.labels.Matches(labels.Set(o.Labels)) && s.fields.Matches(fields.Set(o.Fields))
}

// findSource picks the view that answers want: the same view, or a broader
// one of the same identity (same resource, wider namespace, looser
// selectors), whose members are then filtered locally. Metadata-only
// requests may read full views; full requests never read metadata-only ones.
func (rd *Reader) findSource(info *request.Info) (source, bool, error) {
	want := info.View
	resources := []string{want.Resource}
	if base, ok := strings.CutSuffix(want.Resource, "#meta"); ok {
		resources = append(resources, base)
	}
	for _, res := range resources {
		key := want
		key.Resource = res
		key.Name = ""
		if v, ok, err := rd.Store.View(key); err != nil {
			return source{}, false, err
		} else if ok {
			return source{view: v, meta: strings.HasSuffix(res, "#meta")}, true, nil
		}
		views, err := rd.Store.Views(want.Identity, res)
		if err != nil {
			return source{}, false, err
		}
		for _, v := range views {
			k := v.Key
			if k.Name != "" || (k.Namespace != "" && k.Namespace != want.Namespace) {
				continue
			}
			if (k.LabelSelector != "" && k.LabelSelector != want.LabelSelector) || (k.FieldSelector != "" && k.FieldSelector != want.FieldSelector) {
				continue
			}
			ns := ""
			if k.Namespace == "" {
				ns = want.Namespace
			}
			return source{view: v, namespace: ns, labels: info.Labels, fields: info.Fields, filter: true, meta: strings.HasSuffix(res, "#meta")}, true, nil
		}
	}
	return source{}, false, nil
}

// continueToken is outpost's own continue token: the view's
// resourceVersion and the last key served.
type continueToken struct {
	RV    string `json:"rv"`
	After string `json:"after"`
}

func (rd *Reader) serveList(w http.ResponseWriter, info *request.Info) error {
	a, opts := info.Accept, info.Options
	src, ok, err := rd.findSource(info)
	if err != nil {
		return asStatus(err)
	}
	if !ok {
		return neverAnswered(describe(info))
	}
	if err := checkListRV(opts.ResourceVersion, opts.ResourceVersionMatch, src.view.ResourceVersion); err != nil {
		return err
	}
	if opts.Invalid == "limit" {
		return status.BadRequest("invalid limit " + strconv.Quote(opts.InvalidValue))
	}
	limit := opts.Limit
	after := ""
	if s := opts.Continue; s != "" {
		var tok continueToken
		raw, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil || json.Unmarshal(raw, &tok) != nil {
			return status.BadRequest("invalid continue token")
		}
		if tok.RV != src.view.ResourceVersion {
			return apierrors.NewResourceExpired("the provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter")
		}
		after = tok.After
	}

	kind, apiVersion := src.view.Kind, src.view.APIVersion
	if kind == "" {
		kind, apiVersion = codec.GuessListKind(info.APIGroup, info.APIVersion, info.Resource)
	}
	wantMeta := strings.HasPrefix(a.As, "PartialObjectMetadata")
	if wantMeta {
		kind, apiVersion = "PartialObjectMetadataList", "meta.k8s.io/v1"
	}
	var items, protos [][]byte
	cont := ""
	fast := !src.filter && !rd.Local.Has(src.view.Key.Resource)
	if fast && a.Media == codec.MediaProtobuf && a.As == "" && !wantMeta {
		// The fastest path: the whole view to a protobuf client, from the
		// stored protobuf messages, assembled while the read transaction
		// keeps them in place in the file.
		var body []byte
		ok := false
		err := rd.Store.Read(func(tx *store.Tx) error {
			items, protos, last, more, err := listItems(tx, src, after, limit, true)
			if err == nil {
				if more {
					cont = encodeContinue(src.view.ResourceVersion, last)
				}
				body, ok = codec.ProtobufList(kind, apiVersion, src.view.ResourceVersion, cont, items, protos)
			}
			return err
		})
		if err != nil {
			return asStatus(err)
		}
		if ok {
			rd.writeAnswer(w, codec.MediaProtobuf, body, src)
			return nil
		}
		cont = "" // not a built-in list: JSON, below
	}
	if fast {
		// The fast path: the whole view, items copied as stored.
		var last string
		var more bool
		err := rd.Store.Read(func(tx *store.Tx) error {
			items, _, last, more, err = listItems(tx, src, after, limit, false)
			return err
		})
		if err != nil {
			return asStatus(err)
		}
		if more {
			cont = encodeContinue(src.view.ResourceVersion, last)
		}
	} else {
		var objs []store.Object
		more := false
		stop := errors.New("stop")
		err = rd.Store.List(src.view.Key, after, 0, func(o store.Object) error {
			o = rd.Local.Apply(src.view.Key.Resource, o)
			if !src.keep(o) {
				return nil
			}
			if limit > 0 && len(objs) == limit {
				more = true
				return stop
			}
			objs = append(objs, o)
			return nil
		})
		if err != nil && !errors.Is(err, stop) {
			return asStatus(err)
		}
		if more {
			last := objs[len(objs)-1]
			cont = encodeContinue(src.view.ResourceVersion, store.MemberKey(last.Namespace, last.Name))
		}
		items = make([][]byte, len(objs))
		protos = make([][]byte, len(objs))
		for i, o := range objs {
			items[i], protos[i] = o.Data, o.Proto
		}
	}
	if wantMeta {
		protos = nil // the items are not the stored objects any more
		for i, data := range items {
			items[i] = codec.WithTypeMeta(codec.MetadataOnly(data), "PartialObjectMetadata", "meta.k8s.io/v1")
		}
	}
	if a.Media == codec.MediaProtobuf && !(a.As == "Table" && !a.PlainJSON) {
		if body, ok := codec.ProtobufList(kind, apiVersion, src.view.ResourceVersion, cont, items, protos); ok {
			rd.writeAnswer(w, codec.MediaProtobuf, body, src)
			return nil
		}
	}
	protobufOnly := slices.ContainsFunc(items, codec.IsProtobufOnly)
	if protobufOnly && a.As != "Table" {
		return codec.ProtobufOnlyError(describe(info))
	}
	body := codec.JSONList(kind, apiVersion, src.view.ResourceVersion, cont, items)
	if a.As == "Table" && (!a.PlainJSON || protobufOnly) {
		// A Table needs only the metadata, which is all outpost knows of
		// objects recorded only as protobuf.
		return rd.writeTable(w, body, src)
	}
	return rd.encode(w, body, a, src)
}

func encodeContinue(rv, after string) string {
	raw, _ := json.Marshal(continueToken{RV: rv, After: after})
	return base64.RawURLEncoding.EncodeToString(raw)
}

// listItems reads the members of src's view after the member key after,
// at most limit of them (0: all): their JSON, copied out of the store,
// and with withProto their protobuf encodings instead where stored
// (items[i] is then nil), which alias the file and are valid only during
// tx. more says whether members follow the last one, whose key is last.
func listItems(tx *store.Tx, src source, after string, limit int, withProto bool) (items, protos [][]byte, last string, more bool, err error) {
	fetch := 0
	if limit > 0 {
		fetch = limit + 1
	}
	// Items are copied into blocks of 1 MiB rather than one buffer that
	// grows: a view of 10,000 objects is 5 MiB, and growing a buffer to
	// that size would copy and clear it several times over.
	var block []byte
	stop := errors.New("stop")
	err = tx.ListData(src.view.Key, after, fetch, withProto, func(key string, data, proto []byte) error {
		if limit > 0 && len(items) == limit {
			more = true
			return stop
		}
		last = key
		if withProto {
			protos = append(protos, proto)
			if proto != nil {
				items = append(items, nil)
				return nil
			}
		}
		if len(block)+len(data) > cap(block) {
			block = make([]byte, 0, max(1<<20, len(data)))
		}
		start := len(block)
		block = append(block, data...)
		items = append(items, block[start:len(block):len(block)])
		return nil
	})
	if errors.Is(err, stop) {
		err = nil
	}
	return items, protos, last, more, err
}

// checkListRV applies the apiserver's resourceVersion rules to an answer
// that can only be given at the view's resourceVersion.
func checkListRV(rv, match, viewRV string) error {
	if rv == "" || rv == "0" {
		return nil // most recent / any: the cache's is the most recent we have
	}
	want, err1 := strconv.ParseUint(rv, 10, 64)
	have, err2 := strconv.ParseUint(viewRV, 10, 64)
	if err1 != nil {
		return status.BadRequest("invalid resourceVersion " + strconv.Quote(rv))
	}
	if err2 != nil {
		return nil
	}
	switch match {
	case "Exact":
		if want != have {
			return apierrors.NewResourceExpired(fmt.Sprintf("too old resource version: %d (%d); the cloud is unreachable and the cache holds only %d", want, have, have))
		}
	default: // NotOlderThan, or legacy semantics
		if want > have {
			return apierrors.NewTimeoutError(fmt.Sprintf("Too large resource version: %d, current: %d (the cloud is unreachable)", want, have), 1)
		}
	}
	return nil
}

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
		return codec.ProtobufOnlyError(describe(info))
	}
	body := codec.WithTypeMeta(data, kind, apiVersion)
	return rd.encode(w, body, a, source{})
}

func describe(info *request.Info) string {
	s := info.Verb + " " + info.Resource
	if info.Name != "" {
		s += " " + info.Name
	}
	if info.Namespace != "" {
		s += " in namespace " + info.Namespace
	}
	if info.LabelSelector != "" {
		s += " with labels " + info.LabelSelector
	}
	if info.FieldSelector != "" {
		s += " with fields " + info.FieldSelector
	}
	return s
}

// encode writes a JSON answer in the media type the client asked for.
func (rd *Reader) encode(w http.ResponseWriter, jsonBody []byte, a codec.Accept, src source) error {
	contentType, body, err := codec.Encode(jsonBody, a)
	if err != nil {
		return err
	}
	rd.writeAnswer(w, contentType, body, src)
	return nil
}

func (rd *Reader) writeAnswer(w http.ResponseWriter, contentType string, body []byte, src source) {
	if len(body) >= memory.LargeAnswer {
		defer rd.wasLarge()
	}
	if src.view.Stale {
		w.Header().Set("X-Outpost-Cache-Stale", "true")
	}
	bw := bufio.NewWriterSize(w, 64<<10)
	writeBody(responseWriterTo{w, bw}, contentType, body)
	_ = bw.Flush()
}

// responseWriterTo writes the body through a buffer.
type responseWriterTo struct {
	http.ResponseWriter
	bw *bufio.Writer
}

func (r responseWriterTo) Write(b []byte) (int, error) { return r.bw.Write(b) }

// writeTable answers with the Table of a JSON list.
func (rd *Reader) writeTable(w http.ResponseWriter, listJSON []byte, src source) error {
	body, err := codec.Table(listJSON)
	if err != nil {
		return apierrors.NewInternalError(err)
	}
	rd.writeAnswer(w, codec.MediaJSON, body, src)
	return nil
}

func asStatus(err error) error {
	if _, ok := err.(apierrors.APIStatus); ok {
		return err
	}
	return apierrors.NewInternalError(fmt.Errorf("reading cache: %w", err))
}
