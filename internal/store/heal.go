package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
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
// make the store copy itself without end. A rebuild, or a failed one, that
// comes within twice the gap of the one before doubles it, up to
// maxRebuildGap.
var rebuildGap = 30 * time.Second

const maxRebuildGap = 30 * time.Minute

// rebuildBatch bounds the objects copied in one transaction of a rebuild.
const rebuildBatch = 4096

// rebuildSuffix names the file a rebuild writes before it takes the
// store's place.
const rebuildSuffix = ".rebuild"

// keptAside is how many damaged files are kept beside the store, newest
// first, for a post-mortem: a disk that keeps failing must not fill up
// with them.
const keptAside = 2

// A Loss is what a rebuild could not copy.
type Loss struct {
	// Views are the views dropped because something of theirs did not
	// read: their record, a member or an object.
	Views []ViewKey
	// Unnamed is set when records of the views bucket itself did not
	// read: views were dropped whose keys are not known. Whoever knows of
	// views (the recorder) must look for those no longer stored.
	Unnamed bool
	// Docs is how many documents did not read; with DocsUnnamed, more
	// did, on a damaged page of the documents bucket.
	Docs        int
	DocsUnnamed bool
}

// Run looks after the file until ctx is done. It first reads every page
// (in the background: the store serves meanwhile) and rebuilds the file if
// one does not read; then it rebuilds the file whenever a transaction
// finds it damaged. A transaction that only panicked (a damaged page, or
// a bug of its caller) leads to a rebuild only when a full read of the
// file, records decoded, finds damage.
//
// A rebuild copies into a new file every view whose metadata, members and
// objects all read, with its objects, and every document (the offline
// journal, grants, identities) that reads and decodes; it swaps the new
// file in, and keeps the old one as "<path>.corrupt-<unix time>" (at most
// keptAside of them; with a Sealer, none, as Open does). Writers wait
// while it copies; readers do not. A view that lost anything is not
// copied at all, since serving it would serve a partial list: lost is
// told, for the caller to fetch such views again. Run returns nil when
// ctx is done; a read-only store cannot be healed.
func (s *Store) Run(ctx context.Context, lost func(Loss)) error {
	if s.readOnly {
		return errors.New("a store opened read-only cannot be healed")
	}
	if err := s.scan(ctx, false); errors.Is(err, ErrCorrupt) {
		s.damage(true)
	}
	gap := rebuildGap
	var last, scanned time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.damaged:
		}
		if !s.certain.Swap(false) {
			// Only panics: the damage must show in a full read first,
			// at most once per rebuildGap (a caller that panics at every
			// call must not make the store read itself without end).
			if time.Since(scanned) < rebuildGap {
				continue
			}
			scanned = time.Now()
			err := s.scan(ctx, true)
			if ctx.Err() != nil {
				return nil
			}
			if !errors.Is(err, ErrCorrupt) {
				s.log.Debug("a store transaction panicked, but the file reads whole: not rebuilt", "err", err)
				continue
			}
		}
		if wait := time.Until(last.Add(gap)); wait > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
		}
		if !last.IsZero() && time.Since(last) < 2*gap {
			gap = min(2*gap, maxRebuildGap)
		} else {
			gap = rebuildGap
		}
		last = time.Now()
		r, old, err := s.rebuild()
		if err != nil {
			s.log.Error("store file is damaged and rebuilding it failed: reads of the damaged part fail until the next attempt",
				"path", s.path, "err", err, "nextAttemptAfter", gap)
			continue
		}
		// Tokens sent while it copied are for the file replaced.
		select {
		case <-s.damaged:
		default:
		}
		s.certain.Store(false)
		s.log.Warn("store file was damaged: rebuilt it from what still reads; the views that lost objects are fetched again",
			"path", s.path, "movedTo", r.aside, "views", r.views, "viewsLost", len(r.loss.Views), "viewsLostUnnamed", r.loss.Unnamed,
			"objects", r.objects, "docs", r.docs, "docsLost", r.loss.Docs, "docsLostUnnamed", r.loss.DocsUnnamed,
			"took", time.Since(last).Round(time.Millisecond))
		if lost != nil && (len(r.loss.Views) > 0 || r.loss.Unnamed) {
			lost(r.loss)
		}
		// Last, and outside the writers' lock: Close waits for the
		// reading transactions begun on the old file, and one of them
		// may be about to write.
		if err := old.Close(); err != nil {
			s.log.Warn("closing the damaged store file", "err", err)
		}
	}
}

