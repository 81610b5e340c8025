package peer

import (
	"fmt"
	"slices"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// What a report Lease carries besides its spec. The Lease is named after
// the observing node, and its holderIdentity is that node too.
const (
	// LabelSite on a report is the observer's site as the observer read it
	// from its own Node, so that peers find each other by label. The
	// controller trusts only the Node's label, never this one.
	LabelSite = "outpost.io/peer-site"
	// AnnotationAddress is the observer's probe address (IP:port).
	AnnotationAddress = "outpost.io/peer-address"
	// AnnotationReachable and AnnotationUnreachable list, comma-separated
	// and sorted, the peers the observer probed lately and reached, or
	// failed to reach FailureThreshold times in a row.
	AnnotationReachable   = "outpost.io/peers-reachable"
	AnnotationUnreachable = "outpost.io/peers-unreachable"
)

// Report is what one node says about its site.
type Report struct {
	// Observer is the node that wrote the report.
	Observer string
	// Site is the observer's own word for its site (LabelSite).
	Site string
	// Address is where the observer serves probes.
	Address string
	// Reachable and Unreachable are the peers seen lately, sorted.
	Reachable, Unreachable []string
	// Renewed is when the report was written, and Valid for how long it
	// holds.
	Renewed time.Time
	Valid   time.Duration
}

// Fresh reports whether r still holds at now by the times its writer set
// (its clock). outpost-controller does not use it: it times reports on its
// own clock from when it saw them written (package peerhealth).
func (r Report) Fresh(now time.Time) bool {
	return !r.Renewed.IsZero() && now.Before(r.Renewed.Add(r.Valid))
}

// Apply writes r into lease (new or read from the apiserver), keeping
// whatever else it holds.
func (r Report) Apply(lease *coordinationv1.Lease) {
	lease.Name = r.Observer
	if lease.Labels == nil {
		lease.Labels = map[string]string{}
	}
	lease.Labels[LabelSite] = r.Site
	if lease.Annotations == nil {
		lease.Annotations = map[string]string{}
	}
	lease.Annotations[AnnotationAddress] = r.Address
	lease.Annotations[AnnotationReachable] = strings.Join(r.Reachable, ",")
	lease.Annotations[AnnotationUnreachable] = strings.Join(r.Unreachable, ",")
	secs := int32((r.Valid + time.Second - 1) / time.Second)
	lease.Spec.HolderIdentity = new(r.Observer)
	lease.Spec.LeaseDurationSeconds = &secs
	lease.Spec.RenewTime = &metav1.MicroTime{Time: r.Renewed}
}

// ParseReport reads the report a Lease carries. It checks only the form;
// whether the observer may speak about a node is the reader's question.
func ParseReport(lease *coordinationv1.Lease) (Report, error) {
	s := lease.Spec
	switch {
	case s.HolderIdentity == nil || *s.HolderIdentity != lease.Name:
		return Report{}, fmt.Errorf("report %s: holderIdentity is not the Lease's name", lease.Name)
	case s.RenewTime == nil || s.LeaseDurationSeconds == nil || *s.LeaseDurationSeconds <= 0:
		return Report{}, fmt.Errorf("report %s: no renewTime or leaseDurationSeconds", lease.Name)
	}
	r := Report{
		Observer:    lease.Name,
		Site:        lease.Labels[LabelSite],
		Address:     lease.Annotations[AnnotationAddress],
		Reachable:   splitNames(lease.Annotations[AnnotationReachable]),
		Unreachable: splitNames(lease.Annotations[AnnotationUnreachable]),
		Renewed:     s.RenewTime.Time,
		Valid:       time.Duration(*s.LeaseDurationSeconds) * time.Second,
	}
	for _, n := range r.Unreachable {
		if slices.Contains(r.Reachable, n) {
			return Report{}, fmt.Errorf("report %s: %s is both reachable and unreachable", lease.Name, n)
		}
	}
	return r, nil
}

func splitNames(s string) []string {
	var out []string
	for n := range strings.SplitSeq(s, ",") {
		if n = strings.TrimSpace(n); n != "" {
			out = append(out, n)
		}
	}
	return out
}
