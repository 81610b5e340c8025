package store

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
)

// Bucket names; doc.go describes what each holds.
var (
	bucketMeta    = []byte("meta")
	bucketObjects = []byte("objects")
	bucketMembers = []byte("members")
	bucketViews   = []byte("views")
	bucketDocs    = []byte("docs")
	bucketProtos  = []byte("protos")

	metaFormat  = []byte("format")
	metaObjects = []byte("objects")
	metaViews   = []byte("views")
	metaSeal    = []byte("seal")
	metaScrub   = []byte("scrub")
	// metaProtosTx is the id of the last transaction Store.Update
	// committed (see checkProtos).
	metaProtosTx = []byte("protos-tx")
)

// formatVersion is the layout version written in the meta bucket. Open moves
// aside a file with any other version: a cache is cheap to refill, and
// guessing at an unknown layout could serve wrong answers.
const formatVersion = "1"

// formatSealed is the format version of a store holding sealed data (see
// Options.Sealer): the same layout, but an outpost that does not know
// sealing would serve sealed bytes as JSON, so it must move such a file
// aside instead.
const formatSealed = "2"

// fillPercent packs the pages of the objects and members buckets. Lists
// arrive sorted, so bbolt's default of one half would leave every page half
// empty; later inserts between full pages only split the pages they hit.
const fillPercent = 0.9

// Tx is one transaction on the store, reading or writing. A Tx is only
// valid inside the function given to Store.Update or Store.Read, and is not
// safe for concurrent use. Write methods on a reading Tx fail.
type Tx struct {
	btx                                 *bolt.Tx
	meta, objects, members, views, docs *bolt.Bucket
	protos                              *bolt.Bucket // nil only before Open adds it
	now                                 time.Time

	// loaded holds every view this transaction has read, by encoded key,
	// so that one view is one *viewState however it was reached.
	loaded map[string]*viewState
	// resources holds the views of each resource this transaction has
	// listed.
	resources map[string]*resourceViews
	last      *viewState // the view last asked for
	// Changes to the counters in the meta bucket, written by flush.
	objectsDelta, viewsDelta int64

	// seal says what is sealed; nil: nothing.
	seal *sealing

	okey, mkey []byte   // scratch keys; bbolt copies keys it keeps
	pkey, prec []byte   // scratch key and record of a protobuf encoding
	rec        []byte   // scratch record; bbolt keeps values, so copied before Put
	keys       []string // scratch for sorting map keys
	ad         []byte   // scratch associated data of a sealed value
	plain      []byte   // scratch plaintext of a sealed value
	sealed     []byte   // scratch sealed record
}

func newTx(btx *bolt.Tx, sl *sealing) (*Tx, error) {
	tx := &Tx{
		btx:       btx,
		seal:      sl,
		meta:      btx.Bucket(bucketMeta),
		objects:   btx.Bucket(bucketObjects),
		members:   btx.Bucket(bucketMembers),
		views:     btx.Bucket(bucketViews),
		docs:      btx.Bucket(bucketDocs),
		protos:    btx.Bucket(bucketProtos),
		now:       time.Now(),
		loaded:    make(map[string]*viewState),
		resources: make(map[string]*resourceViews),
	}
	if tx.meta == nil || tx.objects == nil || tx.members == nil || tx.views == nil || tx.docs == nil || (tx.protos == nil && btx.Writable()) {
		// Open creates them all; only a file changed behind our back lacks
		// one. A file an older outpost wrote lacks protos until Open adds
		// it, which a read-only store (OpenReadOnly) reads without it.
		return nil, fmt.Errorf("%w: missing bucket", ErrCorrupt)
	}
	if btx.Writable() {
		tx.objects.FillPercent = fillPercent
		tx.members.FillPercent = fillPercent
		tx.protos.FillPercent = fillPercent
	}
	return tx, nil
}

// flush writes what the transaction kept in memory: changed view records
// and the counters.
func (tx *Tx) flush() error {
	for _, vs := range tx.loaded {
		if !vs.dirty || vs.deleted {
			continue
		}
		if err := tx.views.Put(vs.enc, appendView(nil, &vs.rec)); err != nil {
			return fmt.Errorf("writing view %s: %w", vs.key, err)
		}
		vs.dirty = false
	}
	if err := tx.addCounter(metaObjects, tx.objectsDelta); err != nil {
		return err
	}
	tx.objectsDelta = 0
	if err := tx.addCounter(metaViews, tx.viewsDelta); err != nil {
		return err
	}
	tx.viewsDelta = 0
	return stampProtos(tx.btx)
}

