// Package drift compares what outpost's cache holds with what the
// apiserver says now (`outpost cache diff`): for each view, the objects the
// cache lacks, those it holds at another resourceVersion, and those it holds
// that are gone upstream. It reads the store and lists upstream, metadata
// only, as each view's identity; it never writes either.
package drift

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// View is what differs in one view.
type View struct {
	Key store.ViewKey
	// ResourceVersion is the view's, as recorded; Upstream the apiserver's
	// list's now.
	ResourceVersion, Upstream string
	// Cached and Live count the objects on each side.
	Cached, Live int
	// Missing are upstream and not cached, Changed cached at another
	// resourceVersion, Gone cached but not upstream (namespace/name).
	Missing, Changed, Gone []string
	// Skipped says why the view was not compared (no credential for its
	// identity, or the apiserver refused), empty when it was.
	Skipped string `json:",omitempty"`
}

// Drifted reports whether the view differs from the apiserver.
func (v View) Drifted() bool { return len(v.Missing)+len(v.Changed)+len(v.Gone) > 0 }

// Report is the comparison of every view.
type Report struct {
	Views []View
}

// Drifted counts the views that differ.
func (r Report) Drifted() int {
	n := 0
	for _, v := range r.Views {
		if v.Drifted() {
			n++
		}
	}
	return n
}

// Upstream returns the round tripper that sends requests to the apiserver
// as identity, or nil when outpost holds no credential of it.
type Upstream func(identity string) http.RoundTripper

// maxBody bounds one metadata list: a few hundred bytes per object.
const maxBody = 256 << 20

// Compare compares every view of st that keep selects with the apiserver.
func Compare(ctx context.Context, st *store.Store, keep func(store.ViewKey) bool, upstream Upstream) (Report, error) {
	views, err := st.AllViews()
	if err != nil {
		return Report{}, err
	}
	var r Report
	for _, v := range views {
		if keep != nil && !keep(v.Key) {
			continue
		}
		d := View{Key: v.Key, ResourceVersion: v.ResourceVersion}
		cached := map[string]string{}
		err := st.List(v.Key, "", 0, func(o store.Object) error {
			cached[store.MemberKey(o.Namespace, o.Name)] = o.ResourceVersion
			return nil
		})
		if err != nil {
			return r, err
		}
		d.Cached = len(cached)
		rt := upstream(v.Key.Identity)
		if rt == nil {
			d.Skipped = "no credential of " + v.Key.Identity + " (it has not called since outpost started)"
			r.Views = append(r.Views, d)
			continue
		}
		live, rv, err := list(ctx, rt, v.Key)
		if err != nil {
			if ctx.Err() != nil {
				return r, ctx.Err()
			}
			d.Skipped = err.Error()
			r.Views = append(r.Views, d)
			continue
		}
		d.Upstream, d.Live = rv, len(live)
		for k, lrv := range live {
			crv, ok := cached[k]
			switch {
			case !ok:
				d.Missing = append(d.Missing, k)
			case crv != lrv:
				d.Changed = append(d.Changed, k)
			}
		}
		for k := range cached {
			if _, ok := live[k]; !ok {
				d.Gone = append(d.Gone, k)
			}
		}
		sort.Strings(d.Missing)
		sort.Strings(d.Changed)
		sort.Strings(d.Gone)
		r.Views = append(r.Views, d)
	}
	return r, nil
}

// meta is the metadata of a PartialObjectMetadata(List).
type meta struct {
	Namespace       string `json:"namespace"`
	Name            string `json:"name"`
	ResourceVersion string `json:"resourceVersion"`
}

// list reads the view's objects from the apiserver, metadata only: their
// resourceVersions by member key, and the list's resourceVersion.
func list(ctx context.Context, rt http.RoundTripper, k store.ViewKey) (map[string]string, string, error) {
	r, err := Request(ctx, k)
	if err != nil {
		return nil, "", err
	}
	resp, err := rt.RoundTrip(r)
	if err != nil {
		return nil, "", fmt.Errorf("listing upstream: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return nil, "", fmt.Errorf("listing upstream: %w", err)
	}
	live := map[string]string{}
	switch {
	case resp.StatusCode == http.StatusNotFound && k.Name != "":
		// The one object of a GET view is gone.
		return live, "", nil
	case resp.StatusCode != http.StatusOK:
		return nil, "", fmt.Errorf("the apiserver answered %s", resp.Status)
	}
	if k.Name != "" {
		var o struct {
			Metadata meta `json:"metadata"`
		}
		if err := json.Unmarshal(body, &o); err != nil {
			return nil, "", fmt.Errorf("decoding the apiserver's answer: %w", err)
		}
		live[store.MemberKey(o.Metadata.Namespace, o.Metadata.Name)] = o.Metadata.ResourceVersion
		return live, o.Metadata.ResourceVersion, nil
	}
	var l struct {
		Metadata struct {
			ResourceVersion string `json:"resourceVersion"`
		} `json:"metadata"`
		Items []struct {
			Metadata meta `json:"metadata"`
		} `json:"items"`
	}
	if err := json.Unmarshal(body, &l); err != nil {
		return nil, "", fmt.Errorf("decoding the apiserver's answer: %w", err)
	}
	for _, it := range l.Items {
		live[store.MemberKey(it.Metadata.Namespace, it.Metadata.Name)] = it.Metadata.ResourceVersion
	}
	return live, l.Metadata.ResourceVersion, nil
}

// Request is the GET that reads view k from the apiserver now, metadata
// only (a quorum read: no resourceVersion).
func Request(ctx context.Context, k store.ViewKey) (*http.Request, error) {
	path, err := request.ViewURL(k)
	if err != nil {
		return nil, err
	}
	r, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://upstream"+path, nil)
	if err != nil {
		return nil, err
	}
	as := "PartialObjectMetadataList"
	if k.Name != "" {
		as = "PartialObjectMetadata"
	}
	r.Header.Set("Accept", "application/json;as="+as+";g=meta.k8s.io;v=v1, application/json")
	return r, nil
}
