package store

import (
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
)

// matcher decides whether an object belongs to a view, as the apiserver's
// watch cache does for a list or watch with that namespace, name and
// selectors.
type matcher struct {
	namespace, name string
	labels          labels.Selector // nil: everything
	fields          fields.Selector // nil: everything
	// broken is set when a selector does not parse. The apiserver accepted
	// it, so the view is real, but we cannot evaluate it: such a view keeps
	// whatever its own list and watch put in it, and no other answer moves
	// objects in or out of it.
	broken bool
	// ambiguousDelete is set when a DELETED event of this view's watch may
	// mean "no longer matches my selectors" rather than "gone"; see
	// Tx.Apply.
	ambiguousDelete bool
}

func newMatcher(k ViewKey) *matcher {
	m := &matcher{namespace: k.Namespace, name: k.Name}
	if k.LabelSelector != "" {
		s, err := labels.Parse(k.LabelSelector)
		if err != nil {
			m.broken = true
		} else if !s.Empty() {
			m.labels = s
			m.ambiguousDelete = true
		}
	}
	if k.FieldSelector != "" {
		s, err := fields.ParseSelector(k.FieldSelector)
		if err != nil {
			m.broken = true
		} else if !s.Empty() {
			m.fields = s
			// metadata.name and metadata.namespace never change, so an
			// object cannot leave a view selected on them alone.
			for _, r := range s.Requirements() {
				if r.Field != "metadata.name" && r.Field != "metadata.namespace" {
					m.ambiguousDelete = true
				}
			}
		}
	}
	if m.broken {
		m.ambiguousDelete = true
	}
	return m
}

// match reports whether object namespace/name, with labels ls and fields
// fs, belongs to the view; ok is false when the view's selectors cannot be
// evaluated.
func (m *matcher) match(namespace, name string, ls labels.Labels, fs fields.Fields) (match, ok bool) {
	if m.broken {
		return false, false
	}
	if m.namespace != "" && namespace != m.namespace {
		return false, true
	}
	if m.name != "" && name != m.name {
		return false, true
	}
	if m.labels != nil && !m.labels.Matches(ls) {
		return false, true
	}
	if m.fields != nil && !m.fields.Matches(fs) {
		return false, true
	}
	return true, true
}

// encodedMap is the labels or fields of an object record, read in place:
// it serves as labels.Labels and fields.Fields without decoding the record.
type encodedMap []byte

var (
	_ labels.Labels = encodedMap(nil)
	_ fields.Fields = encodedMap(nil)
)

func (m encodedMap) Has(key string) bool {
	_, ok := m.Lookup(key)
	return ok
}

func (m encodedMap) Get(key string) string {
	v, _ := m.Lookup(key)
	return v
}

func (m encodedMap) Lookup(key string) (string, bool) {
	r := reader{b: m}
	for len(r.b) > 0 {
		k := r.bytes("map")
		v := r.bytes("map")
		if r.err != nil {
			return "", false
		}
		if string(k) == key {
			return string(v), true
		}
	}
	return "", false
}
