package recorder

import (
	"context"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outposthq/outpost/internal/memory"
	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// DefaultBudget is Recorder.MaxBuffered's default: room to record a list
// of 50,000 small objects (about 60 MB of JSON), or several large lists at
// once, within what a small node can give outpost.
const DefaultBudget = 64 << 20

// Recorder records the apiservers' answers into Store. Set the fields,
// then call Run once; Tee may be called before Run starts.
type Recorder struct {
	Store *store.Store
	Log   *slog.Logger
	// Metrics, if set, counts what is recorded and dropped.
	Metrics *metrics.Metrics
	// Record says whether answers to this identity are recorded. Nil:
	// every authenticated identity.
	Record func(request.Identity) bool
	// MaxBody bounds one recorded body (a list, an object, a document).
	// Default 256 MiB.
	MaxBody int
	// MaxBuffered bounds all bodies being copied at once (the recording
	// budget): past it copies are dropped and their views marked stale.
	// An answer whose view holds it already, or of which another copy at
	// the same resourceVersion is being recorded, costs only its start.
	// Default DefaultBudget.
	MaxBuffered int64
	// BatchDelay bounds how long a watch event waits before it is written.
	// Default 100ms.
	BatchDelay time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// RecordsToken, if set, says whether a TokenRequest answer (201) is
	// one to record for offline use (local.Writer.Records: this node's
	// kubelet's).
	RecordsToken func(*request.Info) bool

	// UpstreamAs, if set, sends requests as the identity (by its key) a
	// view belongs to, or returns nil when outpost holds no credentials
	// of it. The recorder then re-lists a view on its own when the one
	// copy of an answer it was recording is lost after other copies of it
	// were passed over (see claim).
	UpstreamAs func(identity string) http.RoundTripper

	// KeptFresh, if set, reports views that Relist skips because something
	// else keeps them fresh: the streams of the node watch cache (package
	// share), which resume or list on their own after an outage.
	KeptFresh func(store.ViewKey) bool

	// LargeAnswer, if set, is called after an answer of memory.LargeAnswer
	// bytes or more was stored: decoding and storing one takes several
	// times its size in short-lived memory, worth returning to the system
	// soon after (see memory.Releaser.Large).
	LargeAnswer func()

	initOnce sync.Once
	jobs     chan func()  // decoding work, off the request path
	writes   chan write   // ordered store writes, applied by one goroutine
	buffered atomic.Int64 // bytes held by tees
	watches  sync.WaitGroup

	mu         sync.Mutex // guards the fields below
	stale      map[store.ViewKey]bool
	pages      map[store.ViewKey]*pagedList
	pending    map[store.ViewKey]int // answers being decoded, per view
	claims     map[store.ViewKey]*claim
	listed     map[store.ViewKey]time.Time // when a whole answer last replaced each view
	lost       map[store.ViewKey]bool      // dropped by a rebuild of the store, not listed since (see Lost)
	refreshing map[store.ViewKey]bool      // queued in refreshes
	refreshes  chan store.ViewKey
	unrecorded map[string]*Unrecorded // by resource, without "#meta"
}

// write is one ordered store write.
type write struct {
	events  []store.Event  // applied in one batch with neighbouring events
	replace *replaceView   // a whole list
	doc     *doc           // a document
	stale   *store.ViewKey // mark a view stale
	release *store.ViewKey // an answer for this view has been written (or dropped)
}

type replaceView struct {
	view  store.View
	objs  []store.Object
	claim *claim // released once the replace is applied
	older bool   // set by applyTx: the view was newer, and kept
}

type doc struct {
	key, contentType string
	body             []byte
}

func (c *Recorder) init() {
	c.initOnce.Do(func() {
		if c.MaxBody <= 0 {
			c.MaxBody = 256 << 20
		}
		if c.MaxBuffered <= 0 {
			c.MaxBuffered = DefaultBudget
		}
		if c.Metrics != nil {
			c.Metrics.RecordingBudget.Set(float64(c.MaxBuffered))
		}
		if c.BatchDelay <= 0 {
			c.BatchDelay = 100 * time.Millisecond
		}
		if c.Now == nil {
			c.Now = time.Now
		}
		c.jobs = make(chan func(), 64)
		c.writes = make(chan write, 4096)
		c.stale = map[store.ViewKey]bool{}
		c.pages = map[store.ViewKey]*pagedList{}
		c.pending = map[store.ViewKey]int{}
		c.claims = map[store.ViewKey]*claim{}
		c.listed = map[store.ViewKey]time.Time{}
		c.lost = map[store.ViewKey]bool{}
		c.refreshing = map[store.ViewKey]bool{}
		c.refreshes = make(chan store.ViewKey, 256)
		c.unrecorded = map[string]*Unrecorded{}
	})
}

// Run decodes and writes recorded answers until ctx is done, then waits for
// the watch recorders to end and writes what they decoded.
func (c *Recorder) Run(ctx context.Context) error {
	c.init()
	var wg sync.WaitGroup
	wg.Go(func() { c.refresher(ctx) })
	wg.Go(func() {
		for {
			select {
			case <-ctx.Done():
				return
			case job := <-c.jobs:
				job()
			}
		}
	})
	stop := make(chan struct{})
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		c.writer(stop)
	}()
	<-ctx.Done()
	wg.Wait()
	c.watches.Wait() // they end when their responses end, which shutdown forces
	close(stop)
	<-writerDone
	return nil
}

