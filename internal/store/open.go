package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// lockTimeout bounds how long Open waits for another process, such as an
// outpost still shutting down, to release the file.
var lockTimeout = 5 * time.Second

// initialMmapSize is mapped up front so that the file can grow to it
// without bbolt remapping, which waits for every reading transaction: a
// long offline LIST would otherwise stall the recording of a large list.
// It costs address space, not memory.
const initialMmapSize = 1 << 30

// Open opens the store file at path, creating it (mode 0600) if needed.
//
// A file that is not a bbolt database, is damaged where Open looks (its
// meta pages, its free list, the ends of each bucket), is shorter than its
// own pages (truncated), or carries an unknown format version is renamed to
// "<path>.corrupt-<unix time>", logged once, and replaced by an empty
// store: the cache refills itself, whereas refusing to start would turn one
// bad file into a node that cannot recover. With Options.Sealer it is
// deleted instead, and so are files moved aside before: they may hold
// Secrets in clear. Open does not read every
// page (that would cost seconds on a large store at every start); a
// damaged page it did not read surfaces later as ErrCorrupt, and Run heals
// it.
//
// Open then applies Options.Sealer: see there.
//
// Open returns an error only when the file cannot be used at all:
// permissions, a full or failing disk (wrapped *fs.PathError or errno), or
// ErrLocked.
func Open(path string, opts Options) (*Store, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	sl := newSealing(opts)
	if sl != nil {
		if err := removeAsides(path, log); err != nil {
			return nil, err
		}
	}
	// What a rebuild interrupted by a crash left (see Run).
	if err := os.Remove(path + rebuildSuffix); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("removing an unfinished rebuild of the store file: %w", err)
	}
	db, bad, err := openDB(path, opts, sl, log)
	if err != nil {
		return nil, err
	}
	if bad != nil {
		if sl != nil {
			if err := os.Remove(path); err != nil {
				return nil, fmt.Errorf("removing unusable store file: %w", err)
			}
			log.Warn("store file is unusable: removed it (encryption is on, so it is not kept) and starting with an empty cache",
				"path", path, "reason", bad.Error())
		} else {
			aside, err := moveAside(path)
			if err != nil {
				return nil, fmt.Errorf("moving unusable store file aside: %w", err)
			}
			log.Warn("store file is unusable: moved it aside and starting with an empty cache",
				"path", path, "movedTo", aside, "reason", bad.Error())
		}
		if db, bad, err = openDB(path, opts, sl, log); err != nil {
			return nil, err
		}
		if bad != nil {
			return nil, fmt.Errorf("opening new store file %s: %w", path, bad)
		}
	}
	return newStore(db, path, opts, sl, log), nil
}

// openDB opens and checks the file. bad says why the file is unusable; err
// is an I/O failure.
func openDB(path string, opts Options, sl *sealing, log *slog.Logger) (db *bolt.DB, bad, err error) {
	// Open the file ourselves first: bbolt's errors do not tell a file we
	// may not read from one that is damaged, and only the latter may be
	// moved aside.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("opening store file: %w", err)
	}
	info, err := f.Stat()
	if err == nil && !info.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file", path)
	}
	if err == nil && info.Mode().Perm()&0o077 != 0 {
		// The cache holds Secrets.
		err = f.Chmod(0o600)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, nil, fmt.Errorf("opening store file: %w", err)
	}

	db, err = openBolt(path, opts)
	switch {
	case err == nil:
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, nil, fmt.Errorf("opening store file %s: %w", path, ErrLocked)
	case isIOError(err):
		return nil, nil, fmt.Errorf("opening store file: %w", err)
	default:
		return nil, err, nil
	}
	fresh, bad, err := check(db)
	if err == nil && bad == nil && fresh {
		err = db.Update(create)
	}
	if err == nil && bad == nil {
		db, bad, err = reseal(db, opts, sl, log, fresh)
	}
	if err == nil && bad == nil {
		err = checkProtos(db, log)
	}
	if err != nil || bad != nil {
		// A file bbolt has opened closes cleanly, whatever its pages hold.
		if db != nil {
			_ = db.Close()
		}
		if err != nil {
			return nil, nil, fmt.Errorf("opening store file %s: %w", path, err)
		}
		return nil, bad, nil
	}
	return db, nil, nil
}

func openBolt(path string, opts Options) (db *bolt.DB, err error) {
	// bbolt reads the meta pages and the free list while opening; on a
	// damaged or truncated file that may panic or fault. Either way the file
	// is unusable. (The half-opened file descriptor leaks; this happens at
	// most once per bad file.)
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			db, err = nil, fmt.Errorf("bbolt panicked while opening: %v", r)
		}
	}()
	bo := &bolt.Options{
		Timeout:      lockTimeout,
		NoSync:       opts.NoSync,
		NoGrowSync:   opts.NoSync,
		FreelistType: bolt.FreelistMapType,
		// The free list is written at every commit: rebuilding it instead
		// would make Open walk every page, in a goroutine where a fault on a
		// damaged file cannot be recovered.
		NoFreelistSync: false,
	}
	if math.MaxInt > math.MaxInt32 {
		bo.InitialMmapSize = initialMmapSize
	}
	return bolt.Open(path, 0o600, bo)
}

// isIOError tells a failure of the machine (permissions, a full or failing
// disk, memory) from a complaint about the file's contents.
func isIOError(err error) bool {
	var pathErr *fs.PathError
	var errno syscall.Errno
	return errors.As(err, &pathErr) || errors.As(err, &errno)
}

