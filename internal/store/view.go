package store

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"time"
)

// ViewKey names what one caller identity read with one request signature.
type ViewKey struct {
	// Identity is who read it, opaque to the store (e.g.
	// "system:node:edge-1").
	Identity string
	// Resource is "group/version/resource", e.g. "/v1/pods" or
	// "apps/v1/deployments". It may carry a suffix such as "#meta" to keep
	// metadata-only copies apart; the store compares it as an opaque string,
	// and only views of the same Resource share objects.
	Resource string
	// Namespace limits the view to one namespace; "" is all namespaces.
	Namespace string
	// Name is set for a single-object GET: the view holds at most that
	// object.
	Name string
	// LabelSelector is the canonical label selector; "" is everything.
	LabelSelector string
	// FieldSelector is the canonical field selector, evaluated against
	// Object.Fields; "" is everything.
	FieldSelector string
}

func (k ViewKey) String() string {
	s := k.Identity + " " + k.Resource
	if k.Namespace != "" {
		s += " ns=" + k.Namespace
	}
	if k.Name != "" {
		s += " name=" + k.Name
	}
	if k.LabelSelector != "" {
		s += " labels=" + k.LabelSelector
	}
	if k.FieldSelector != "" {
		s += " fields=" + k.FieldSelector
	}
	return s
}

// View is what the store knows of one view besides its members.
type View struct {
	Key ViewKey
	// ResourceVersion is the list resourceVersion the view is at.
	ResourceVersion string
	// Kind and APIVersion are those of the list, e.g. "PodList" and "v1".
	// Empty for a view that only a watch created.
	Kind, APIVersion string
	// Updated is when the view was last replaced or advanced by a watch.
	Updated time.Time
	// Stale is set when a recorded answer was dropped, or the view was
	// created by a watch and never listed: it may be behind or incomplete.
	Stale bool
}

// member is an object of a list with its member key.
type member struct {
	mk string
	o  *Object
}

// ReplaceView sets view v's metadata and membership to exactly objs, as one
// list answer. Each object is stored once per (Resource, namespace, name)
// however many views hold it; a stored object whose resourceVersion is newer
// than the listed one is kept (it came from a later watch event), other
// objects are written, unchanged ones are not rewritten. Objects that leave
// v and are in no other view are deleted. Each object written moves in or
// out of the other views of the Resource exactly as for a watch event (see
// Apply), so no view keeps an object in a state that no longer matches it.
//
// If v.Updated is zero, the time of the transaction is recorded.
func (tx *Tx) ReplaceView(v View, objs []Object) error {
	k := v.Key
	if k.Resource == "" {
		return fmt.Errorf("replacing view %s: %w: empty resource", k, ErrInvalidKey)
	}
	items := make([]member, len(objs))
	sorted := true
	for i := range objs {
		o := &objs[i]
		if err := checkObjectKey(k.Resource, o.Namespace, o.Name); err != nil {
			return fmt.Errorf("replacing view %s: %w", k, err)
		}
		items[i] = member{mk: memberKey(o.Namespace, o.Name), o: o}
		if i > 0 && items[i].mk < items[i-1].mk {
			sorted = false
		}
	}
	// The apiserver lists in key order already; sorting is for the rest.
	if !sorted {
		slices.SortStableFunc(items, func(a, b member) int { return strings.Compare(a.mk, b.mk) })
	}

	vs, err := tx.view(k, true)
	if err != nil {
		return fmt.Errorf("replacing view %s: %w", k, err)
	}
	updated := v.Updated
	if updated.IsZero() {
		updated = tx.now
	}
	vs.rec = viewRecord{id: vs.rec.id, rv: v.ResourceVersion, kind: v.Kind, apiVersion: v.APIVersion, updated: updated, stale: v.Stale}
	vs.dirty = true
	vs.created = false
	rs, err := tx.resourceViews(k.Resource)
	if err != nil {
		return fmt.Errorf("replacing view %s: %w", k, err)
	}

	// Walk the old and the new membership side by side, both in key order.
	old := tx.memberKeys(vs)
	i, j := 0, 0
	for i < len(items) || j < len(old) {
		switch {
		case j == len(old) || (i < len(items) && items[i].mk < old[j]):
			err = tx.upsert(rs, vs, false, k.Resource, items[i].mk, items[i].o, v.ResourceVersion)
			i++
		case i == len(items) || old[j] < items[i].mk:
			err = tx.release(vs, k.Resource, old[j])
			j++
		default:
			err = tx.upsert(rs, vs, true, k.Resource, items[i].mk, items[i].o, v.ResourceVersion)
			i++
			j++
		}
		// The same object twice in one list: the newer copy wins.
		for ; err == nil && i > 0 && i < len(items) && items[i].mk == items[i-1].mk; i++ {
			err = tx.upsert(rs, vs, true, k.Resource, items[i].mk, items[i].o, v.ResourceVersion)
		}
		if err != nil {
			return fmt.Errorf("replacing view %s: %w", k, err)
		}
	}
	return nil
}

// MarkStale records that an answer for view k was dropped, so the view may
// be behind. A view that does not exist is left alone: there is nothing to
// serve from it anyway. Replacing the view clears the mark.
func (tx *Tx) MarkStale(k ViewKey) error {
	vs, err := tx.view(k, false)
	if err != nil || vs == nil {
		return err
	}
	if !vs.rec.stale {
		vs.rec.stale = true
		vs.dirty = true
	}
	return nil
}

// DeleteView forgets view k and its membership; objects no other view
// holds are deleted. Deleting a missing view does nothing.
func (tx *Tx) DeleteView(k ViewKey) error {
	vs, err := tx.view(k, false)
	if err != nil || vs == nil {
		return err
	}
	for _, mk := range tx.memberKeys(vs) {
		if err := tx.release(vs, k.Resource, mk); err != nil {
			return fmt.Errorf("deleting view %s: %w", k, err)
		}
	}
	if err := tx.views.Delete(vs.enc); err != nil {
		return fmt.Errorf("deleting view %s: %w", k, err)
	}
	vs.deleted = true
	if rs := tx.resources[k.Resource]; rs != nil {
		rs.remove(vs)
	}
	tx.viewsDelta--
	return nil
}

// View returns the metadata of view k.
func (tx *Tx) View(k ViewKey) (View, bool, error) {
	vs, err := tx.view(k, false)
	if err != nil || vs == nil {
		return View{}, false, err
	}
	return vs.view(), true, nil
}

// Views lists identity's views of resource.
func (tx *Tx) Views(identity, resource string) ([]View, error) {
	return tx.scanViews(appendString(resourcePrefix(resource), identity))
}

// AllViews lists every view.
func (tx *Tx) AllViews() ([]View, error) {
	return tx.scanViews(nil)
}

func (tx *Tx) scanViews(prefix []byte) ([]View, error) {
	var views []View
	c := tx.views.Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		key, err := decodeViewKey(k)
		if err != nil {
			return nil, fmt.Errorf("listing views: %w", err)
		}
		vs, err := tx.load(key, k, v)
		if err != nil {
			return nil, fmt.Errorf("listing views: %w", err)
		}
		views = append(views, vs.view())
	}
	return views, nil
}
