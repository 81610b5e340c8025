package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Sealer encrypts and authenticates values at rest; *seal.Key is the one
// outpost uses.
type Sealer interface {
	// Seal appends the sealed form of plaintext, bound to ad, to dst.
	Seal(dst, plaintext, ad []byte) []byte
	// Open appends the plaintext of sealed to dst; it fails unless sealed
	// was sealed by this key with the same ad and not altered since.
	Open(dst, sealed, ad []byte) ([]byte, error)
	// Fingerprint identifies the key without revealing it.
	Fingerprint() string
}

// SealRule names the data a Sealer encrypts.
type SealRule struct {
	// Resources are ViewKey.Resource values whose objects' Data is sealed,
	// e.g. "/v1/secrets". Labels, field-selector values and the
	// resourceVersion stay in clear: views are selected on them.
	Resources []string
	// DocPrefixes: documents whose key starts with one of these have their
	// body sealed (their content type stays in clear).
	DocPrefixes []string
}

// sealing is a Sealer with its rule, as one Store applies them.
type sealing struct {
	s         Sealer
	resources map[string]bool
	rule      SealRule // sorted, without duplicates
	state     []byte   // the meta record of this sealing; see appendSealState
}

// newSealing returns the sealing of opts, or nil when nothing is sealed.
func newSealing(opts Options) *sealing {
	if opts.Sealer == nil {
		return nil
	}
	rule := SealRule{Resources: sortedSet(opts.Sealed.Resources), DocPrefixes: sortedSet(opts.Sealed.DocPrefixes)}
	sl := &sealing{s: opts.Sealer, resources: make(map[string]bool), rule: rule}
	for _, r := range rule.Resources {
		sl.resources[r] = true
	}
	sl.state = appendSealState(nil, opts.Sealer.Fingerprint(), rule)
	return sl
}

func sortedSet(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return slices.Compact(s)
}

// resource reports whether the objects of resource are sealed.
func (sl *sealing) resource(resource string) bool {
	return sl != nil && sl.resources[resource]
}

// doc reports whether the document under key is sealed.
func (sl *sealing) doc(key string) bool {
	if sl == nil {
		return false
	}
	for _, p := range sl.rule.DocPrefixes {
		if strings.HasPrefix(key, p) {
			return true
		}
	}
	return false
}

// Associated data binds each sealed value to where it is stored, so that a
// sealed Secret moved to another key of the file does not open there. The
// first byte keeps objects and documents apart.
const (
	adObject = 'o'
	adDoc    = 'd'
)

// adFor returns the associated data of a value stored under key, in the
// transaction's scratch space.
func (tx *Tx) adFor(kind byte, key []byte) []byte {
	tx.ad = append(append(tx.ad[:0], kind), key...)
	return tx.ad
}

// openData appends the plaintext of sealed data stored under ad to dst. A
// value that does not open is corrupt: Open drops what another key sealed,
// so only a file altered behind our back gets here.
func (tx *Tx) openData(dst, data, ad []byte) ([]byte, error) {
	out, err := tx.seal.s.Open(dst, data, ad)
	if err != nil {
		return nil, fmt.Errorf("%w: sealed data: %w", ErrCorrupt, err)
	}
	return out, nil
}

// appendSealState encodes a sealing for the meta bucket:
//
//	version byte (1) | lp(key fingerprint)
//	| uvarint n, n × lp(resource) | uvarint m, m × lp(doc prefix)
//
// A store without the record holds nothing sealed.
func appendSealState(dst []byte, fingerprint string, rule SealRule) []byte {
	dst = append(dst, 1)
	dst = appendString(dst, fingerprint)
	for _, list := range [][]string{rule.Resources, rule.DocPrefixes} {
		dst = binary.AppendUvarint(dst, uint64(len(list)))
		for _, s := range list {
			dst = appendString(dst, s)
		}
	}
	return dst
}

func decodeSealState(b []byte) (fingerprint string, rule SealRule, err error) {
	r := reader{b: b}
	if v := r.byte("seal state"); r.err == nil && v != 1 {
		return "", rule, fmt.Errorf("%w: seal state version %d", ErrCorrupt, v)
	}
	fingerprint = string(r.bytes("seal state"))
	for _, list := range []*[]string{&rule.Resources, &rule.DocPrefixes} {
		n := r.uvarint("seal state")
		if n > uint64(len(r.b)) {
			r.fail("seal state")
		}
		for i := uint64(0); i < n && r.err == nil; i++ {
			*list = append(*list, string(r.bytes("seal state")))
		}
	}
	if r.err == nil && len(r.b) != 0 {
		r.fail("seal state")
	}
	return fingerprint, rule, r.err
}

