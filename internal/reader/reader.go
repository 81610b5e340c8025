// Package reader answers reads from the store when no apiserver can: get,
// list and watch with the apiserver's rules (label and field selectors,
// limit/continue, resourceVersion matching, bookmarks and the WatchList
// initial-events-end bookmark), in the encoding the client asked for
// (JSON, protobuf, CBOR, PartialObjectMetadata, Table), plus the
// discovery, OpenAPI and Table documents the recorder kept. A caller is
// answered only from its own views, or a broader view of the same
// identity filtered here: what the apiserver let that identity read
// online. It is what lets a node component restart while the cloud is
// unreachable and get back exactly what it saw before: "stale but
// previously-valid state" instead of nothing.
//
// It reads what package recorder wrote, and sees this node's own writes
// through Local (package local).
package reader

import (
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/outposthq/outpost/internal/store"
)

// ServedByHeader marks answers that came from the cache.
const ServedByHeader = "X-Outpost-Served-By"

// Local is what the reader shows of this node's local writes (package
// local's overlays): objects written offline replace the stored ones.
type Local interface {
	// Has reports whether any object of resource was written locally.
	Has(resource string) bool
	// Apply returns o as written locally, if it was.
	Apply(resource string, o store.Object) store.Object
	// Get returns an object written locally, with its kind and apiVersion.
	Get(resource, ns, name string) (o store.Object, kind, apiVersion string, ok bool)
	// Since returns the objects of resource written after the write
	// numbered seq, the last number, and a channel closed at the next.
	Since(resource string, seq uint64) ([]store.Object, uint64, <-chan struct{})
}

// Reader answers from Store. Set the fields, then use it; it must not be
// changed afterwards. It starts nothing.
type Reader struct {
	Store *store.Store
	// Local is this node's local writes. Required.
	Local Local
	// Online reports whether the cloud is reachable, and Changed returns a
	// channel closed at the next change; offline watches end when it
	// returns. Nil: offline watches run until their timeout.
	Online  func() bool
	Changed func() <-chan struct{}
	// BookmarkInterval is how often an offline watch sends a BOOKMARK when
	// the client allows them. Default 5s.
	BookmarkInterval time.Duration
	// LargeAnswer, if set, is called after an answer of memory.LargeAnswer
	// bytes or more was served (see memory.Releaser.Large).
	LargeAnswer func()

	// wholeLists counts the whole-view lists being answered, and assemble
	// bounds the large answers assembled at once (stream.go).
	wholeLists   atomic.Int32
	assembleOnce sync.Once
	assemble     *semaphore.Weighted
}

// wasLarge reports a large answer to LargeAnswer.
func (rd *Reader) wasLarge() {
	if rd.LargeAnswer != nil {
		rd.LargeAnswer()
	}
}
