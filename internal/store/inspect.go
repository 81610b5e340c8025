package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Inspecting a store: `outpost cache` reads a store file without ever
// changing it, and a running outpost hands out consistent copies of its
// own (Snapshot), since bbolt lets only one process open a file at a time.

// ErrSealedNoKey is returned for a sealed value read from a store opened
// without the key that sealed it.
var ErrSealedNoKey = errors.New("sealed with an encryption key that was not given")

// OpenReadOnly opens the store file at path for reading only: it never
// creates, moves aside, rewrites or repairs the file (Open does all of
// these). A file another process holds (a running outpost) gives ErrLocked
// at once; a file that is not a store of this format, ErrCorrupt; a file
// that does not exist, an error matching fs.ErrNotExist. With opts.Sealer
// sealed values are opened as they are by Open; without it, or with another
// key, reading one gives ErrSealedNoKey while everything in clear reads as
// usual.
func OpenReadOnly(path string, opts Options) (s *Store, err error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("opening store file: %w", err)
	}
	if !info.Mode().IsRegular() {
		return nil, fmt.Errorf("opening store file: %s is not a regular file", path)
	}
	db, err := openBoltReadOnly(path)
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("opening store file %s: %w", path, ErrLocked)
	case err != nil && isIOError(err):
		return nil, fmt.Errorf("opening store file: %w", err)
	case err != nil:
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
	}
	fresh, bad, err := check(db)
	if err == nil && bad == nil && fresh {
		bad = errors.New("no buckets: not a store file")
	}
	var sl *sealing
	if err == nil && bad == nil {
		sl, err = readOnlySealing(db, opts)
	}
	if err != nil || bad != nil {
		_ = db.Close()
		if err != nil {
			return nil, fmt.Errorf("opening store file %s: %w", path, err)
		}
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, bad)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	st := newStore(db, path, opts, sl, log)
	st.readOnly = true
	return st, nil
}

func openBoltReadOnly(path string) (db *bolt.DB, err error) {
	// As openBolt: a damaged file may make bbolt panic or fault.
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			db, err = nil, fmt.Errorf("bbolt panicked while opening: %v", r)
		}
	}()
	return bolt.Open(path, 0o400, &bolt.Options{ReadOnly: true, Timeout: 100 * time.Millisecond, FreelistType: bolt.FreelistMapType})
}

// readOnlySealing is the sealing the file records, with opts' key when it
// is the one that sealed it, else with none: sealed values then do not
// open (ErrSealedNoKey).
func readOnlySealing(db *bolt.DB, opts Options) (*sealing, error) {
	var state []byte
	if err := db.View(func(btx *bolt.Tx) error {
		state = bytes.Clone(btx.Bucket(bucketMeta).Get(metaSeal))
		return nil
	}); err != nil || state == nil {
		return nil, err
	}
	fingerprint, rule, err := decodeSealState(state)
	if err != nil {
		return nil, err
	}
	var s Sealer = noKey{}
	if opts.Sealer != nil && opts.Sealer.Fingerprint() == fingerprint {
		s = opts.Sealer
	}
	return newSealing(Options{Sealer: s, Sealed: rule}), nil
}

// noKey stands for the key of a sealed file opened without it.
type noKey struct{}

func (noKey) Seal(dst, _, _ []byte) []byte { return dst }

func (noKey) Open([]byte, []byte, []byte) ([]byte, error) { return nil, ErrSealedNoKey }

func (noKey) Fingerprint() string { return "" }

// Snapshot writes a consistent copy of the whole store file to w, as of
// one reading transaction: writers go on meanwhile. It is how `outpost
// cache` reads the store of a running outpost.
func (s *Store) Snapshot(w io.Writer) (int64, error) {
	var n int64
	err := s.view(func(btx *bolt.Tx) error {
		var err error
		n, err = btx.WriteTo(w)
		return err
	})
	return n, err
}

// A Problem is one inconsistency Verify found.
type Problem struct {
	// Where names the bucket and record.
	Where string `json:"where"`
	What  string `json:"what"`
}

