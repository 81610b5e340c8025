// Package report is what `outpost status` shows: one outpost's state as
// its admin endpoint serves it (GET /status, JSON), and the one screen a
// person reads at a glance. The running hub fills a Report; the command
// reads it back, prints it and exits with a code a script can use.
package report

import (
	"cmp"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// The states of a Report.
const (
	Online   = "online"   // an apiserver answered, and one is healthy
	Offline  = "offline"  // no apiserver is healthy; reads come from the cache
	Starting = "starting" // no apiserver has answered a probe yet
)

// Exit codes of `outpost status`, for scripts.
const (
	ExitOnline     = 0 // ready, online
	ExitUnreadable = 1 // the admin endpoint could not be read
	ExitUsage      = 2 // bad command line
	ExitOffline    = 3 // ready, but not online: serving from the cache
	ExitNotReady   = 4 // not ready: no apiserver answered and nothing cached
)

// Report is one outpost's state.
type Report struct {
	Version string `json:"version"`
	Node    string `json:"node"`
	// State is Online, Offline or Starting; Since is when it began (for
	// the first state, when outpost started).
	State string    `json:"state"`
	Since time.Time `json:"since"`
	// Ready is what /readyz says: online, or offline with a cache.
	Ready      bool        `json:"ready"`
	Apiservers []Apiserver `json:"apiservers"`
	// LastReconnect is the last return of the cloud, if any since start.
	LastReconnect *Reconnect    `json:"lastReconnect,omitempty"`
	Store         Store         `json:"store"`
	Journal       Journal       `json:"journal"`
	Certificates  []Certificate `json:"certificates"`
	// Unrecorded are the resources whose answers could not be recorded
	// lately: they will not be answered offline.
	Unrecorded []Unrecorded `json:"unrecorded"`
}

// Apiserver is one upstream apiserver's health.
type Apiserver struct {
	URL     string `json:"url"`
	Healthy bool   `json:"healthy"`
	// LastProbe is when the last probe ended and LastResult its result
	// (ok, failed, excused); zero before the first.
	LastProbe  time.Time `json:"lastProbe,omitzero"`
	LastResult string    `json:"lastResult,omitempty"`
	// LastError is why it last turned unhealthy.
	LastError string `json:"lastError,omitempty"`
}

// Reconnect is what outpost did when the cloud last returned.
type Reconnect struct {
	At     time.Time     `json:"at"`
	Outage time.Duration `json:"outage"`
	// StatusesSent, EventsReplayed and ViewsRelisted count the Node and
	// pod statuses sent upstream, the journaled events replayed and the
	// views re-listed (none after an outage shorter than the flap window).
	StatusesSent   int `json:"statusesSent"`
	EventsReplayed int `json:"eventsReplayed"`
	ViewsRelisted  int `json:"viewsRelisted"`
	// Done is when it finished, zero while it runs; Error says why it
	// stopped early, if it did.
	Done  time.Time `json:"done,omitzero"`
	Error string    `json:"error,omitempty"`
}

// Store is what the cache holds.
type Store struct {
	Path    string `json:"path"`
	Bytes   int64  `json:"bytes"`
	Objects int    `json:"objects"`
	Views   int    `json:"views"`
	// Stale views may be behind or incomplete: a recorded answer was
	// dropped, or only a watch ever filled them.
	StaleViews int `json:"staleViews"`
	// ByResource and ByIdentity count views.
	ByResource map[string]int `json:"byResource"`
	ByIdentity map[string]int `json:"byIdentity"`
}

// Journal is the offline event journal.
type Journal struct {
	// Depth is how many events wait to be replayed; Max is its bound.
	Depth int `json:"depth"`
	Max   int `json:"max"`
	// Dropped counts events dropped because it was full, since start.
	Dropped int64 `json:"dropped"`
}

// Certificate is one certificate outpost holds.
type Certificate struct {
	// Name is node-client (outpost's credentials toward the apiserver) or
	// serving (what local clients verify).
	Name     string    `json:"name"`
	Subject  string    `json:"subject"`
	NotAfter time.Time `json:"notAfter"`
}

// Unrecorded is a resource whose answers could not be recorded.
type Unrecorded struct {
	Resource string    `json:"resource"`
	Reason   string    `json:"reason"`
	Error    string    `json:"error,omitempty"`
	Count    int       `json:"count"`
	Last     time.Time `json:"last"`
}

// ExitCode is the exit code of `outpost status` for r.
func (r *Report) ExitCode() int {
	switch {
	case r.Ready && r.State == Online:
		return ExitOnline
	case r.Ready:
		return ExitOffline
	}
	return ExitNotReady
}

// Write prints r for a person, as of now.
func (r *Report) Write(w io.Writer, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	p := func(format string, args ...any) { fmt.Fprintf(tw, format+"\n", args...) }
	ready := "ready"
	if !r.Ready {
		ready = "NOT READY"
	}
	p("outpost %s on node %s", r.Version, r.Node)
	p("state:\t%s since %s (%s), %s", strings.ToUpper(r.State), r.Since.Format(time.RFC3339), ago(now, r.Since), ready)
	for _, a := range r.Apiservers {
		health := "healthy"
		if !a.Healthy {
			health = "UNHEALTHY"
		}
		probe := "not probed yet"
		if !a.LastProbe.IsZero() {
			probe = fmt.Sprintf("last probe %s %s", a.LastResult, ago(now, a.LastProbe))
		}
		line := fmt.Sprintf("apiserver:\t%s\t%s, %s", a.URL, health, probe)
		if a.LastError != "" && !a.Healthy {
			line += ": " + a.LastError
		}
		p("%s", line)
	}
	if c := r.LastReconnect; c != nil {
		line := fmt.Sprintf("last reconnect:\t%s after %s offline: %d statuses sent, %d events replayed, %d views re-listed",
			ago(now, c.At), c.Outage.Round(time.Millisecond), c.StatusesSent, c.EventsReplayed, c.ViewsRelisted)
		switch {
		case c.Error != "":
			line += "; stopped: " + c.Error
		case c.Done.IsZero():
			line += " (running)"
		}
		p("%s", line)
	} else {
		p("last reconnect:\tnone since start")
	}
	s := r.Store
	p("cache:\t%s, %s, %d objects in %d views (%d stale)", s.Path, size(s.Bytes), s.Objects, s.Views, s.StaleViews)
	if len(s.ByResource) > 0 {
		p("  by resource:\t%s", counts(s.ByResource))
	}
	if len(s.ByIdentity) > 0 {
		p("  by identity:\t%s", counts(s.ByIdentity))
	}
	p("event journal:\t%d of %d waiting, %d dropped since start", r.Journal.Depth, r.Journal.Max, r.Journal.Dropped)
	for _, c := range r.Certificates {
		p("certificate:\t%s\t%s, expires %s (in %s)", c.Name, c.Subject, c.NotAfter.Format(time.RFC3339), c.NotAfter.Sub(now).Round(time.Minute))
	}
	if len(r.Unrecorded) == 0 {
		p("not recorded:\tnothing")
	}
	for _, u := range r.Unrecorded {
		p("not recorded:\t%s\t%s ×%d, last %s: %s", u.Resource, u.Reason, u.Count, ago(now, u.Last), u.Error)
	}
	return tw.Flush()
}

// ago says how long before now t was.
func ago(now, t time.Time) string {
	return now.Sub(t).Round(time.Second).String() + " ago"
}

// size writes n bytes for a person.
func size(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// counts writes a count per key, largest first.
func counts(m map[string]int) string {
	type kv struct {
		k string
		n int
	}
	var all []kv
	for k, n := range m {
		all = append(all, kv{k, n})
	}
	slices.SortFunc(all, func(a, b kv) int {
		if c := cmp.Compare(b.n, a.n); c != 0 {
			return c
		}
		return cmp.Compare(a.k, b.k)
	})
	parts := make([]string, len(all))
	for i, e := range all {
		parts[i] = fmt.Sprintf("%s %d", e.k, e.n)
	}
	return strings.Join(parts, ", ")
}