func (tx *Tx) counter(name []byte) int64 {
	v := tx.meta.Get(name)
	if len(v) != 8 {
		return 0
	}
	return int64(binary.BigEndian.Uint64(v))
}

func (tx *Tx) addCounter(name []byte, delta int64) error {
	if delta == 0 {
		return nil
	}
	n := max(tx.counter(name)+delta, 0)
	if err := tx.meta.Put(name, binary.BigEndian.AppendUint64(nil, uint64(n))); err != nil {
		return fmt.Errorf("writing %s counter: %w", name, err)
	}
	return nil
}

// Stats returns how many objects and views the store holds, as of this
// transaction.
func (tx *Tx) Stats() (objects, views int) {
	return int(tx.counter(metaObjects) + tx.objectsDelta), int(tx.counter(metaViews) + tx.viewsDelta)
}

// viewState is a view as one transaction sees it; its record is written
// back by flush when dirty.
type viewState struct {
	key     ViewKey
	enc     []byte // key in the views bucket
	rec     viewRecord
	prefix  [8]byte // prefix of its keys in the members bucket: rec.id
	m       *matcher
	dirty   bool
	deleted bool
	created bool // by this transaction, and not yet listed or watched
}

func (vs *viewState) matcher() *matcher {
	if vs.m == nil {
		vs.m = newMatcher(vs.key)
	}
	return vs.m
}

// advance moves the view's resourceVersion forward to rv.
func (vs *viewState) advance(rv string) {
	if rv == "" || newerRV([]byte(vs.rec.rv), []byte(rv)) || vs.rec.rv == rv {
		return
	}
	vs.rec.rv = rv
	vs.dirty = true
}

func (vs *viewState) view() View {
	return View{
		Key:             vs.key,
		ResourceVersion: vs.rec.rv,
		Kind:            vs.rec.kind,
		APIVersion:      vs.rec.apiVersion,
		Updated:         vs.rec.updated,
		Stale:           vs.rec.stale,
	}
}

// resourceViews are the views of one resource: those that may hold a given
// object are every view without a Name plus the Name views of that very
// object, which keeps a watch event cheap however many single-object GETs
// were recorded.
type resourceViews struct {
	all    []*viewState
	named  map[string][]*viewState // Name views by member key
	others []*viewState            // views without a Name
}

func (rs *resourceViews) add(vs *viewState) {
	rs.all = append(rs.all, vs)
	if vs.key.Name != "" {
		mk := memberKey(vs.key.Namespace, vs.key.Name)
		rs.named[mk] = append(rs.named[mk], vs)
	} else {
		rs.others = append(rs.others, vs)
	}
}

func (rs *resourceViews) remove(vs *viewState) {
	del := func(s []*viewState) []*viewState {
		for i, x := range s {
			if x == vs {
				return append(s[:i:i], s[i+1:]...)
			}
		}
		return s
	}
	rs.all = del(rs.all)
	if vs.key.Name != "" {
		mk := memberKey(vs.key.Namespace, vs.key.Name)
		rs.named[mk] = del(rs.named[mk])
	} else {
		rs.others = del(rs.others)
	}
}

// candidates returns the views that may hold the object mk, in two lists.
func (rs *resourceViews) candidates(mk string) [2][]*viewState {
	return [2][]*viewState{rs.others, rs.named[mk]}
}

// view returns view k, creating it when create is set (and the
// transaction writes). A missing view is nil.
func (tx *Tx) view(k ViewKey, create bool) (*viewState, error) {
	// A batch of events mostly comes from one watch.
	if last := tx.last; last != nil && !last.deleted && last.key == k {
		return last, nil
	}
	vs, err := tx.findView(k, create)
	if vs != nil {
		tx.last = vs
	}
	return vs, err
}

