package recorder

import (
	"strings"
	"sync/atomic"
	"time"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/store"
)

// recordObject records a GET answer for view. With a claim (see
// Recorder.claim), it was checked already; the claim is released once the
// answer is written or found not to need writing.
func (c *Recorder) recordObject(view store.ViewKey, contentType string, body []byte, cl *claim) {
	queued := false
	defer func() {
		if !queued {
			c.unclaim(cl)
		}
	}()
	if cl == nil && c.holds(view, contentType, body, false, "") {
		return
	}
	o, kind, apiVersion, err := codec.DecodeObject(contentType, body, view.Resource)
	if err != nil {
		c.undecodable(&view, err)
		return
	}
	if c.unchanged(view, o.ResourceVersion, contentType) {
		return
	}
	c.keepJSON(view.Resource, &o)
	v := store.View{Key: view, ResourceVersion: o.ResourceVersion, Kind: kind + "List", APIVersion: apiVersion, Updated: c.Now()}
	queued = c.send(write{replace: &replaceView{view: v, objs: []store.Object{o}, claim: cl}}, &view, "queue-full")
}

// pagedList collects the pages of one paginated list until the last.
type pagedList struct {
	next  string // the continue token the next page must be asked with
	items []store.Object
}

// maxPagedObjects bounds what one paginated list may hold in memory.
const maxPagedObjects = 1_000_000

// recordList records a LIST answer (or a page of one, asked with the
// continue token asked) for view; cl as for recordObject.
func (c *Recorder) recordList(asked string, view store.ViewKey, contentType string, body []byte, cl *claim) {
	queued := false
	defer func() {
		if !queued {
			c.unclaim(cl)
		}
	}()
	if cl == nil && c.holds(view, contentType, body, true, asked) {
		return
	}
	l, err := c.decodeList(view, contentType, body)
	if err != nil {
		c.undecodable(&view, err)
		return
	}
	items := l.Items
	// A paginated list replaces its view only when its last page arrived.
	if asked != "" || l.Continue != "" {
		c.mu.Lock()
		p := c.pages[view]
		switch {
		case asked == "":
			p = &pagedList{}
		case p == nil || p.next != asked:
			// A page of a chain we did not see start: nothing to replace.
			delete(c.pages, view)
			c.mu.Unlock()
			return
		}
		p.items = append(p.items, l.Items...)
		p.next = l.Continue
		if l.Continue != "" && len(p.items) <= maxPagedObjects {
			c.pages[view] = p
			c.mu.Unlock()
			return
		}
		delete(c.pages, view)
		c.mu.Unlock()
		if l.Continue != "" {
			c.drop(&view, "too-large")
			return
		}
		items = p.items
	}
	if c.unchanged(view, l.ResourceVersion, contentType) {
		return
	}
	v := store.View{Key: view, ResourceVersion: l.ResourceVersion, Kind: l.Kind, APIVersion: l.APIVersion, Updated: c.Now()}
	queued = c.send(write{replace: &replaceView{view: v, objs: items, claim: cl}}, &view, "queue-full")
}

// decodeList decodes a list answer for view, taking the items that have
// not changed since they were stored (the same resourceVersion) from the
// store instead of decoding them again: a re-list, or a list whose
// resourceVersion moved because anything in the cluster was written, is
// mostly such items.
func (c *Recorder) decodeList(view store.ViewKey, contentType string, body []byte) (l codec.List, err error) {
	rerr := c.Store.Read(func(tx *store.Tx) error {
		var known codec.Stored
		if tx.HasObjects(view.Resource) { // else, as when first listed, no lookups
			known = func(namespace, name, rv string) (store.Object, bool) {
				o, ok, err := tx.Get(view.Resource, namespace, name)
				// A protobuf-only marker is not taken for the item: a JSON
				// answer completes it (see codec.IsProtobufOnly).
				return o, err == nil && ok && o.ResourceVersion == rv && !codec.IsProtobufOnly(o.Data)
			}
		}
		l, err = codec.DecodeList(contentType, body, view.Resource, known)
		return nil
	})
	if rerr != nil {
		// The store cannot be read: decode everything.
		return codec.DecodeList(contentType, body, view.Resource, nil)
	}
	return l, err
}

// holds reports whether view already holds the answer body (or the start
// of it) without decoding it: the answer's resourceVersion, read where the
// apiserver writes it, is the view's. Unchanged objects and lists, which
// clients read again and again, then cost neither a decode nor a write. A
// list must be whole (neither a page, asked with a continue token, nor the
// first page of several).
func (c *Recorder) holds(view store.ViewKey, contentType string, body []byte, list bool, asked string) bool {
	rv, cont, ok := codec.PeekMeta(contentType, body, list)
	if !ok || cont != "" || asked != "" {
		return false
	}
	return c.unchanged(view, rv, contentType)
}