// writer applies writes in order, many per transaction: everything that
// arrives within BatchDelay (or up to 1000 writes) is committed together,
// so a burst of recorded answers costs one fsync, not one each. A batch
// that fails is retried write by write, so one bad write loses only itself.
func (c *Recorder) writer(stop <-chan struct{}) {
	var batch []write
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	flush := func() {
		if len(batch) == 0 {
			return
		}
		timer.Stop()
		err := c.Store.Update(func(tx *store.Tx) error {
			for _, w := range batch {
				if err := applyTx(tx, w); err != nil {
					return err
				}
			}
			return nil
		})
		for _, w := range batch {
			if w.replace != nil && objectsSize(w.replace.objs) >= memory.LargeAnswer {
				c.wasLarge()
			}
			if err != nil {
				if werr := c.Store.Update(func(tx *store.Tx) error { return applyTx(tx, w) }); werr != nil {
					c.fail(w.what(), werr)
					if k := w.view(); k != nil {
						c.markStale(*k)
					}
					continue
				}
			}
			if w.replace != nil && w.replace.older {
				c.unclaim(w.replace.claim) // nothing to write: the view is newer
				continue
			}
			c.count(w)
			if w.replace != nil {
				c.unclaim(w.replace.claim) // the store now holds the answer
				c.mu.Lock()
				c.listed[w.replace.view.Key] = c.Now()
				delete(c.stale, w.replace.view.Key) // a whole answer made it whole
				delete(c.lost, w.replace.view.Key)
				c.mu.Unlock()
			}
		}
		clear(batch) // the written lists must not stay reachable from here
		batch = batch[:0]
	}
	// Events for views whose answer is still being decoded wait here.
	heldEvents := map[store.ViewKey][]store.Event{}
	add := func(w write) {
		switch {
		case w.release != nil:
			k := *w.release
			if c.unhold(k) > 0 {
				return
			}
			evs := heldEvents[k]
			delete(heldEvents, k)
			if len(evs) == 0 {
				return
			}
			w = write{events: evs}
		case w.events != nil && c.held(w.events[0].View):
			k := w.events[0].View
			if len(heldEvents[k]) < 100000 {
				heldEvents[k] = append(heldEvents[k], w.events...)
			} else {
				c.drop(&k, "watch-behind")
			}
			return
		}
		if len(batch) == 0 {
			timer.Reset(c.BatchDelay)
		}
		batch = append(batch, w)
		if len(batch) >= 1000 {
			flush()
		}
	}
	for {
		select {
		case <-stop:
			// Drain what was queued, then stop; later sends only fill the
			// buffer and are lost with the process, like any unflushed copy.
			for {
				select {
				case w := <-c.writes:
					add(w)
				default:
					flush()
					c.flushStale()
					return
				}
			}
		case w := <-c.writes:
			add(w)
		case <-timer.C:
			// Held events whose answer was dropped before decoding.
			for k, evs := range heldEvents {
				if !c.held(k) {
					batch = append(batch, write{events: evs})
					delete(heldEvents, k)
				}
			}
			flush()
			c.flushStale()
		}
	}
}

