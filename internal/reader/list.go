package reader

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/status"
	"github.com/outposthq/outpost/internal/store"
)

// continueToken is outpost's own continue token: the view's
// resourceVersion and the last key served.
type continueToken struct {
	RV    string `json:"rv"`
	After string `json:"after"`
}

func (rd *Reader) serveList(ctx context.Context, w http.ResponseWriter, info *request.Info) error {
	// The view is found in one transaction and read in another: one
	// replaced or dropped in between (a write, a rebuild of the store) is
	// found again.
	for range 3 {
		if err := rd.serveListOnce(ctx, w, info); !errors.Is(err, errViewMoved) {
			return err
		}
	}
	return apierrors.NewServiceUnavailable(fmt.Sprintf("outpost: the cloud is unreachable and the cached answer for %s changed while it was read; try again", describe(info)))
}

func (rd *Reader) serveListOnce(ctx context.Context, w http.ResponseWriter, info *request.Info) error {
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
	if opts.InvalidLimit != "" {
		return status.BadRequest("invalid limit " + strconv.Quote(opts.InvalidLimit))
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
	if fast && limit == 0 && after == "" && !wantMeta && a.As == "" {
		// A whole view, as stored, while another is being answered:
		// streamed a page at a time (stream.go).
		concurrent := rd.beginWhole()
		defer rd.endWhole()
		switch {
		case !concurrent:
		case a.Media == codec.MediaProtobuf:
			if rd.streamList(w, src, kind, apiVersion, true) {
				return nil
			}
		case a.Media == codec.MediaJSON || (a.PlainJSON && a.Media != codec.MediaCBOR):
			if rd.streamList(w, src, kind, apiVersion, false) {
				return nil
			}
		}
	}
	if limit == 0 || limit > smallPage {
		// Assembled whole: a few at a time (stream.go).
		if err := rd.assembling(ctx); err != nil {
			return nil // the client went away
		}
		defer rd.assembled()
	}
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
		objs, more, err := rd.listFiltered(src, after, limit)
		if err != nil {
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
	switch {
	case protobufOnly && a.As != "Table" && a.Media == codec.MediaProtobuf:
		// Asked for protobuf, but some objects were recorded from JSON
		// (a JSON re-list, say): neither encoding holds them all.
		return status.NotAcceptable(fmt.Sprintf("outpost: the cloud is unreachable and %s was recorded partly from protobuf and partly from JSON, of a kind outpost has no type for; offline it can be read as metadata only (as=PartialObjectMetadataList)", describe(info)))
	case protobufOnly && a.As != "Table":
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
	if err := checkView(tx, src); err != nil {
		return nil, nil, "", false, err
	}
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

// checkView returns errViewMoved when src's view is no longer in the
// store as it was found: a view that does not exist lists as empty, and
// one replaced since would be listed under the old resourceVersion.
func checkView(tx *store.Tx, src source) error {
	v, ok, err := tx.View(src.view.Key)
	switch {
	case err != nil:
		return err
	case !ok, v.ResourceVersion != src.found:
		return errViewMoved
	}
	return nil
}

// listFiltered reads the members of src's view after the member key
// after, with local writes applied, that src keeps, up to limit (0: all);
// more says whether more follow. A view gone or replaced since it was
// found, or a pinned one with an object changed after its pin (through
// another view, since it was found whole there), is errViewMoved.
func (rd *Reader) listFiltered(src source, after string, limit int) (objs []store.Object, more bool, err error) {
	stop := errors.New("stop")
	err = rd.Store.Read(func(tx *store.Tx) error {
		if err := checkView(tx, src); err != nil {
			return err
		}
		return tx.List(src.view.Key, after, 0, func(o store.Object) error {
			o = rd.Local.Apply(src.view.Key.Resource, o)
			if src.beyondPin(o) {
				return errViewMoved
			}
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
	})
	if errors.Is(err, stop) {
		err = nil
	}
	return objs, more, err
}
