package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Healing a file damaged at runtime.
//
// Open looks at the places bbolt and the format need (see Open) but not at
// every page; a page damaged elsewhere (a bad sector, a stray write) makes
// every transaction that reads it fail with ErrCorrupt, for as long as the
// page stays in use. A view kept fresh by watches is never replaced whole,
// so its pages may stay in use forever. Run heals such a file: it reads
// every page once after Open, and whenever a transaction finds damage, it
// rebuilds the file from what still reads.

// rebuildGap is the least time between two rebuilds: a damage that a
// rebuild cannot remove (a disk failing under the new file too) must not
// make the store copy itself without end. Each failed rebuild doubles it,
// up to maxRebuildGap.
var rebuildGap = 30 * time.Second

const maxRebuildGap = 30 * time.Minute

// rebuildBatch bounds the objects copied in one transaction of a rebuild.
const rebuildBatch = 4096

// Run looks after the file until ctx is done. It first reads every page
// (in the background: the store serves meanwhile) and rebuilds the file if
// one does not read; then it rebuilds the file whenever a transaction
// finds it damaged, at most once per rebuildGap.
//
// A rebuild copies into a new file every view whose metadata, members and
// objects all read, with its objects, and every document (the offline
// journal, grants, identities) that reads; it swaps the new file in, and
// keeps the old one as "<path>.corrupt-<unix time>" (with a Sealer, it is
// deleted, as Open does). Writers wait while it copies; readers do not.
// A view that lost anything is not copied at all, since serving it would
// serve a partial list: lost receives the keys of those views, for the
// caller to fetch them again. Run returns nil when ctx is done; a
// read-only store cannot be healed.
func (s *Store) Run(ctx context.Context, lost func([]ViewKey)) error {
	if s.readOnly {
		return errors.New("a store opened read-only cannot be healed")
	}
	// A damaged page the scan reads sends its token (see noticeDamage).
	_ = s.scan()
	gap := rebuildGap
	var last time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.damaged:
		}
		if wait := time.Until(last.Add(gap)); wait > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
		}
		last = time.Now()
		r, err := s.rebuild()
		if err != nil {
			gap = min(2*gap, maxRebuildGap)
			s.log.Error("store file is damaged and rebuilding it failed: reads of the damaged part fail until the next attempt",
				"path", s.path, "err", err, "nextAttemptAfter", gap)
			continue
		}
		gap = rebuildGap
		// Tokens sent while it copied are for the file replaced.
		select {
		case <-s.damaged:
		default:
		}
		s.log.Warn("store file was damaged: rebuilt it from what still reads; the views that lost objects are fetched again",
			"path", s.path, "movedTo", r.aside, "views", r.views, "viewsLost", len(r.lost), "objects", r.objects,
			"docs", r.docs, "docsWhole", r.docsWhole, "took", time.Since(last).Round(time.Millisecond))
		if len(r.lost) > 0 && lost != nil {
			lost(r.lost)
		}
	}
}

// scan reads every record of every bucket, and decodes each view's key and
// record and each object's header. It returns ErrCorrupt when a page or a
// record does not read.
func (s *Store) scan() (err error) {
	defer s.noticeDamage(&err)
	return s.view(func(btx *bolt.Tx) error {
		return btx.ForEach(func(name []byte, b *bolt.Bucket) error {
			c := b.Cursor()
			for k, v := c.First(); k != nil; k, v = c.Next() {
				if err := checkRecord(name, k, v); err != nil {
					return fmt.Errorf("%w: %w", ErrCorrupt, err)
				}
			}
			return nil
		})
	})
}

// rebuilt is what one rebuild did.
type rebuilt struct {
	aside                string // where the old file went ("" deleted)
	views, objects, docs int    // copied
	docsWhole            bool   // every document read
	lost                 []ViewKey
}

// rebuild copies what reads of the file into a new one and swaps it in.
func (s *Store) rebuild() (r rebuilt, err error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	old := s.db.Load()
	tmp := s.path + ".rebuild"
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return r, fmt.Errorf("removing an unfinished rebuild: %w", err)
	}
	ndb, bad, err := openDB(tmp, s.opts, s.seal, s.log)
	if err == nil && bad != nil {
		err = bad
	}
	if err != nil {
		_ = os.Remove(tmp)
		return r, fmt.Errorf("creating the new file: %w", err)
	}
	dst := newStore(ndb, tmp, s.opts, s.seal, s.log)
	if err := s.copyInto(dst, &r); err != nil {
		_ = ndb.Close()
		_ = os.Remove(tmp)
		return r, fmt.Errorf("copying into the new file: %w", err)
	}
	// The old file is kept under another name before the new one takes
	// its place, atomically: at every moment path names a whole store.
	if s.seal == nil {
		if r.aside, err = asideName(s.path); err == nil {
			err = os.Link(s.path, r.aside)
		}
	}
	if err == nil {
		err = os.Rename(tmp, s.path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(s.path))
	}
	if err != nil {
		_ = ndb.Close()
		_ = os.Remove(tmp)
		if r.aside != "" {
			_ = os.Remove(r.aside)
		}
		return r, fmt.Errorf("putting the new file in place: %w", err)
	}
	s.db.Store(ndb)
	// Close waits for the reading transactions begun on the old file.
	if err := old.Close(); err != nil {
		s.log.Warn("closing the damaged store file", "err", err)
	}
	return r, nil
}

