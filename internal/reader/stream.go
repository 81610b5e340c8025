package reader

import (
	"context"
	"errors"
	"net/http"
	"strconv"

	"golang.org/x/sync/semaphore"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/memory"
	"github.com/outposthq/outpost/internal/store"
)

// Offline, a whole view goes to the client as it is read from the store,
// a page at a time, instead of being assembled first, whenever another
// whole view is being answered at the same time: fifty clients listing ten
// thousand objects at once would otherwise hold fifty copies of a 12 MB
// answer (issue 20). One at a time is still assembled, which reads the
// view once instead of twice (a streamed answer first measures itself),
// so a lone client is as fast as before and memory is bounded by one
// assembled answer plus a page per other client. The bytes are the same
// as the assembled answer's, Content-Length included.
//
// No read transaction is held while the client reads: a slow client must
// not keep bbolt from growing its file under the recorder. Each page is
// copied out in a transaction of its own, which checks that the view is
// still at the resourceVersion the answer started with; should it have
// moved (the cloud returned, and the view was re-listed, midway through a
// stream), the answer is cut off, and the client lists again.
const (
	// streamMin is the smallest answer streamed; smaller ones are
	// assembled as before, which costs one read of the view, not two.
	streamMin = 1 << 20
	// streamPage bounds the bytes one page copies out of the store.
	streamPage = 256 << 10
)

// Answers that cannot stream (a view filtered locally, converted to
// protobuf from JSON, a Table…) are assembled whole, and at most
// maxAssembling of the large ones at a time: the others wait their turn,
// which on a small node's few cores costs little, since assembling them
// is what takes the cores. A page of a paginated list (limit at most
// smallPage, as informers ask) is small and never waits.
const (
	maxAssembling = 2
	smallPage     = 1000
)

// assembling waits for a turn to assemble a large answer, or for ctx to
// end; assembled ends the turn.
func (rd *Reader) assembling(ctx context.Context) error {
	rd.assembleOnce.Do(func() { rd.assemble = semaphore.NewWeighted(maxAssembling) })
	return rd.assemble.Acquire(ctx, 1)
}

func (rd *Reader) assembled() { rd.assemble.Release(1) }

// beginWhole counts a whole-view answer in; it reports whether another
// is being answered already, and then this one should stream. Each call
// must be followed by endWhole.
func (rd *Reader) beginWhole() bool { return rd.wholeLists.Add(1) > 1 }

func (rd *Reader) endWhole() { rd.wholeLists.Add(-1) }

var (
	errNotStreamable = errors.New("not streamable")
	errViewMoved     = errors.New("the view changed while it was streamed")
)

// streamList answers with the whole view of src, streamed, when that is
// possible: a view read without local filtering or overlays, to a client
// asking for plain JSON or protobuf. handled is false when it did not
// answer and the caller must.
func (rd *Reader) streamList(w http.ResponseWriter, src source, kind, apiVersion string, protobuf bool) (handled bool) {
	k, rv := src.view.Key, src.view.ResourceVersion
	// First pass: the answer's size, and whether every item can go as it
	// is stored.
	total := 0
	err := rd.Store.Read(func(tx *store.Tx) error {
		if checkView(tx, src) != nil {
			return errViewMoved
		}
		return tx.ListData(k, "", 0, protobuf, func(_ string, data, proto []byte) error {
			switch {
			case protobuf && proto == nil:
				return errNotStreamable
			case protobuf:
				total += codec.ProtobufListItemSize(len(proto))
			case codec.IsProtobufOnly(data):
				return errNotStreamable
			default:
				if total > 0 {
					total++ // the comma before it
				}
				total += len(data)
			}
			return nil
		})
	})
	if err != nil || total < streamMin {
		return false
	}
	contentType := codec.MediaJSON
	prefix, suffix := codec.JSONListFrame(kind, apiVersion, rv, "")
	if protobuf {
		var ok bool
		if prefix, suffix, ok = codec.ProtobufListFrame(kind, apiVersion, rv, "", total); !ok {
			return false
		}
		contentType = codec.MediaProtobuf
	}

	if total >= memory.LargeAnswer {
		// Little of it is held at once, but the reads leave garbage in
		// proportion: return it to the system soon after, as for any
		// large answer.
		defer rd.wasLarge()
	}
	h := w.Header()
	if src.view.Stale {
		h.Set("X-Outpost-Cache-Stale", "true")
	}
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(prefix)+total+len(suffix)))
	h.Set(ServedByHeader, "cache")
	w.WriteHeader(http.StatusOK)
	if _, err := w.Write(prefix); err != nil {
		return true // the client went away
	}
	page := make([]byte, 0, streamPage+4<<10)
	after, written, first := "", 0, true
	for {
		page = page[:0]
		more := false
		err := rd.Store.Read(func(tx *store.Tx) error {
			if checkView(tx, src) != nil {
				return errViewMoved
			}
			stop := errors.New("page full")
			err := tx.ListData(k, after, 0, protobuf, func(key string, data, proto []byte) error {
				if len(page) >= streamPage {
					more = true
					return stop
				}
				after = key
				switch {
				case protobuf && proto == nil:
					return errViewMoved
				case protobuf:
					page = codec.AppendProtobufListItem(page, proto)
				default:
					if !first {
						page = append(page, ',')
					}
					first = false
					page = append(page, data...)
				}
				return nil
			})
			if errors.Is(err, stop) {
				err = nil
			}
			return err
		})
		if err == nil && written+len(page) > total {
			err = errViewMoved
		}
		if err != nil {
			// The length is promised; a short body tells the client
			// the answer broke off.
			panic(http.ErrAbortHandler)
		}
		if _, err := w.Write(page); err != nil {
			return true
		}
		written += len(page)
		if !more {
			break
		}
	}
	if written != total {
		panic(http.ErrAbortHandler)
	}
	_, _ = w.Write(suffix)
	return true
}