// A claim marks an answer at one resourceVersion of a view as being
// recorded, from when its start was read until the store holds it (or it
// was found not to need writing, or was dropped). Identical answers that
// arrive meanwhile, as when many clients list the same thing at once, are
// then neither inflated nor decoded nor written again.
type claim struct {
	view    store.ViewKey
	rv      string
	at      time.Time
	skipped atomic.Int32 // copies passed over for this one
}

// claimPatience is how long a claim keeps other answers at its version from
// being copied. A claim that old belongs to an answer its client reads
// very slowly (or that never ends): the next answer at the version is
// recorded too, so that client does not hold back the view.
const claimPatience = 30 * time.Second

// claim reports whether the answer starting with body need not be recorded
// (held): the view holds it, or another answer at the same version is
// being recorded. Otherwise it returns the claim the recording must
// release (nil when the start does not tell the version).
func (c *Recorder) claim(view store.ViewKey, contentType string, body []byte, list bool, asked string) (held bool, cl *claim) {
	rv, cont, ok := codec.PeekMeta(contentType, body, list)
	if !ok || rv == "" || cont != "" || asked != "" {
		return false, nil
	}
	if c.unchanged(view, rv, contentType) {
		return true, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.Now()
	if other := c.claims[view]; other != nil && other.rv == rv && now.Sub(other.at) < claimPatience {
		other.skipped.Add(1)
		return true, nil
	}
	cl = &claim{view: view, rv: rv, at: now}
	c.claims[view] = cl
	return false, cl
}

// unclaim releases cl, unless a newer claim replaced it.
func (c *Recorder) unclaim(cl *claim) {
	if cl == nil {
		return
	}
	c.mu.Lock()
	if c.claims[cl.view] == cl {
		delete(c.claims, cl.view)
	}
	c.mu.Unlock()
}

// unchanged reports whether view already holds this answer: the same
// resourceVersion, and not stale. Repeated reads of an unchanged object or
// list then cost no write at all.
func (c *Recorder) unchanged(view store.ViewKey, rv, contentType string) bool {
	if rv == "" {
		return false
	}
	held := false
	err := c.Store.Read(func(tx *store.Tx) error {
		v, ok, err := tx.View(view)
		if err != nil || !ok || v.Stale || v.ResourceVersion != rv {
			return err
		}
		held = true
		if codec.MediaType(contentType) == codec.MediaProtobuf {
			// Answered now in protobuf: the view may hold only JSON (a
			// JSON answer came first at this version), and the messages
			// of this answer would spare offline protobuf clients a
			// conversion of every object, and let them stream. Its first
			// member tells.
			return tx.ListData(view, "", 1, true, func(_ string, _, proto []byte) error {
				held = proto != nil
				return nil
			})
		}
		// Answered now in JSON or CBOR: the view may hold only what
		// protobuf answers of a kind outpost has no type for told of it
		// (see codec.IsProtobufOnly), which this answer completes. Its
		// first member tells, read without decoding (asking the scheme
		// whether the kind is known would build it, which outposts whose
		// clients speak JSON never need).
		return tx.ListData(view, "", 1, false, func(_ string, data, _ []byte) error {
			held = !codec.IsProtobufOnly(data)
			return nil
		})
	})
	return err == nil && held
}

// keepJSON gives o, an object of resource decoded from a protobuf answer
// of a kind outpost has no type for (so its JSON is only the marker of
// codec.IsProtobufOnly), the whole JSON the store holds of it at the same
// resourceVersion, recorded from a JSON answer: the marker must not
// replace it.
func (c *Recorder) keepJSON(resource string, o *store.Object) {
	if !codec.IsProtobufOnly(o.Data) {
		return
	}
	stored, ok, err := c.Store.Get(strings.TrimSuffix(resource, "#meta"), o.Namespace, o.Name)
	if err != nil || !ok || stored.ResourceVersion != o.ResourceVersion || codec.IsProtobufOnly(stored.Data) {
		return
	}
	o.Data, o.Labels, o.Fields = stored.Data, stored.Labels, stored.Fields
}

func (c *Recorder) undecodable(view *store.ViewKey, err error) {
	c.Log.Debug("recorded answer not understood; dropped", "resource", view.Resource, "err", err)
	c.dropped(view, "undecodable", err)
}