// Verify checks the store file whole: bbolt's own page checks, then that
// every view's members are stored objects, that each object counts exactly
// the views holding it and is held by one, that every stored protobuf
// encoding belongs to a stored object at its resourceVersion, and that the
// counters match. With agree, it also asks whether each protobuf encoding
// is the same object as the JSON stored with it (codec.ProtobufAgrees);
// the store itself does not read either. It stops listing problems after
// max (0: 100). err is for a store it could not read at all.
func (s *Store) Verify(max int, agree func(data, proto []byte) error) (problems []Problem, err error) {
	if max <= 0 {
		max = 100
	}
	add := func(where, format string, args ...any) bool {
		if len(problems) < max {
			problems = append(problems, Problem{Where: where, What: fmt.Sprintf(format, args...)})
		}
		return len(problems) < max
	}
	err = s.db.Load().View(func(btx *bolt.Tx) (err error) {
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("%w: bbolt panicked while reading: %v", ErrCorrupt, r)
			}
		}()
		for cerr := range btx.Check() {
			if !add("file", "%v", cerr) {
				return nil
			}
		}
		tx, err := newTx(btx, s.seal)
		if err != nil {
			return err
		}
		refs := map[string]uint64{} // object key -> views holding it
		views := 0
		c := tx.views.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			views++
			key, kerr := decodeViewKey(k)
			rec, verr := decodeView(v)
			if kerr != nil || verr != nil {
				if !add("views", "undecodable view record %x: %v", k, errors.Join(kerr, verr)) {
					return nil
				}
				continue
			}
			prefix := binary.BigEndian.AppendUint64(nil, rec.id)
			mc := tx.members.Cursor()
			for mk, _ := mc.Seek(prefix); mk != nil && bytes.HasPrefix(mk, prefix); mk, _ = mc.Next() {
				okey := objectKey(nil, key.Resource, string(mk[len(prefix):]))
				if tx.objects.Get(okey) == nil {
					if !add("members", "view %s holds %s, which is not stored", key, mk[len(prefix):]) {
						return nil
					}
					continue
				}
				refs[string(okey)]++
			}
		}
		objects := 0
		oc := tx.objects.Cursor()
		for k, v := oc.First(); k != nil; k, v = oc.Next() {
			objects++
			n, _, herr := objectHeader(v)
			switch {
			case herr != nil:
				if !add("objects", "undecodable object record %q: %v", k, herr) {
					return nil
				}
			case n != refs[string(k)]:
				if !add("objects", "object %q counts %d views holding it; %d do", k, n, refs[string(k)]) {
					return nil
				}
			case n == 0:
				if !add("objects", "object %q is held by no view", k) {
					return nil
				}
			}
		}
		var pc *bolt.Cursor
		if tx.protos != nil { // a file an older outpost wrote has none yet
			pc = tx.protos.Cursor()
		}
		for k, v := first(pc); k != nil; k, v = pc.Next() {
			obj := tx.objects.Get(k)
			r := reader{b: v}
			rv := r.string("protobuf record")
			switch {
			case obj == nil:
				if !add("protos", "protobuf encoding of %q, which is not stored", k) {
					return nil
				}
			case r.err != nil:
				if !add("protos", "undecodable protobuf record of %q: %v", k, r.err) {
					return nil
				}
			default:
				if _, orv, err := objectHeader(obj); err == nil && string(orv) != rv {
					if !add("protos", "protobuf encoding of %q is at resourceVersion %s, the object at %s", k, rv, orv) {
						return nil
					}
					continue
				}
				if agree == nil {
					continue
				}
				data, err := objectData(obj)
				if err == nil {
					err = agree(data, r.b)
				}
				if err != nil && !add("protos", "protobuf encoding of %q is not the object stored: %v", k, err) {
					return nil
				}
			}
		}
		if n := tx.counter(metaObjects); n != int64(objects) {
			add("meta", "the objects counter says %d; %d are stored", n, objects)
		}
		if n := tx.counter(metaViews); n != int64(views) {
			add("meta", "the views counter says %d; %d are stored", n, views)
		}
		return nil
	})
	return problems, err
}

// first is c.First, or nothing for a nil cursor.
func first(c *bolt.Cursor) (k, v []byte) {
	if c == nil {
		return nil, nil
	}
	return c.First()
}