// scan reads every record of every bucket and decodes each view's key and
// record and each object's header; deep, it decodes every object and
// document whole, as the rebuild does. It returns ErrCorrupt when a page
// or a record does not read, ctx's error when ctx ends first. It does not
// send Run a token itself.
func (s *Store) scan(ctx context.Context, deep bool) error {
	n := 0
	return s.view(func(btx *bolt.Tx) error {
		tx, err := newTx(btx, s.seal)
		if err != nil {
			return err
		}
		defer releasePages(btx)
		return btx.ForEach(func(name []byte, b *bolt.Bucket) error {
			c := b.Cursor()
			for k, v := c.First(); k != nil; k, v = c.Next() {
				if n++; n%4096 == 0 && ctx.Err() != nil {
					return ctx.Err()
				}
				err := checkRecord(name, k, v)
				if err == nil && deep {
					err = tx.checkDeep(name, k, v)
				}
				if err != nil {
					return fmt.Errorf("%w: %w", ErrCorrupt, err)
				}
			}
			return nil
		})
	})
}

// checkDeep decodes an object or a document record whole.
func (tx *Tx) checkDeep(bucket, k, v []byte) error {
	switch string(bucket) {
	case string(bucketObjects):
		r := reader{b: k}
		resource := string(r.bytes("object key"))
		if r.err != nil {
			return r.err
		}
		var o Object
		tx.okey = append(tx.okey[:0], k...) // what a sealed record is bound to
		return tx.decodeObject(v, &o, tx.seal.resource(resource))
	case string(bucketDocs):
		_, _, err := tx.decodeDoc(k, v)
		return err
	}
	return nil
}

// rebuilt is what one rebuild did.
type rebuilt struct {
	aside                string // where the old file went ("" deleted)
	views, objects, docs int    // copied
	loss                 Loss
}

// rebuild copies what reads of the file into a new one and swaps it in.
// old is the file replaced, for the caller to close once writers may go
// on.
func (s *Store) rebuild() (r rebuilt, old *bolt.DB, err error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	tmp := s.path + rebuildSuffix
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return r, nil, fmt.Errorf("removing an unfinished rebuild: %w", err)
	}
	ndb, bad, err := openDB(tmp, s.opts, s.seal, s.log)
	if err == nil && bad != nil {
		err = bad
	}
	if err != nil {
		_ = os.Remove(tmp)
		return r, nil, fmt.Errorf("creating the new file: %w", err)
	}
	dst := newStore(ndb, tmp, s.opts, s.seal, s.log)
	if err := s.copyInto(dst, &r); err != nil {
		_ = ndb.Close()
		_ = os.Remove(tmp)
		return r, nil, fmt.Errorf("copying into the new file: %w", err)
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
	if err != nil {
		_ = ndb.Close()
		_ = os.Remove(tmp)
		if r.aside != "" {
			_ = os.Remove(r.aside)
		}
		return r, nil, fmt.Errorf("putting the new file in place: %w", err)
	}
	// The new file has the name now: from here on it is the store, even
	// if the rename may not survive a crash of the machine.
	if err := syncDir(filepath.Dir(s.path)); err != nil {
		s.log.Warn("the rebuilt store file may not keep its name across a crash of the machine", "err", err)
	}
	if r.aside != "" {
		pruneAsides(s.path)
	}
	old = s.db.Swap(ndb)
	return r, old, nil
}

// copyInto copies into dst every document and every view of s that reads
// whole, recording in r what it copied and lost.
func (s *Store) copyInto(dst *Store, r *rebuilt) error {
	docs, whole := s.salvage(bucketDocs)
	r.loss.DocsUnnamed = !whole
	type doc struct {
		key, ct string
		body    []byte
	}
	var good []doc
	for _, d := range docs {
		var ct string
		var body []byte
		err := s.view(func(btx *bolt.Tx) error {
			tx, err := newTx(btx, s.seal)
			if err != nil {
				return err
			}
			ct, body, err = tx.decodeDoc(d[0], d[1])
			return err
		})
		if err != nil {
			r.loss.Docs++
			continue
		}
		good = append(good, doc{string(d[0]), ct, body})
	}
	if err := dst.Update(func(tx *Tx) error {
		for _, d := range good {
			if err := tx.PutDoc(d.key, d.ct, d.body); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return err
	}
	r.docs = len(good)

	views, whole := s.salvage(bucketViews)
	r.loss.Unnamed = !whole
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
			// A key that does not decode names no view: the views
			// whose keys were lost are unnamed.
			r.loss.Unnamed = true
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
			r.loss.Views = append(r.loss.Views, k)
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

// pruneAsides removes the damaged files kept beside path but the newest
// keptAside.
func pruneAsides(path string) {
	asides, _ := filepath.Glob(path + ".corrupt-*")
	if len(asides) <= keptAside {
		return
	}
	type aside struct {
		name string
		at   time.Time
	}
	var all []aside
	for _, a := range asides {
		if info, err := os.Lstat(a); err == nil {
			all = append(all, aside{a, info.ModTime()})
		}
	}
	slices.SortFunc(all, func(a, b aside) int { return b.at.Compare(a.at) })
	for _, a := range all[min(keptAside, len(all)):] {
		_ = os.Remove(a.name)
	}
}
