package store

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Options configures Open. The zero value is the production setting.
type Options struct {
	// Logger receives the one line Open writes when it moves an unusable
	// file aside. If nil, nothing is logged.
	Logger *slog.Logger
	// NoSync skips fsync on commit: a crash of the machine (not of the
	// process) can then lose or corrupt the store. For tests and
	// benchmarks only.
	NoSync bool

	// Sealer, when set, encrypts at rest the data Sealed names: the Data
	// of its resources' objects and the bodies of its documents. Every
	// method seals on write and opens on read, so callers see plaintext.
	// A sealed value that does not open is ErrCorrupt. If nil, nothing is
	// sealed.
	//
	// The store records which key (by fingerprint) and rule it was written
	// with. When Open finds another one — a new key, encryption turned on
	// over data stored in clear, or turned off over sealed data, or another
	// rule — it deletes every object, view and document that either rule
	// covers, logs once, keeps the rest of the cache, and rewrites the file
	// so that no deleted plaintext lingers in its free pages. And with a
	// Sealer, an unusable file is deleted rather than moved aside, since
	// it may hold Secrets in clear.
	Sealer Sealer
	// Sealed names what Sealer seals; it has no effect without a Sealer.
	Sealed SealRule
}

// Store is the durable cache of objects and views. It is safe for
// concurrent use: bbolt runs one writing transaction at a time and any
// number of reading ones, each on a consistent snapshot.
type Store struct {
	// db is the open file. Run replaces it with a rebuilt one (see
	// rebuild); a reading transaction begun on the one it replaced finishes
	// there.
	db       atomic.Pointer[bolt.DB]
	path     string
	opts     Options
	readOnly bool
	log      *slog.Logger
	seal     *sealing // nil: nothing is sealed

	// wmu is held by every writing transaction, and by a rebuild while it
	// copies the file: nothing written meanwhile would reach the copy.
	wmu sync.Mutex
	// damaged gets a token when a transaction finds the file damaged
	// (ErrCorrupt); Run rebuilds it. certain is set when a record did not
	// decode; a panic alone may be a caller's bug, and Run rebuilds only
	// once a scan has found the damage.
	damaged chan struct{}
	certain atomic.Bool
}

func newStore(db *bolt.DB, path string, opts Options, sl *sealing, log *slog.Logger) *Store {
	s := &Store{path: path, opts: opts, log: log, seal: sl, damaged: make(chan struct{}, 1)}
	s.db.Store(db)
	return s
}

// Close closes the store file. Transactions still running finish first.
// Run must have returned.
func (s *Store) Close() error {
	if err := s.db.Load().Close(); err != nil {
		return fmt.Errorf("closing store: %w", err)
	}
	return nil
}

// Path returns the path of the store file.
func (s *Store) Path() string { return s.path }

// Update runs fn in a writing transaction. If fn returns an error, or
// panics, nothing it did is kept; otherwise everything is committed (and
// synced) at once before Update returns.
func (s *Store) Update(fn func(*Tx) error) (err error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	defer s.noticeDamage(&err)
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer recoverCorrupt(&err)
	err = s.db.Load().Update(func(btx *bolt.Tx) error {
		tx, err := newTx(btx, s.seal)
		if err != nil {
			return err
		}
		if err := fn(tx); err != nil {
			return err
		}
		return tx.flush()
	})
	return closedErr(err)
}

// Read runs fn in a reading transaction: everything fn reads comes from
// one consistent snapshot, whatever is committed meanwhile.
func (s *Store) Read(fn func(*Tx) error) (err error) {
	defer s.noticeDamage(&err)
	return s.view(func(btx *bolt.Tx) error {
		tx, err := newTx(btx, s.seal)
		if err != nil {
			return err
		}
		return fn(tx)
	})
}

// view runs fn in a reading transaction of the current file, turning a
// panic into ErrCorrupt. A transaction that could not begin because a
// rebuild closed the file it found begins again on the new one.
func (s *Store) view(fn func(*bolt.Tx) error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer recoverCorrupt(&err)
	for {
		db := s.db.Load()
		err = db.View(fn)
		if !errors.Is(err, bolterrors.ErrDatabaseNotOpen) || s.db.Load() == db {
			return closedErr(err)
		}
	}
}

// noticeDamage hands a transaction's ErrCorrupt to Run, which rebuilds
// the file.
func (s *Store) noticeDamage(err *error) {
	if errors.Is(*err, ErrCorrupt) {
		s.damage(!errors.Is(*err, errPanicked))
	}
}

// damage sends Run a token; certain says a record did not read, rather
// than a transaction panicked.
func (s *Store) damage(certain bool) {
	if certain {
		s.certain.Store(true)
	}
	select {
	case s.damaged <- struct{}{}:
	default:
	}
}

