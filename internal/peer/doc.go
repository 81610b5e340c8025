// Package peer lets the outposts of one site vouch for each other, so that
// the cloud can tell a node that lost its uplink from a node that is dead.
//
// The cloud alone cannot: both stop heartbeating. The nodes beside it can,
// over the site's own network. Every outpost with a peer address serves a
// small mutual-TLS endpoint that presents its node client certificate, and
// probes its peers' endpoints with that same certificate. Each side verifies
// the other against the cluster CA as system:node:<name> (group
// system:nodes), so a probe proves that the peer's outpost runs and holds
// the key of that node's identity, not merely that something answers on its
// address.
//
// Each node probes Fanout peers per ProbeInterval, taken in turn from a
// shuffled order of its site's peers: every peer is probed by every
// observer once per ceil((n-1)/Fanout) intervals, and a site of n nodes
// makes n*Fanout probes per interval, however large it grows.
//
// While it reaches the cloud, a node writes what it sees in one Lease,
// named after itself, in the reports namespace (see Report): the peers it
// reached, the peers it could not, and its own probe address. The Leases
// are also how peers find each other: a node lists those labelled with its
// site. A node cut off from the cloud writes nothing, so a site cut off as
// a whole reports nothing and autonomy holds. outpost-controller reads the
// reports (package internal/cloud/peerhealth); an admission policy lets a
// node write only the report named after itself (deploy/peer-reports.yaml).
package peer