func (tx *Tx) findView(k ViewKey, create bool) (*viewState, error) {
	enc := encodeViewKey(k)
	if vs := tx.loaded[string(enc)]; vs != nil {
		if vs.deleted && !create {
			return nil, nil
		}
		if !vs.deleted {
			return vs, nil
		}
	}
	if v := tx.views.Get(enc); v != nil {
		return tx.load(k, enc, v)
	}
	if !create {
		return nil, nil
	}
	if k.Resource == "" {
		return nil, fmt.Errorf("%w: view without a resource", ErrInvalidKey)
	}
	id, err := tx.views.NextSequence()
	if err != nil {
		return nil, fmt.Errorf("numbering view %s: %w", k, err)
	}
	vs := &viewState{key: k, enc: enc, rec: viewRecord{id: id, updated: tx.now}, dirty: true, created: true}
	binary.BigEndian.PutUint64(vs.prefix[:], id)
	// Written now, not only by flush, so that a later scan of the views
	// bucket in this transaction finds it.
	if err := tx.views.Put(enc, appendView(nil, &vs.rec)); err != nil {
		return nil, fmt.Errorf("creating view %s: %w", k, err)
	}
	tx.loaded[string(enc)] = vs
	if rs := tx.resources[k.Resource]; rs != nil {
		rs.add(vs)
	}
	tx.viewsDelta++
	return vs, nil
}

// load returns the viewState of a view read from the views bucket.
func (tx *Tx) load(k ViewKey, enc, v []byte) (*viewState, error) {
	if vs := tx.loaded[string(enc)]; vs != nil && !vs.deleted {
		return vs, nil
	}
	rec, err := decodeView(v)
	if err != nil {
		return nil, fmt.Errorf("reading view %s: %w", k, err)
	}
	vs := &viewState{key: k, enc: bytes.Clone(enc), rec: rec}
	binary.BigEndian.PutUint64(vs.prefix[:], rec.id)
	tx.loaded[string(enc)] = vs
	return vs, nil
}

// resourceViews returns the views of resource.
func (tx *Tx) resourceViews(resource string) (*resourceViews, error) {
	if rs := tx.resources[resource]; rs != nil {
		return rs, nil
	}
	rs := &resourceViews{named: make(map[string][]*viewState)}
	prefix := resourcePrefix(resource)
	c := tx.views.Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		key, err := decodeViewKey(k)
		if err != nil {
			return nil, fmt.Errorf("listing views of %s: %w", resource, err)
		}
		vs, err := tx.load(key, k, v)
		if err != nil {
			return nil, err
		}
		rs.add(vs)
	}
	tx.resources[resource] = rs
	return rs, nil
}

func (tx *Tx) memberKey(vs *viewState, mk string) []byte {
	tx.mkey = append(append(tx.mkey[:0], vs.prefix[:]...), mk...)
	return tx.mkey
}

func (tx *Tx) isMember(vs *viewState, mk string) bool {
	return tx.members.Get(tx.memberKey(vs, mk)) != nil
}

func (tx *Tx) setMember(vs *viewState, mk string, on bool) error {
	var err error
	if on {
		err = tx.members.Put(tx.memberKey(vs, mk), []byte{})
	} else {
		err = tx.members.Delete(tx.memberKey(vs, mk))
	}
	if err != nil {
		return fmt.Errorf("updating members of view %s: %w", vs.key, err)
	}
	return nil
}