// check looks at the file cheaply: its size against its pages, the format
// version, every bucket and the records at both ends of each. fresh is set
// for a database without buckets, which Open then sets up.
func check(db *bolt.DB) (fresh bool, bad, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			bad = fmt.Errorf("bbolt panicked while reading: %v", r)
		}
	}()
	info, err := os.Stat(db.Path())
	if err != nil {
		return false, nil, err
	}
	bad = db.View(func(tx *bolt.Tx) error {
		if info.Size() < tx.Size() {
			return fmt.Errorf("file is %d bytes but its pages need %d: truncated", info.Size(), tx.Size())
		}
		meta := tx.Bucket(bucketMeta)
		if meta == nil {
			empty := true
			_ = tx.ForEach(func([]byte, *bolt.Bucket) error {
				empty = false
				return nil
			})
			if empty {
				fresh = true
				return nil
			}
			return errors.New("no meta bucket: not an outpost store")
		}
		switch v, seal := meta.Get(metaFormat), meta.Get(metaSeal); {
		case string(v) == formatVersion && seal == nil, string(v) == formatSealed && seal != nil:
		case string(v) == formatVersion || string(v) == formatSealed:
			return fmt.Errorf("format version %q does not match the encryption record", v)
		default:
			return fmt.Errorf("unknown format version %q (this outpost reads %q and %q)", v, formatVersion, formatSealed)
		}
		for _, name := range [][]byte{bucketObjects, bucketMembers, bucketViews, bucketDocs, bucketProtos} {
			b := tx.Bucket(name)
			if b == nil && string(name) == string(bucketProtos) {
				continue // a file from before it; Open adds it
			}
			if b == nil {
				return fmt.Errorf("no %s bucket", name)
			}
			c := b.Cursor()
			k1, v1 := c.First()
			k2, v2 := c.Last()
			if err := checkRecord(name, k1, v1); err != nil {
				return err
			}
			if err := checkRecord(name, k2, v2); err != nil {
				return err
			}
		}
		return nil
	})
	return fresh, bad, nil
}

func checkRecord(bucket, k, v []byte) error {
	if k == nil {
		return nil
	}
	var err error
	switch string(bucket) {
	case string(bucketObjects):
		_, _, err = objectHeader(v)
	case string(bucketViews):
		if _, err = decodeViewKey(k); err == nil {
			_, err = decodeView(v)
		}
	case string(bucketProtos):
		r := reader{b: v}
		r.bytes("protobuf record")
		err = r.err
	}
	if err != nil {
		return fmt.Errorf("%s bucket: %w", bucket, err)
	}
	return nil
}

// create sets up a new store.
func create(tx *bolt.Tx) error {
	for _, name := range [][]byte{bucketMeta, bucketObjects, bucketMembers, bucketViews, bucketDocs, bucketProtos} {
		if _, err := tx.CreateBucket(name); err != nil {
			return fmt.Errorf("creating %s bucket: %w", name, err)
		}
	}
	if err := tx.Bucket(bucketMeta).Put(metaFormat, []byte(formatVersion)); err != nil {
		return fmt.Errorf("writing format version: %w", err)
	}
	return stampProtos(tx)
}

// checkProtos empties the protos bucket (adding it to a file from before
// it) unless Store.Update wrote the file last: its stamp in the meta
// bucket is the id of the last transaction it committed. Anything else,
// such as an older outpost that updates objects but knows nothing of their
// protobuf encodings, may have left them behind their objects.
func checkProtos(db *bolt.DB, log *slog.Logger) error {
	stale := false
	if err := db.View(func(tx *bolt.Tx) error {
		stamp := tx.Bucket(bucketMeta).Get(metaProtosTx)
		stale = tx.Bucket(bucketProtos) == nil || len(stamp) != 8 || binary.BigEndian.Uint64(stamp) != uint64(tx.ID())
		return nil
	}); err != nil || !stale {
		return err
	}
	return db.Update(func(tx *bolt.Tx) error {
		if b := tx.Bucket(bucketProtos); b != nil {
			if n := b.Stats().KeyN; n > 0 {
				log.Info("store file was written by another program: dropped its protobuf copies (answers are encoded from JSON until they are recorded again)", "dropped", n)
			}
			if err := tx.DeleteBucket(bucketProtos); err != nil {
				return err
			}
		}
		if _, err := tx.CreateBucket(bucketProtos); err != nil {
			return err
		}
		return stampProtos(tx)
	})
}

// stampProtos records that this transaction, of a store that keeps every
// protobuf encoding at its object's resourceVersion, is the last to write.
func stampProtos(btx *bolt.Tx) error {
	return btx.Bucket(bucketMeta).Put(metaProtosTx, binary.BigEndian.AppendUint64(nil, uint64(btx.ID())))
}

// removeAsides deletes the files moveAside kept: with encryption on, none
// is kept, since one moved aside before it was turned on holds Secrets in
// clear.
func removeAsides(path string, log *slog.Logger) error {
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		return fmt.Errorf("looking for old store files: %w", err)
	}
	var removed []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), filepath.Base(path)+".corrupt-") {
			aside := filepath.Join(filepath.Dir(path), e.Name())
			if err := os.Remove(aside); err != nil {
				return fmt.Errorf("removing old store file: %w", err)
			}
			removed = append(removed, aside)
		}
	}
	if len(removed) > 0 {
		log.Warn("encryption is on: removed store files kept aside earlier, which may hold Secrets in clear", "files", removed)
	}
	return nil
}

// moveAside renames the file at path out of the way, keeping it for a
// post-mortem.
func moveAside(path string) (string, error) {
	aside, err := asideName(path)
	if err != nil {
		return "", err
	}
	if err := os.Rename(path, aside); err != nil {
		return "", err
	}
	pruneAsides(path)
	return aside, nil
}
