package recorder

import (
	"cmp"
	"slices"
	"strings"
	"time"

	"github.com/outposthq/outpost/internal/store"
)

// Unrecorded describes a resource whose answers outpost could not record
// lately: until one is recorded, reads of it will not be answered offline.
// Only reasons that repeat for every answer are kept (an answer outpost
// cannot decode, or one too large to hold); the transient ones (a client
// that left early, a full queue) are only counted.
type Unrecorded struct {
	// Resource is "group/version/resource" ("/v1/pods" for the core group).
	Resource string    `json:"resource"`
	Reason   string    `json:"reason"`
	Error    string    `json:"error,omitempty"`
	Count    int       `json:"count"`
	Last     time.Time `json:"last"`
}

// persistentDrop reports whether reason repeats for every answer of a
// resource until outpost or the resource changes.
func persistentDrop(reason string) bool { return reason == "undecodable" || reason == "too-large" }

// unrecordable notes that an answer of view's resource was dropped for
// reason (err, if any, says why), counts it by resource, and reports
// whether this is the first such drop of the resource since it was last
// recorded, so that the caller logs it once.
func (c *Recorder) unrecordable(view *store.ViewKey, reason string, err error) (first bool) {
	if view == nil {
		return false
	}
	res := strings.TrimSuffix(view.Resource, "#meta")
	if c.Metrics != nil {
		group, version, resource := splitGVR(res)
		c.Metrics.CacheUnrecorded.WithLabelValues(group, version, resource, reason).Inc()
	}
	if !persistentDrop(reason) {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	u := c.unrecorded[res]
	if u == nil {
		u = &Unrecorded{Resource: res}
		c.unrecorded[res] = u
		first = true
	}
	u.Reason, u.Count, u.Last = reason, u.Count+1, c.Now()
	if err != nil {
		u.Error = err.Error()
	}
	return first
}

// recorded forgets what unrecordable noted of resource: an answer of it
// was written.
func (c *Recorder) recorded(resource string) {
	res := strings.TrimSuffix(resource, "#meta")
	c.mu.Lock()
	if len(c.unrecorded) > 0 {
		delete(c.unrecorded, res)
	}
	c.mu.Unlock()
}

// Unrecorded lists the resources whose answers could not be recorded
// since an answer of them last was, by resource.
func (c *Recorder) Unrecorded() []Unrecorded {
	c.init()
	c.mu.Lock()
	out := make([]Unrecorded, 0, len(c.unrecorded))
	for _, u := range c.unrecorded {
		out = append(out, *u)
	}
	c.mu.Unlock()
	slices.SortFunc(out, func(a, b Unrecorded) int { return cmp.Compare(a.Resource, b.Resource) })
	return out
}

// splitGVR splits "group/version/resource".
func splitGVR(res string) (group, version, resource string) {
	parts := strings.SplitN(res, "/", 3)
	if len(parts) != 3 {
		return "", "", res
	}
	return parts[0], parts[1], parts[2]
}
