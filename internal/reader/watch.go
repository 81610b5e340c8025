package reader

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/status"
	"github.com/outposthq/outpost/internal/store"
)

// serveWatch answers a watch while the cloud is unreachable, from the view
// the caller's list or watch recorded:
//   - sendInitialEvents=true (WatchList): the view's objects as ADDED, then
//     the bookmark annotated k8s.io/initial-events-end, so informers sync;
//   - resourceVersion "" or "0": the view's objects as ADDED first;
//   - a resourceVersion older than the view: 410 Gone, so the client
//     re-lists (from the cache) instead of missing changes;
//   - then BOOKMARKs (when allowed) until timeoutSeconds, the client leaves,
//     or the cloud returns, when the watch ends so the client re-watches
//     upstream.
func (rd *Reader) serveWatch(w http.ResponseWriter, r *http.Request, info *request.Info) error {
	a, opts := info.Accept, info.Options
	src, ok, err := rd.findSource(info)
	if err != nil {
		return asStatus(err)
	}
	if !ok {
		return neverAnswered(describe(info))
	}
	rv, sendInitial, bookmarks := opts.ResourceVersion, opts.SendInitialEvents, opts.AllowWatchBookmarks
	timeout := 30*time.Minute + time.Duration(rand.Int64N(int64(30*time.Minute))) // as the apiserver's default
	if opts.InvalidTimeout != "" {
		return status.BadRequest(fmt.Sprintf("invalid timeoutSeconds %q", opts.InvalidTimeout))
	}
	if opts.TimeoutSeconds > 0 {
		timeout = time.Duration(opts.TimeoutSeconds) * time.Second
	}
	initial := sendInitial || rv == "" || rv == "0"
	tooOld := false
	if !initial {
		want, err1 := strconv.ParseUint(rv, 10, 64)
		have, err2 := strconv.ParseUint(src.view.ResourceVersion, 10, 64)
		if err1 != nil {
			return status.BadRequest(fmt.Sprintf("invalid resourceVersion %q", rv))
		}
		tooOld = err2 == nil && want < have
	}

	kind, apiVersion := strings.TrimSuffix(src.view.Kind, "List"), src.view.APIVersion
	if kind == "" {
		kind, apiVersion = codec.GuessListKind(info.APIGroup, info.APIVersion, info.Resource)
		kind = strings.TrimSuffix(kind, "List")
	}
	if strings.HasPrefix(a.As, "PartialObjectMetadata") {
		kind, apiVersion = "PartialObjectMetadata", "meta.k8s.io/v1"
	}
	enc, err := codec.NewEventEncoder(w, a, kind, apiVersion, rd.recordedAsProtobuf(src.view.Key))
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", enc.ContentType)
	w.Header().Set(ServedByHeader, "cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()

	if tooOld {
		st := apierrors.NewResourceExpired(fmt.Sprintf("too old resource version: %s (%s); the cloud is unreachable and the cache holds only %s", rv, src.view.ResourceVersion, src.view.ResourceVersion)).Status()
		_ = enc.Status(&st)
		_ = rc.Flush()
		return nil
	}
	if initial {
		stop := errors.New("stop")
		err := rd.Store.List(src.view.Key, "", 0, func(o store.Object) error {
			o = rd.Local.Apply(src.view.Key.Resource, o)
			if src.beyondPin(o) {
				// A grant's view changed after its pin since it was found
				// whole there: the client lists again, and the list finds
				// what answers it now.
				st := apierrors.NewResourceExpired(fmt.Sprintf("the cloud is unreachable and the cached answer for %s changed while it was read; list again", describe(info))).Status()
				_ = enc.Status(&st)
				return stop
			}
			if !src.keep(o) {
				return nil
			}
			data, proto := o.Data, o.Proto
			if kind == "PartialObjectMetadata" {
				data, proto = codec.MetadataOnly(data), nil
			} else if codec.IsProtobufOnly(data) && !enc.Protobuf {
				st := codec.ProtobufOnlyError(describe(info)).(apierrors.APIStatus).Status()
				_ = enc.Status(&st)
				return stop
			}
			if err := enc.Object(watch.Added, data, proto); err != nil {
				// The client went away, or the object cannot be sent in
				// its encoding (a view recorded partly from protobuf and
				// partly from JSON): say so, which fails in the first case.
				st := status.NotAcceptable(fmt.Sprintf("outpost: the cloud is unreachable and %s cannot be sent in the encoding asked for: %v", describe(info), err)).Status()
				_ = enc.Status(&st)
				return stop
			}
			return nil
		})
		if err != nil {
			return nil
		}
	}
	if sendInitial {
		if err := enc.Bookmark(src.view.ResourceVersion, true); err != nil {
			return nil
		}
	}
	_ = rc.Flush()

	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	interval := rd.BookmarkInterval
	if interval <= 0 {
		interval = 5 * time.Second
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	// Local writes made from now on reach this watcher as MODIFIED events.
	_, seen, local := rd.Local.Since(src.view.Key.Resource, ^uint64(0))
	for {
		var changed <-chan struct{}
		if rd.Changed != nil {
			changed = rd.Changed()
		}
		if rd.Online != nil && rd.Online() {
			return nil // the cloud is back: the client re-watches upstream
		}
		select {
		case <-r.Context().Done():
			return nil
		case <-deadline.C:
			return nil
		case <-changed:
		case <-local:
			var fresh []store.Object
			fresh, seen, local = rd.Local.Since(src.view.Key.Resource, seen)
			for _, o := range fresh {
				if !src.keep(o) {
					continue
				}
				data := o.Data
				if kind == "PartialObjectMetadata" {
					data = codec.MetadataOnly(data)
				}
				if err := enc.Object(watch.Modified, data, nil); err != nil {
					return nil
				}
			}
			_ = rc.Flush()
		case <-tick.C:
			if bookmarks {
				if err := enc.Bookmark(src.view.ResourceVersion, false); err != nil {
					return nil
				}
				_ = rc.Flush()
			}
		}
	}
}

// recordedAsProtobuf reports whether the first member of view k was
// recorded from a protobuf answer: of a kind outpost has no type for,
// only then can its events be sent in protobuf.
func (rd *Reader) recordedAsProtobuf(k store.ViewKey) bool {
	found := false
	_ = rd.Store.List(k, "", 1, func(o store.Object) error {
		found = o.Proto != nil
		return nil
	})
	return found
}
