package reader

import (
	"bufio"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"

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
			err = rd.serveList(r.Context(), w, info)
		}
	case request.GetObject:
		err = rd.serveGet(w, info)
	case request.ListObjects:
		err = rd.serveList(r.Context(), w, info)
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
	// pinned: only objects at resourceVersion upTo or older (a grant's).
	pinned bool
	upTo   uint64
	// found is the view's resourceVersion when it was found, which the
	// answer's may not be (a grant's says its pin).
	found string
}

// beyondPin reports whether o is an object s would answer but for its
// pin: one changed after the pin, which a pinned source cannot answer
// whole (see wholeAtPin).
func (s source) beyondPin(o store.Object) bool {
	if !s.pinned {
		return false
	}
	open := s
	open.pinned = false
	if !open.keep(o) {
		return false
	}
	rv, err := strconv.ParseUint(o.ResourceVersion, 10, 64)
	return err != nil || rv > s.upTo
}

func (s source) keep(o store.Object) bool {
	if !s.filter {
		return true
	}
	if s.namespace != "" && o.Namespace != s.namespace {
		return false
	}
	if s.pinned {
		if rv, err := strconv.ParseUint(o.ResourceVersion, 10, 64); err != nil || rv > s.upTo {
			return false
		}
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
			if g, upTo, ok, err := rd.granted(want.Identity, key); err == nil && ok && info.Labels != nil && info.Fields != nil &&
				!strings.HasSuffix(res, "#meta") && store.NewerRV(strconv.FormatUint(upTo, 10), v.ResourceVersion) {
				// The node watch cache answered this identity since its own
				// view was recorded: the fresher of the two, as far as it
				// was served (its pin), when it is whole there.
				src := grantedSource(g, upTo, want, info)
				if whole, err := rd.wholeAtPin(src); err != nil {
					return source{}, false, err
				} else if whole {
					return src, true, nil
				}
			}
			return source{view: v, meta: strings.HasSuffix(res, "#meta"), found: v.ResourceVersion}, true, nil
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
			return source{view: v, namespace: ns, labels: info.Labels, fields: info.Fields, filter: true, meta: strings.HasSuffix(res, "#meta"), found: v.ResourceVersion}, true, nil
		}
	}
	if info.Labels != nil && info.Fields != nil && !strings.HasSuffix(want.Resource, "#meta") {
		// Served online from another identity's stream (package share):
		// that view, filtered to what this identity was allowed.
		v, upTo, ok, err := rd.granted(want.Identity, want)
		if err != nil || !ok {
			return source{}, false, err
		}
		src := grantedSource(v, upTo, want, info)
		whole, err := rd.wholeAtPin(src)
		if err != nil || !whole {
			return source{}, false, err
		}
		return src, true, nil
	}
	return source{}, false, nil
}

// wholeAtPin reports whether a grant's source answers whole at its pin:
// whether none of the objects its caller would be answered changed after
// the pin. The store keeps only the newest version of an object, which the
// caller was never served and may no longer be allowed to read; leaving
// it out would answer a list that lacks an object that exists, which a
// client such as kubelet acts on (a pod missing from its list is
// stopped). Such a grant answers nothing: the caller's own older view
// does, or nothing at all.
func (rd *Reader) wholeAtPin(src source) (bool, error) {
	beyond := errors.New("changed after the pin")
	err := rd.Store.List(src.view.Key, "", 0, func(o store.Object) error {
		if src.beyondPin(o) {
			return beyond
		}
		return nil
	})
	switch {
	case errors.Is(err, beyond):
		return false, nil
	case err != nil:
		return false, err
	}
	return true, nil
}

// grantedSource reads view v, another identity's, for want: filtered to
// what want's identity was allowed, no newer than it was served (upTo).
func grantedSource(v store.View, upTo uint64, want store.ViewKey, info *request.Info) source {
	src := source{view: v, labels: info.Labels, fields: info.Fields, filter: true, pinned: true, upTo: upTo, found: v.ResourceVersion}
	if store.NewerRV(v.ResourceVersion, strconv.FormatUint(upTo, 10)) {
		// Answered as of the pin: a client resuming its watch from the
		// version it was told online gets what the pin left out.
		src.view.ResourceVersion = strconv.FormatUint(upTo, 10)
	}
	if v.Key.Namespace == "" {
		src.namespace = want.Namespace
	}
	// A selector the view shares was applied by the apiserver: not again
	// here, where fields of custom resources are not known.
	if v.Key.LabelSelector == want.LabelSelector {
		src.labels = labels.Everything()
	}
	if v.Key.FieldSelector == want.FieldSelector {
		src.fields = fields.Everything()
	}
	return src
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
	if _, ok := err.(apierrors.APIStatus); ok || errors.Is(err, errViewMoved) {
		// errViewMoved: serveList finds the view again.
		return err
	}
	return apierrors.NewInternalError(fmt.Errorf("reading cache: %w", err))
}