// copyInto copies into dst every document and every view of s that reads
// whole, recording in r what it copied and lost.
func (s *Store) copyInto(dst *Store, r *rebuilt) error {
	docs, whole := s.salvage(bucketDocs)
	r.docsWhole = whole
	if err := dst.Update(func(tx *Tx) error {
		for _, d := range docs {
			// Copied as they are: a sealed body is bound to its key, which
			// stays the same, and the key is the same.
			if err := tx.docs.Put(d[0], d[1]); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return err
	}
	r.docs = len(docs)

	views, _ := s.salvage(bucketViews)
	type entry struct {
		v    View
		objs []Object
	}
	var batch []entry
	n := 0
	flush := func() error {
		err := dst.Update(func(tx *Tx) error {
			for _, e := range batch {
				if err := tx.ReplaceView(e.v, e.objs); err != nil {
					return err
				}
			}
			return nil
		})
		batch, n = batch[:0], 0
		return err
	}
	for _, kv := range views {
		k, err := decodeViewKey(kv[0])
		if err != nil {
			// A key that does not decode names no view one could fetch.
			continue
		}
		var e entry
		var ok bool
		err = s.view(func(btx *bolt.Tx) error {
			tx, err := newTx(btx, s.seal)
			if err != nil {
				return err
			}
			if e.v, ok, err = tx.View(k); err != nil || !ok {
				return err
			}
			return tx.List(k, "", 0, func(o Object) error {
				e.objs = append(e.objs, o)
				return nil
			})
		})
		if err != nil || !ok {
			r.lost = append(r.lost, k)
			continue
		}
		batch = append(batch, e)
		n += len(e.objs)
		r.views++
		r.objects += len(e.objs)
		if n >= rebuildBatch {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if len(batch) > 0 {
		return flush()
	}
	return nil
}

// salvage returns the records of a bucket that read, as key-value pairs.
// A damaged page stops a walk: the records are read from the first one
// forwards and from the last one backwards, which loses only those between
// the two damaged places. whole is false when anything was lost.
func (s *Store) salvage(bucket []byte) (kvs [][2][]byte, whole bool) {
	walk := func(backwards bool, stop []byte, add func(k, v []byte)) error {
		return s.view(func(btx *bolt.Tx) error {
			b := btx.Bucket(bucket)
			if b == nil {
				return fmt.Errorf("%w: no %s bucket", ErrCorrupt, bucket)
			}
			c := b.Cursor()
			next, k, v := c.Next, []byte(nil), []byte(nil)
			if backwards {
				next = c.Prev
				k, v = c.Last()
			} else {
				k, v = c.First()
			}
			for ; k != nil; k, v = next() {
				if stop != nil && bytes.Compare(k, stop) <= 0 {
					return nil
				}
				if err := checkRecord(bucket, k, v); err != nil {
					return fmt.Errorf("%w: %w", ErrCorrupt, err)
				}
				add(bytes.Clone(k), bytes.Clone(v))
			}
			return nil
		})
	}
	err := walk(false, nil, func(k, v []byte) { kvs = append(kvs, [2][]byte{k, v}) })
	if err == nil {
		return kvs, true
	}
	var last []byte
	if len(kvs) > 0 {
		last = kvs[len(kvs)-1][0]
	}
	var tail [][2][]byte
	_ = walk(true, last, func(k, v []byte) { tail = append(tail, [2][]byte{k, v}) })
	for i := len(tail) - 1; i >= 0; i-- {
		kvs = append(kvs, tail[i])
	}
	return kvs, false
}

// asideName is a name for a damaged file kept beside path.
func asideName(path string) (string, error) {
	base := fmt.Sprintf("%s.corrupt-%d", path, time.Now().Unix())
	aside := base
	for i := 1; ; i++ {
		_, err := os.Lstat(aside)
		if errors.Is(err, os.ErrNotExist) {
			return aside, nil
		}
		if err != nil {
			return "", err
		}
		aside = fmt.Sprintf("%s.%d", base, i)
	}
}