// applyTx applies one write inside a transaction.
func applyTx(tx *store.Tx, w write) error {
	switch {
	case w.events != nil:
		return tx.Apply(w.events)
	case w.replace != nil:
		// An answer older than what the view was given since it started
		// (its client read it slowly while newer answers and events were
		// recorded) would take the view back in time. (A view at a newer
		// version that is older than the answer is not newer: the
		// cluster's versions went back, as after etcd is restored; and
		// a stale view, which events alone may have moved past what it
		// lacks, takes any whole answer.)
		w.replace.older = false
		if cl := w.replace.claim; cl != nil {
			v, ok, err := tx.View(w.replace.view.Key)
			if err != nil {
				return err
			}
			if ok && !v.Stale && v.Updated.After(cl.at) && store.NewerRV(v.ResourceVersion, w.replace.view.ResourceVersion) {
				w.replace.older = true
				return nil
			}
		}
		return tx.ReplaceView(w.replace.view, w.replace.objs)
	case w.doc != nil:
		return tx.PutDoc(w.doc.key, w.doc.contentType, w.doc.body)
	case w.stale != nil:
		return tx.MarkStale(*w.stale)
	}
	return nil
}

func (w write) what() string {
	switch {
	case w.events != nil:
		return "applying watch events"
	case w.replace != nil:
		return "replacing view"
	case w.doc != nil:
		return "storing document"
	}
	return "marking view stale"
}

func (w write) view() *store.ViewKey {
	switch {
	case len(w.events) > 0:
		return &w.events[0].View
	case w.replace != nil:
		return &w.replace.view.Key
	}
	return nil
}

func (c *Recorder) count(w write) {
	if w.replace != nil {
		c.recorded(w.replace.view.Key.Resource)
	}
	if c.Metrics == nil {
		return
	}
	switch {
	case w.events != nil:
		c.Metrics.CacheEvents.Add(float64(len(w.events)))
	case w.replace != nil:
		c.Metrics.CacheLists.Inc()
	}
}

// send queues w without ever blocking the caller's client: when the queue
// is full the write is dropped and its view marked stale.
func (c *Recorder) send(w write, view *store.ViewKey, reason string) (queued bool) {
	select {
	case c.writes <- w:
		return true
	default:
		c.drop(view, reason)
		return false
	}
}

// drop counts a dropped recording and remembers its view as stale.
func (c *Recorder) drop(view *store.ViewKey, reason string) {
	c.dropped(view, reason, nil)
}

// dropped is drop with the error that made the answer unrecordable; the
// first such drop of a resource is logged.
func (c *Recorder) dropped(view *store.ViewKey, reason string, err error) {
	if c.Metrics != nil {
		c.Metrics.CacheDropped.WithLabelValues(reason).Inc()
	}
	if view == nil {
		return
	}
	c.markStale(*view)
	if c.unrecordable(view, reason, err) {
		c.Log.Warn("answers of this resource cannot be recorded; they will not be served offline until one is (see /debug/cache/unrecorded)",
			"resource", view.Resource, "reason", reason, "err", err)
	}
}

