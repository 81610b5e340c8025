// Package peerhealth decides, for each autonomous node the cloud no longer
// hears from, whether the nodes beside it say it is alive behind a cut link
// or dead, from the reports they write (package internal/peer).
//
// The rules, for an unreachable autonomous node B at site S:
//
//   - A report counts only if it is well formed and fresh, its observer is
//     a Node of this cluster other than B, and that Node's own site label
//     (never the report's word for it) is S. Who wrote the report is the
//     apiserver's concern: RBAC lets nodes write reports, and an admission
//     policy lets each write only the report named after itself
//     (deploy/peer-reports.yaml).
//   - One counted report that reaches B: B is Alive; its pods stay, as
//     autonomy always kept them.
//   - A quorum of S's other nodes — a majority, and never fewer than two —
//     in counted reports that cannot reach B, and none that can: B is Dead.
//     Once Dead has held for the grace period without a break, autonomy is
//     Withdrawn: the pods of B are treated as those of any node, and
//     Kubernetes evicts them and their controllers replace them elsewhere.
//     Withdrawn holds until B is heard from again or a peer reaches it;
//     silence (Unknown) does not end it.
//   - Anything else (no reports, too few, a whole site cut off and silent):
//     Unknown, and autonomy holds as before.
//
// One node alone can never have another evicted, nor can nodes of another
// site. A node can keep a dead peer's pods by lying that it reaches it; that
// errs on the side autonomy already took.
//
// Fresh means on this process's clock: a report counts for Tracker.Validity
// from when this process saw it written (its resourceVersion changed), or
// for the node's leaseDurationSeconds if shorter; the node's renewTime is
// not read. The grace period is timed on this process's clock too, from the
// first time it saw the quorum, so clock skew between nodes does not shorten
// it. Each replica keeps its own verdicts and timers in memory: one started
// later (a restart, a new leader) starts the timer again rather than
// trusting another, and replicas may disagree meanwhile.
package peerhealth