// reseal brings an open, checked file to the sealing sl when the file was
// written with another one (recorded in the meta bucket; none = nothing
// sealed), in one transaction:
//
//   - Every object of a resource sealed before or now is deleted, with
//     every view of that resource and their members, and so is every
//     document under a prefix sealed before or now. Those records are
//     either sealed with a key we no longer have, sealed when they must
//     now be served in clear, or in clear when they must now be sealed.
//     The rest of the cache is kept; the deleted views refill online.
//   - The new sealing is recorded, and the format version follows it (see
//     formatSealed).
//
// When fresh is false, the transaction also leaves a mark, and the file is
// then rewritten without its free pages (scrub): bbolt does not clear the
// pages of deleted records, which would keep plaintext Secrets in the file
// after encryption was turned on. The mark makes a crash before the
// rewrite redo it at the next Open. With the same sealing and no mark,
// reseal only reads.
func reseal(db *bolt.DB, opts Options, sl *sealing, log *slog.Logger, fresh bool) (out *bolt.DB, bad, err error) {
	// As in check: a damaged page makes bbolt panic or fault.
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			out, bad, err = db, fmt.Errorf("bbolt panicked while applying encryption settings: %v", r), nil
		}
	}()
	var want []byte
	if sl != nil {
		want = sl.state
	}
	var same, pending bool
	if err := db.View(func(btx *bolt.Tx) error {
		meta := btx.Bucket(bucketMeta)
		same = bytes.Equal(meta.Get(metaSeal), want)
		pending = meta.Get(metaScrub) != nil
		return nil
	}); err != nil {
		return db, nil, err
	}
	if !same {
		var deleted purged
		var from string
		err := db.Update(func(btx *bolt.Tx) error {
			var err error
			from, deleted, err = resealTx(btx, want, sl, !fresh)
			return err
		})
		switch {
		case err == nil:
		case errors.Is(err, ErrCorrupt) || !isIOError(err):
			return db, err, nil
		default:
			return db, nil, err
		}
		if !fresh {
			to := "none"
			if sl != nil {
				to = sl.s.Fingerprint()
			}
			log.Warn("store encryption settings changed: dropped every cached object and document they cover (they refill online) and rewriting the file",
				"path", db.Path(), "fromKey", from, "toKey", to, "objects", deleted.objects, "views", deleted.views, "documents", deleted.docs)
			pending = true
		}
	}
	if !pending {
		return db, nil, nil
	}
	return scrub(db, opts)
}

// resealTx is the transaction of reseal. from is the fingerprint of the
// old key, or "none".
func resealTx(btx *bolt.Tx, want []byte, sl *sealing, mark bool) (from string, deleted purged, err error) {
	meta := btx.Bucket(bucketMeta)
	from = "none"
	var drop SealRule
	if old := meta.Get(metaSeal); old != nil {
		fp, rule, err := decodeSealState(old)
		if err != nil {
			return "", deleted, err
		}
		from, drop = fp, rule
	}
	if sl != nil {
		drop.Resources = append(drop.Resources, sl.rule.Resources...)
		drop.DocPrefixes = append(drop.DocPrefixes, sl.rule.DocPrefixes...)
	}
	if deleted, err = purge(btx, drop); err != nil {
		return "", deleted, err
	}
	format := formatVersion
	if want == nil {
		err = meta.Delete(metaSeal)
	} else {
		format = formatSealed
		err = meta.Put(metaSeal, want)
	}
	if err == nil {
		err = meta.Put(metaFormat, []byte(format))
	}
	if err == nil && mark {
		err = meta.Put(metaScrub, []byte{1})
	}
	if err != nil {
		return "", deleted, fmt.Errorf("recording encryption settings: %w", err)
	}
	return from, deleted, nil
}

// purged counts what purge deleted.
type purged struct{ objects, views, docs int }