// upsert stores object o (key mk) of resource unless the stored copy is
// newer, and updates memberships: o joins own (unless own is nil or
// ownMember says it is in already), and when o is stored every other view
// that may hold it re-evaluates it. The reference count in the record
// follows every membership change, and an object no view holds is deleted.
// at is the resourceVersion of the answer o came in (a list's, or the
// event's own): see reevaluate.
func (tx *Tx) upsert(rs *resourceViews, own *viewState, ownMember bool, resource, mk string, o *Object, at string) error {
	tx.okey = objectKey(tx.okey, resource, mk)
	cur := tx.objects.Get(tx.okey)
	var refs uint64
	wins := true
	if cur != nil {
		r, rv, err := objectHeader(cur)
		if err != nil {
			return fmt.Errorf("reading %s %s: %w", resource, mk, err)
		}
		refs = r
		wins = !newerRV(rv, []byte(o.ResourceVersion))
	}
	newRefs := refs
	if own != nil && !ownMember {
		if err := tx.setMember(own, mk, true); err != nil {
			return err
		}
		newRefs++
	}
	// changed: o is stored, and differs from the stored copy. Only then
	// may other views need to take it in or let it go; an unchanged object
	// was evaluated against them when it was written.
	changed := false
	encodedRefs := newRefs
	if wins {
		if err := tx.keepProto(o, resource, mk, cur); err != nil {
			return err
		}
		tx.rec, tx.keys = appendObject(tx.rec[:0], newRefs, o, tx.keys)
		if tx.seal.resource(resource) {
			changed = tx.sealRecord(cur, len(tx.rec)-len(o.Data))
		} else {
			changed = !sameContent(cur, tx.rec)
		}
	}
	if changed {
		if err := tx.reevaluate(rs, own, mk, o, cur, at, &newRefs); err != nil {
			return fmt.Errorf("%s %s: %w", resource, mk, err)
		}
	}
	okey := objectKey(tx.okey, resource, mk)
	var rec []byte
	var err error
	switch {
	case newRefs == 0:
		if cur == nil {
			return nil
		}
		return tx.deleteObject(resource, mk)
	case changed && newRefs == encodedRefs:
		rec = bytes.Clone(tx.rec)
	case changed:
		rec, err = withRefs(tx.rec, newRefs)
	case newRefs != refs:
		rec, err = withRefs(cur, newRefs)
	default:
		return nil // a relist of an unchanged object writes nothing
	}
	if err != nil {
		return fmt.Errorf("reading %s %s: %w", resource, mk, err)
	}
	if cur == nil {
		tx.objectsDelta++
	}
	return tx.objects.Put(okey, rec)
}

// keepProto stores o's protobuf encoding beside it (see Object.Proto) as
// o, whose stored copy is cur (nil: none), is written: its own; else the
// stored one stays if o is at the stored resourceVersion (a JSON answer
// for an object a protobuf client also reads must not drop it) and goes
// otherwise. A sealed resource keeps none.
func (tx *Tx) keepProto(o *Object, resource, mk string, cur []byte) error {
	key := objectKey(tx.pkey, resource, mk)
	tx.pkey = key
	switch {
	case o.Proto != nil && !tx.seal.resource(resource):
		rec := appendString(tx.prec[:0], o.ResourceVersion)
		rec = append(rec, o.Proto...)
		tx.prec = rec
		if bytes.Equal(tx.protos.Get(key), rec) {
			return nil // a relist of an unchanged object writes nothing
		}
		return tx.protos.Put(key, bytes.Clone(rec))
	case o.Proto == nil && cur != nil && !tx.seal.resource(resource):
		if _, rv, err := objectHeader(cur); err == nil && string(rv) == o.ResourceVersion {
			return nil
		}
	}
	if tx.protos.Get(key) == nil {
		return nil
	}
	return tx.protos.Delete(key)
}

// proto returns the stored protobuf encoding of the object under object
// key okey if it is at resourceVersion rv (nil: none). It aliases the
// file.
func (tx *Tx) proto(okey []byte, rv string) []byte {
	if tx.protos == nil {
		return nil
	}
	rec := tx.protos.Get(okey)
	if rec == nil {
		return nil
	}
	r := reader{b: rec}
	if string(r.bytes("protobuf record")) != rv || r.err != nil {
		return nil
	}
	return r.b
}

// deleteObject deletes the object of resource with member key mk, and its
// protobuf encoding.
func (tx *Tx) deleteObject(resource, mk string) error {
	tx.okey = objectKey(tx.okey, resource, mk)
	tx.objectsDelta--
	if err := tx.objects.Delete(tx.okey); err != nil {
		return err
	}
	if tx.protos.Get(tx.okey) == nil {
		return nil
	}
	return tx.protos.Delete(tx.okey)
}

