package store

import "fmt"

// EventType is the type of a watch event.
type EventType string

// The watch event types Apply understands.
const (
	Added    EventType = "ADDED"
	Modified EventType = "MODIFIED"
	Deleted  EventType = "DELETED"
	Bookmark EventType = "BOOKMARK"
)

// Event is one watch event.
type Event struct {
	Type EventType
	// View is the watch the event came from.
	View ViewKey
	// Object is the object of the event; for a BOOKMARK only its
	// ResourceVersion matters.
	Object Object
	// Kind and APIVersion, if set, are the list kind of the event's view
	// (e.g. "PodList", "v1"), given to a view that has none: one a watch
	// created. Answers assembled from it then name their kind.
	Kind, APIVersion string
}

// Apply applies a batch of watch events, in order, in this one transaction.
// For each event:
//
//   - BOOKMARK: the event's view advances to the bookmark's resourceVersion.
//   - ADDED, MODIFIED: the object is stored unless the stored copy is newer.
//     It becomes a member of the event's view (the apiserver filtered the
//     watch), whose resourceVersion advances to the object's. If it was
//     stored and differs from the stored copy, every other view of the same
//     Resource evaluates both copies against its namespace, name and
//     selectors: a view the new copy matches and the old did not takes it
//     in, one the old matched and the new does not lets it go. A brand-new
//     object joins every view it matches.
//   - DELETED: if the stored copy is newer, the object was re-created and
//     the event is old news. Otherwise, if the event's view has a label
//     selector, or a field selector on anything but metadata.name and
//     metadata.namespace, the object only leaves that view; else it leaves
//     every view of the Resource and the store. The apiserver's watch cache
//     sends DELETED, carrying the object's previous state, when an object
//     merely stops matching the watch's selectors (cacheWatcher's
//     convertToWatchEvent), so such an event cannot tell a deletion from a
//     relabelling: removing the object everywhere would take, say, a
//     Service that became headless out of coredns' unfiltered view because
//     kube-proxy's filtered watch no longer sees it. If it was deleted,
//     every other watch holding it reports that too.
//
// An event for a view that was never listed creates that view, with the
// event's Kind if it has one, and Stale: it holds only what the watch delivered, not what existed
// before the watch began. ReplaceView makes it complete.
//
// Each view an event touches records the transaction's time as Updated.
func (tx *Tx) Apply(events []Event) error {
	for i := range events {
		if err := tx.apply(&events[i]); err != nil {
			return fmt.Errorf("applying %s event %d of %d from %s: %w", events[i].Type, i+1, len(events), events[i].View, err)
		}
	}
	return nil
}

func (tx *Tx) apply(ev *Event) error {
	switch ev.Type {
	case Added, Modified, Deleted, Bookmark:
	default:
		return fmt.Errorf("%w %q", ErrInvalidEvent, ev.Type)
	}
	o := &ev.Object
	resource := ev.View.Resource
	if ev.Type != Bookmark {
		if err := checkObjectKey(resource, o.Namespace, o.Name); err != nil {
			return err
		}
	}
	vs, err := tx.view(ev.View, true)
	if err != nil {
		return err
	}
	if vs.created {
		vs.rec.stale = true // never listed
		vs.created = false
	}
	if vs.rec.kind == "" && ev.Kind != "" {
		vs.rec.kind, vs.rec.apiVersion = ev.Kind, ev.APIVersion
	}
	vs.advance(o.ResourceVersion)
	vs.rec.updated = tx.now
	vs.dirty = true
	if ev.Type == Bookmark {
		return nil
	}
	rs, err := tx.resourceViews(resource)
	if err != nil {
		return err
	}
	mk := memberKey(o.Namespace, o.Name)
	if ev.Type != Deleted {
		return tx.upsert(rs, vs, tx.isMember(vs, mk), resource, mk, o, o.ResourceVersion)
	}
	return tx.delete(rs, vs, resource, mk, o)
}

// delete applies a DELETED event of view own; see Apply.
func (tx *Tx) delete(rs *resourceViews, own *viewState, resource, mk string, o *Object) error {
	tx.okey = objectKey(tx.okey, resource, mk)
	cur := tx.objects.Get(tx.okey)
	if cur == nil {
		return nil // never stored, or already gone
	}
	refs, rv, err := objectHeader(cur)
	if err != nil {
		return fmt.Errorf("reading %s %s: %w", resource, mk, err)
	}
	if newerRV(rv, []byte(o.ResourceVersion)) {
		return nil
	}
	if own.matcher().ambiguousDelete {
		if !tx.isMember(own, mk) {
			return nil
		}
		return tx.release(own, resource, mk)
	}
	leave := func(vs *viewState) error {
		if !tx.isMember(vs, mk) {
			return nil
		}
		if refs > 0 {
			refs--
		}
		return tx.setMember(vs, mk, false)
	}
	for _, views := range rs.candidates(mk) {
		for _, vs := range views {
			if err := leave(vs); err != nil {
				return err
			}
		}
	}
	if refs > 0 {
		// Only a view whose own list held an object outside its namespace
		// or name gets here; look through them all.
		for _, vs := range rs.all {
			if err := leave(vs); err != nil {
				return err
			}
		}
	}
	return tx.deleteObject(resource, mk)
}