// purge deletes every object and view of rule's resources and every
// document under its prefixes, keeping the meta counters right. Keys are
// collected before deleting: bbolt's cursors may skip keys when the
// bucket changes under them.
func purge(btx *bolt.Tx, rule SealRule) (purged, error) {
	var n purged
	objects, members, views, docs := btx.Bucket(bucketObjects), btx.Bucket(bucketMembers), btx.Bucket(bucketViews), btx.Bucket(bucketDocs)
	collect := func(b *bolt.Bucket, prefix []byte, fn func(k, v []byte) error) ([][]byte, error) {
		var keys [][]byte
		c := b.Cursor()
		for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			if fn != nil {
				if err := fn(k, v); err != nil {
					return nil, err
				}
			}
			keys = append(keys, bytes.Clone(k))
		}
		return keys, nil
	}
	del := func(b *bolt.Bucket, keys [][]byte) error {
		for _, k := range keys {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		return nil
	}
	for _, resource := range sortedSet(rule.Resources) {
		prefix := resourcePrefix(resource)
		var ids [][]byte
		viewKeys, err := collect(views, prefix, func(_, v []byte) error {
			rec, err := decodeView(v)
			if err != nil {
				return fmt.Errorf("views of %s: %w", resource, err)
			}
			ids = append(ids, binary.BigEndian.AppendUint64(nil, rec.id))
			return nil
		})
		if err != nil {
			return n, err
		}
		for _, id := range ids {
			memberKeys, _ := collect(members, id, nil)
			if err := del(members, memberKeys); err != nil {
				return n, fmt.Errorf("deleting members of %s views: %w", resource, err)
			}
		}
		if err := del(views, viewKeys); err != nil {
			return n, fmt.Errorf("deleting views of %s: %w", resource, err)
		}
		objectKeys, _ := collect(objects, prefix, nil)
		if err := del(objects, objectKeys); err != nil {
			return n, fmt.Errorf("deleting objects of %s: %w", resource, err)
		}
		if protos := btx.Bucket(bucketProtos); protos != nil {
			// Kept while the resource was not sealed.
			protoKeys, _ := collect(protos, prefix, nil)
			if err := del(protos, protoKeys); err != nil {
				return n, fmt.Errorf("deleting protobuf encodings of %s: %w", resource, err)
			}
		}
		n.views += len(viewKeys)
		n.objects += len(objectKeys)
	}
	for _, prefix := range sortedSet(rule.DocPrefixes) {
		keys, _ := collect(docs, []byte(prefix), nil)
		if err := del(docs, keys); err != nil {
			return n, fmt.Errorf("deleting documents %q: %w", prefix, err)
		}
		n.docs += len(keys)
	}
	meta := btx.Bucket(bucketMeta)
	for _, c := range []struct {
		name []byte
		n    int
	}{{metaObjects, n.objects}, {metaViews, n.views}} {
		if c.n == 0 {
			continue
		}
		var v uint64
		if b := meta.Get(c.name); len(b) == 8 {
			v = binary.BigEndian.Uint64(b)
		}
		v -= min(v, uint64(c.n))
		if err := meta.Put(c.name, binary.BigEndian.AppendUint64(nil, v)); err != nil {
			return n, fmt.Errorf("writing %s counter: %w", c.name, err)
		}
	}
	return n, nil
}

// scrubSuffix names the copy scrub writes next to the store file.
const scrubSuffix = ".scrub"

// scrub rewrites the store file with only its live records (bbolt's
// Compact into a new file, then a rename over the old one), so that
// nothing deleted before survives in free pages, and clears the mark
// reseal left. It returns the reopened file. On failure the old file is
// left as it was, mark included, and is returned still open.
//
// The old file's blocks go back to the file system, which does not wipe
// them: on a disk that held plaintext, rotate the Secrets.
func scrub(db *bolt.DB, opts Options) (_ *bolt.DB, bad, err error) {
	path := db.Path()
	tmp := path + scrubSuffix
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return db, nil, fmt.Errorf("removing old store copy: %w", err)
	}
	dst, err := bolt.Open(tmp, 0o600, &bolt.Options{Timeout: lockTimeout, NoSync: true, NoGrowSync: true, FreelistType: bolt.FreelistMapType})
	if err != nil {
		return db, nil, fmt.Errorf("creating store copy: %w", err)
	}
	// Commit every 64 MiB: one transaction would hold the whole store in
	// memory.
	err = bolt.Compact(dst, db, 64<<20)
	if err == nil {
		err = dst.Update(func(btx *bolt.Tx) error { return btx.Bucket(bucketMeta).Delete(metaScrub) })
	}
	if err == nil && !opts.NoSync {
		err = dst.Sync()
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(tmp)
		return db, nil, fmt.Errorf("rewriting store file: %w", err)
	}
	if err := db.Close(); err != nil {
		_ = os.Remove(tmp)
		return nil, nil, fmt.Errorf("rewriting store file: closing: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return nil, nil, fmt.Errorf("rewriting store file: %w", err)
	}
	if !opts.NoSync {
		if err := syncDir(filepath.Dir(path)); err != nil {
			return nil, nil, fmt.Errorf("rewriting store file: %w", err)
		}
	}
	db, err = openBolt(path, opts)
	switch {
	case err == nil:
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, nil, fmt.Errorf("reopening store file %s: %w", path, ErrLocked)
	case isIOError(err):
		return nil, nil, fmt.Errorf("reopening store file: %w", err)
	default:
		return nil, err, nil
	}
	return db, nil, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