// recoverCorrupt turns a panic inside a transaction into ErrCorrupt. bbolt
// panics (or faults, on a file truncated under its memory map: hence
// SetPanicOnFault around every transaction) when a page is not what it
// expects; an edge gateway must then answer from upstream or with an error,
// not crash and restart into the same page.
func recoverCorrupt(err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("%w: %w: %v", ErrCorrupt, errPanicked, r)
	}
}

// errPanicked marks an ErrCorrupt that was a panic: a damaged page, or a
// bug of the caller's function.
var errPanicked = errors.New("panicked")

func closedErr(err error) error {
	if errors.Is(err, bolterrors.ErrDatabaseNotOpen) {
		return ErrClosed
	}
	return err
}

// The methods below each run one transaction; see the methods of Tx for
// what they do.

// ReplaceView atomically sets view v's metadata and membership to exactly
// objs; see Tx.ReplaceView.
func (s *Store) ReplaceView(v View, objs []Object) error {
	return s.Update(func(tx *Tx) error { return tx.ReplaceView(v, objs) })
}

// Apply applies a batch of watch events in one transaction; see Tx.Apply.
func (s *Store) Apply(events []Event) error {
	return s.Update(func(tx *Tx) error { return tx.Apply(events) })
}

// MarkStale records that an answer for view k was dropped; see
// Tx.MarkStale.
func (s *Store) MarkStale(k ViewKey) error {
	return s.Update(func(tx *Tx) error { return tx.MarkStale(k) })
}

// DeleteView forgets view k; see Tx.DeleteView.
func (s *Store) DeleteView(k ViewKey) error {
	return s.Update(func(tx *Tx) error { return tx.DeleteView(k) })
}

// View returns the metadata of view k.
func (s *Store) View(k ViewKey) (v View, ok bool, err error) {
	err = s.Read(func(tx *Tx) error {
		v, ok, err = tx.View(k)
		return err
	})
	return v, ok, err
}

// Views lists identity's views of resource, for answering a request from a
// broader view of the same identity.
func (s *Store) Views(identity, resource string) (vs []View, err error) {
	err = s.Read(func(tx *Tx) error {
		vs, err = tx.Views(identity, resource)
		return err
	})
	return vs, err
}

// AllViews lists every view, for re-listing everything after a reconnect.
func (s *Store) AllViews() (vs []View, err error) {
	err = s.Read(func(tx *Tx) error {
		vs, err = tx.AllViews()
		return err
	})
	return vs, err
}

// List calls fn for the members of view k from one consistent snapshot;
// see Tx.List.
func (s *Store) List(k ViewKey, after string, limit int, fn func(Object) error) error {
	return s.Read(func(tx *Tx) error { return tx.List(k, after, limit, fn) })
}

// Get returns the stored object of resource with namespace and name.
func (s *Store) Get(resource, namespace, name string) (o Object, ok bool, err error) {
	err = s.Read(func(tx *Tx) error {
		o, ok, err = tx.Get(resource, namespace, name)
		return err
	})
	return o, ok, err
}

// PutDoc stores a non-resource answer (discovery, /version, OpenAPI) under
// key, replacing any earlier one.
func (s *Store) PutDoc(key, contentType string, body []byte) error {
	return s.Update(func(tx *Tx) error { return tx.PutDoc(key, contentType, body) })
}

// Doc returns the document stored under key.
func (s *Store) Doc(key string) (contentType string, body []byte, ok bool, err error) {
	err = s.Read(func(tx *Tx) error {
		contentType, body, ok, err = tx.Doc(key)
		return err
	})
	return contentType, body, ok, err
}

// Stats returns how many objects and views the store holds.
func (s *Store) Stats() (objects, views int, err error) {
	err = s.Read(func(tx *Tx) error {
		objects, views = tx.Stats()
		return nil
	})
	return objects, views, err
}

// DeleteDoc removes a document; see Tx.DeleteDoc.
func (s *Store) DeleteDoc(key string) error {
	return s.Update(func(tx *Tx) error { return tx.DeleteDoc(key) })
}

// Docs lists documents by key prefix; see Tx.Docs.
func (s *Store) Docs(prefix string, fn func(key, contentType string, body []byte) error) error {
	return s.Read(func(tx *Tx) error { return tx.Docs(prefix, fn) })
}

// ListData lists members' keys and JSON or protobuf; see Tx.ListData.
func (s *Store) ListData(k ViewKey, after string, limit int, protoFirst bool, fn func(key string, data, proto []byte) error) error {
	return s.Read(func(tx *Tx) error { return tx.ListData(k, after, limit, protoFirst, fn) })
}
