package recorder

import (
	"context"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// Relist refreshes every view of identity from the apiserver, through the
// normal recording path, so the store converges to the cloud even for
// clients that stay quiet, and objects that vanished upstream leave it. At
// most rate views a second, each delayed by a little jitter, so many nodes
// reconnecting at once do not storm the apiserver.
//
// upstream sends each GET as the identity: the node's credentials for the
// node's views, the token a caller last used for a token caller's.
//
// A view a whole answer replaced after since (a client re-listed it when
// the link returned, as informers whose watches broke do) is converged
// already and is not asked again: after an outage the apiserver sees one
// re-list of it, not two.
func (c *Recorder) Relist(ctx context.Context, identity string, rate int, upstream http.RoundTripper, since time.Time) (done int, err error) {
	c.init()
	views, err := c.Store.AllViews()
	if err != nil {
		return 0, err
	}
	if rate <= 0 {
		rate = 5
	}
	// The views a rebuild of the store dropped come first, and whatever
	// keeps them fresh: the store no longer has them.
	type turn struct {
		k     store.ViewKey
		stale bool // in the store
	}
	var turns []turn
	for _, k := range c.lostOf(identity) {
		turns = append(turns, turn{k: k})
	}
	for _, v := range views {
		// A view a client re-listed since is skipped before its turn
		// (costing no wait) and when its turn comes.
		if v.Key.Identity != identity || (!v.Stale && (c.listedSince(v.Key, since) || c.keptFresh(v.Key))) {
			continue
		}
		turns = append(turns, turn{k: v.Key, stale: v.Stale})
	}
	for _, tn := range turns {
		jitter := time.Duration(rand.Int64N(int64(time.Second / time.Duration(rate))))
		select {
		case <-ctx.Done():
			return done, ctx.Err()
		case <-time.After(time.Second/time.Duration(rate) + jitter/2):
		}
		if !tn.stale && c.listedSince(tn.k, since) {
			continue
		}
		ok, err := c.relistOne(ctx, tn.k, upstream)
		if err != nil {
			return done, err
		}
		if ok {
			done++
		}
	}
	return done, nil
}

// lostOf returns identity's views a rebuild of the store dropped and no
// whole answer replaced since (see Lost).
func (c *Recorder) lostOf(identity string) []store.ViewKey {
	c.mu.Lock()
	defer c.mu.Unlock()
	var keys []store.ViewKey
	for k := range c.lost {
		if k.Identity == identity {
			keys = append(keys, k)
		}
	}
	return keys
}

// keptFresh reports whether something else keeps view k fresh (a stream
// of the node watch cache, which resumes or lists on its own).
func (c *Recorder) keptFresh(k store.ViewKey) bool {
	return c.KeptFresh != nil && c.KeptFresh(k)
}

// listedSince reports whether a whole answer replaced view k after since.
func (c *Recorder) listedSince(k store.ViewKey, since time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	at, ok := c.listed[k]
	return ok && at.After(since) && !c.stale[k]
}

// relistOne asks the apiserver for view k through upstream and records the
// answer; ok is false when there was nothing to record (the request could
// not be made, or the apiserver refused it: a view it says is gone or no
// longer readable is deleted). err is a failure of the link.
func (c *Recorder) relistOne(ctx context.Context, k store.ViewKey, upstream http.RoundTripper) (ok bool, err error) {
	r, err := relistRequest(ctx, k, c.protobufOnly(k))
	if err != nil {
		return false, nil
	}
	// A watch may be recording into k meanwhile (a stream of the node
	// watch cache keeps its view fresh while the refresher re-lists it):
	// its events, from the moment the list is asked, are applied after the
	// answer, which would otherwise set the view back to the list's
	// version and undo the changes they brought (an object deleted since
	// coming back). Those the answer already holds change nothing again.
	c.hold(k)
	defer c.holdUntilWritten(k)
	resp, err := upstream.RoundTrip(r)
	if err != nil {
		return false, err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, int64(c.MaxBody)+1))
	resp.Body.Close()
	switch {
	case err != nil:
		return false, err
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusForbidden:
		// Gone upstream, or no longer this identity's to read (the Node
		// authorizer forgets a deleted pod's ConfigMap): the view goes,
		// so it is never served again.
		_ = c.Store.DeleteView(k)
		c.mu.Lock()
		delete(c.listed, k)
		delete(c.lost, k)
		c.mu.Unlock()
		return true, nil
	case resp.StatusCode != http.StatusOK:
		return false, nil
	case k.Name != "":
		c.recordObject(k, resp.Header.Get("Content-Type"), maybeGunzip(resp, body), nil)
	default:
		c.recordList("", k, resp.Header.Get("Content-Type"), maybeGunzip(resp, body), nil)
	}
	return true, nil
}

func maybeGunzip(resp *http.Response, body []byte) []byte {
	if resp.Header.Get("Content-Encoding") == "gzip" {
		if b, err := gunzip(body); err == nil {
			return b
		}
	}
	return body
}

// protobufOnly reports whether view k holds objects recorded only from
// protobuf (see codec.IsProtobufOnly), judging by its first member.
func (c *Recorder) protobufOnly(k store.ViewKey) bool {
	marker := false
	_ = c.Store.Read(func(tx *store.Tx) error {
		return tx.ListData(k, "", 1, false, func(_ string, data, _ []byte) error {
			marker = codec.IsProtobufOnly(data)
			return nil
		})
	})
	return marker
}

// relistRequest rebuilds the GET that answers view k, asking for protobuf
// first when the view was recorded only from protobuf.
func relistRequest(ctx context.Context, k store.ViewKey, protobuf bool) (*http.Request, error) {
	path, err := request.ViewURL(k)
	if err != nil {
		return nil, err
	}
	_, meta := strings.CutSuffix(k.Resource, "#meta")
	r, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://upstream"+path, nil)
	if err != nil {
		return nil, err
	}
	r.Header.Set("Accept", "application/json")
	// Gzipped, as client-go asks: after an outage every view of every node
	// is re-listed at once, and a JSON list shrinks several times (the
	// upstream transport passes encodings through, and adds none).
	r.Header.Set("Accept-Encoding", "gzip")
	if protobuf {
		// Recorded from protobuf, of a kind outpost has no type for:
		// re-listed the same way, so that its protobuf clients are still
		// answered (a JSON re-list would leave objects without it).
		r.Header.Set("Accept", codec.MediaProtobuf+", application/json")
	}
	if meta {
		r.Header.Set("Accept", "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")
	}
	return r, nil
}