// sealRecord compares the object record in tx.rec, whose data starts at
// dataStart, with the sealed record cur (nil: none), in clear, and when
// they differ replaces the data in tx.rec by its sealed form, bound to the
// object key in tx.okey. Sealing uses a fresh nonce each time, so records
// could not be compared sealed: without this, every relist would rewrite
// every Secret. A cur that does not open differs.
func (tx *Tx) sealRecord(cur []byte, dataStart int) (changed bool) {
	ad := tx.adFor(adObject, tx.okey)
	if cur != nil {
		if data, err := objectData(cur); err == nil && sameContent(cur[:len(cur)-len(data)], tx.rec[:dataStart]) {
			plain, err := tx.seal.s.Open(tx.plain[:0], data, ad)
			if plain != nil {
				tx.plain = plain
			}
			if err == nil && bytes.Equal(plain, tx.rec[dataStart:]) {
				return false
			}
		}
	}
	tx.sealed = tx.seal.s.Seal(append(tx.sealed[:0], tx.rec[:dataStart]...), tx.rec[dataStart:], ad)
	tx.rec, tx.sealed = tx.sealed, tx.rec
	return true
}

// reevaluate moves object o, whose stored copy was cur (nil: none), in or
// out of each view that may hold it, other than own, counting the changes
// in refs. Only a view for which o's match differs from cur's can change:
// one that o matched before and still matches keeps what it has, and an
// object not stored before is in no view. So a watch event that changes
// neither labels nor fields, the common case, costs no membership lookups.
//
// An object not stored (cur nil) came in an answer at resourceVersion at.
// A view that is whole (not stale) at a newer version does not take it in:
// had the object still existed then, that view would hold it, so it was
// deleted since, and the view saw it go. Taking it in would leave it there
// for good, since no event of that view will delete it again. It happens
// when answers arrive out of order over different connections, as a list
// read slowly through a lossy link behind the watch of a node watch cache
// stream (share), whose view no client ever lists again.
func (tx *Tx) reevaluate(rs *resourceViews, own *viewState, mk string, o *Object, cur []byte, at string, refs *uint64) error {
	// As interfaces once, not at every call.
	var oldLabels labels.Labels
	var oldFields fields.Fields
	if cur != nil {
		ls, fs, err := objectMaps(cur)
		if err != nil {
			return err
		}
		oldLabels, oldFields = ls, fs
	}
	var newLabels labels.Labels = labels.Set(o.Labels)
	var newFields fields.Fields = fields.Set(o.Fields)
	for _, views := range rs.candidates(mk) {
		for _, vs := range views {
			if vs == own {
				continue
			}
			m := vs.matcher()
			want, ok := m.match(o.Namespace, o.Name, newLabels, newFields)
			if !ok {
				continue
			}
			if cur == nil {
				if !want || (!vs.rec.stale && newerRV([]byte(vs.rec.rv), []byte(at))) {
					continue
				}
			} else {
				if was, _ := m.match(o.Namespace, o.Name, oldLabels, oldFields); was == want {
					continue
				}
				if want == tx.isMember(vs, mk) {
					continue
				}
			}
			if want {
				*refs++
			} else {
				*refs--
			}
			if err := tx.setMember(vs, mk, want); err != nil {
				return err
			}
		}
	}
	return nil
}

// release takes object mk out of view vs, which holds it, and deletes the
// object if no other view does.
func (tx *Tx) release(vs *viewState, resource, mk string) error {
	if err := tx.setMember(vs, mk, false); err != nil {
		return err
	}
	tx.okey = objectKey(tx.okey, resource, mk)
	cur := tx.objects.Get(tx.okey)
	if cur == nil {
		return fmt.Errorf("%w: view %s holds %s %s, which is not stored", ErrCorrupt, vs.key, resource, mk)
	}
	refs, _, err := objectHeader(cur)
	if err != nil {
		return fmt.Errorf("reading %s %s: %w", resource, mk, err)
	}
	if refs <= 1 {
		return tx.deleteObject(resource, mk)
	}
	rec, err := withRefs(cur, refs-1)
	if err != nil {
		return fmt.Errorf("reading %s %s: %w", resource, mk, err)
	}
	return tx.objects.Put(tx.okey, rec)
}

// memberKeys returns the member keys of view vs, in order.
func (tx *Tx) memberKeys(vs *viewState) []string {
	var mks []string
	c := tx.members.Cursor()
	for k, _ := c.Seek(vs.prefix[:]); k != nil && bytes.HasPrefix(k, vs.prefix[:]); k, _ = c.Next() {
		mks = append(mks, string(k[len(vs.prefix):]))
	}
	return mks
}
