package store

import "errors"

// ErrLocked is returned by Open when another process holds the store file.
// Two outposts on one data directory would corrupt each other's cache, so
// the second one waits a few seconds for the lock and then gives up.
var ErrLocked = errors.New("store file is locked by another process")

// ErrClosed is returned by every method called after Close.
var ErrClosed = errors.New("store is closed")

// ErrCorrupt is returned when a record cannot be decoded, or a transaction
// panics (bbolt does on a page that is not what it expects; the message
// carries the panic value). The answer being built is abandoned rather than
// served half-read; callers treat it as a cache miss. Open moves a file
// that is unusable as a whole aside, but does not read every record, so a
// damaged record deep in a sound file only surfaces here; Run then rebuilds
// the file from what still reads.
var ErrCorrupt = errors.New("store record is corrupt")

// ErrInvalidKey is returned for an object or view that cannot be stored: an
// empty resource or name, or a namespace or name holding "/", which the
// apiserver never allows and which would make member keys ambiguous.
var ErrInvalidKey = errors.New("invalid object or view key")

// ErrInvalidEvent is returned by Apply for an event type other than ADDED,
// MODIFIED, DELETED and BOOKMARK. The whole batch is rolled back.
var ErrInvalidEvent = errors.New("invalid watch event type")