func (c *Recorder) markStale(k store.ViewKey) {
	c.mu.Lock()
	c.stale[k] = true
	cl := c.claims[k]
	delete(c.claims, k) // a later answer at the claimed version must be recorded
	c.mu.Unlock()
	if (cl != nil && cl.skipped.Load() > 0) || c.keptFresh(k) {
		// Copies of the same answer were not taken because this one
		// was, or the view is a stream's of the node watch cache, whose
		// clients never list: with the recording lost, nothing would
		// bring the view up to date while the link holds.
		c.refresh(k)
	}
	// Marked in the store in order with the answers queued before and
	// after it (or, should the queue be full, by the writer's next flush).
	select {
	case c.writes <- write{stale: &k}:
	default:
	}
}

// Lost takes the views a rebuild of the damaged store file dropped (see
// store.Store.Run): each is fetched again at once by the refresher, and
// until one is listed whole, by every re-list of its identity after a
// reconnect (Relist), whatever else keeps it fresh. When the rebuild lost
// views it cannot name, those this recorder listed whole since it started
// and the store no longer holds count among them.
func (c *Recorder) Lost(l store.Loss) {
	c.init()
	keys := l.Views
	if l.Unnamed {
		c.mu.Lock()
		known := make([]store.ViewKey, 0, len(c.listed))
		for k := range c.listed {
			known = append(known, k)
		}
		c.mu.Unlock()
		for _, k := range known {
			if _, ok, err := c.Store.View(k); err == nil && !ok {
				keys = append(keys, k)
			}
		}
	}
	c.mu.Lock()
	for _, k := range keys {
		c.lost[k] = true
		delete(c.listed, k)
	}
	c.mu.Unlock()
	for _, k := range keys {
		c.refresh(k)
	}
}

// refresh queues view k to be re-listed by the refresher (see UpstreamAs),
// once however often it is asked until it was.
func (c *Recorder) refresh(k store.ViewKey) {
	if c.UpstreamAs == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.refreshing[k] {
		return
	}
	select {
	case c.refreshes <- k:
		c.refreshing[k] = true
	default: // many at once: the rest wait for the next reconnect's re-list
	}
}

// refresher re-lists the views refresh queued, at most refreshRate a
// second, until ctx ends.
func (c *Recorder) refresher(ctx context.Context) {
	tick := time.NewTicker(time.Second / refreshRate)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case k := <-c.refreshes:
			if up := c.UpstreamAs(k.Identity); up != nil {
				if _, err := c.relistOne(ctx, k, up); err != nil {
					c.Log.Debug("re-listing a view whose recording was lost failed; it stays stale", "view", k.String(), "err", err)
				}
			}
			c.mu.Lock()
			delete(c.refreshing, k)
			c.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}
}

// refreshRate bounds the views the refresher re-lists a second.
const refreshRate = 5

// flushStale marks remembered views stale in the store (writer only).
func (c *Recorder) flushStale() {
	c.mu.Lock()
	if len(c.stale) == 0 {
		c.mu.Unlock()
		return
	}
	keys := make([]store.ViewKey, 0, len(c.stale))
	for k := range c.stale {
		keys = append(keys, k)
	}
	clear(c.stale)
	c.mu.Unlock()
	if err := c.Store.Update(func(tx *store.Tx) error {
		for _, k := range keys {
			if err := tx.MarkStale(k); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		c.fail("marking views stale", err)
	}
}

// fail logs a store failure once per call site kind; the data already in
// the store stays as it was.
func (c *Recorder) fail(doing string, err error) {
	if c.Metrics != nil {
		c.Metrics.CacheErrors.Inc()
	}
	c.Log.Warn("cache write failed; the view is marked stale", "doing", doing, "err", err)
}

// wasLarge reports a large answer to LargeAnswer.
func (c *Recorder) wasLarge() {
	if c.LargeAnswer != nil {
		c.LargeAnswer()
	}
}

func objectsSize(objs []store.Object) int {
	n := 0
	for _, o := range objs {
		n += len(o.Data) + len(o.Proto)
	}
	return n
}
