// Package chaos is a seeded soak: for CHAOS_DURATION it injects faults at
// random into one outpost on a real control plane — its link black-holed,
// reset, slowed by 2 s, losing packets or flapping; outpost killed with
// SIGKILL and restarted online and offline; the apiserver restarted; the
// disk under outpost's store full; the store file corrupted before a
// restart — while real clients use outpost the whole time, and checks
// outpost's promises continuously:
//
//   - cached reads never fail while outpost is offline (every failed read
//     is counted with its phase and error);
//   - after every reconnect the edge converges to the apiserver's state:
//     every view in outpost's store, the node's statuses and events within
//     convergeWithin, the informer's objects within informerWithin (its
//     reflector's back-off is client-go's);
//   - every event and status the node wrote reaches the apiserver, or is
//     counted as dropped by policy (the journal's bound);
//   - the store always opens, never serves a partial view, and a full disk
//     never breaks online proxying;
//   - outpost's RSS and open file descriptors stay bounded.
//
// The clients are client-go (an informer and a reader with a
// service-account token; a kubelet-like writer with the node's
// certificate: events, the Lease, Node and pod statuses) and kubectl. No
// real kubelet: the soak restarts outpost and the apiserver dozens of times,
// and the real-kubelet suites (edge, kubeletsmoke) already prove kubelet's
// own path; the writer here does what kubelet does offline, with numbered
// writes whose arrival can be checked.
//
// The run ends with a markdown report (report.md) and a picture of outpost's
// RSS and open files with the faults marked (resources.png), beside
// outpost's log (outpost.log). `make chaos`
// writes them into _output/chaos (CHAOS_OUT) and runs for 10 minutes; as a
// plain `go test` (and so in `make test`) the soak runs for 40 s and logs
// the report. CHAOS_SEED replays a run: the report names its seed.
// CHAOS_FAULTS (comma-separated kinds, as the report names them) keeps to
// some faults, to chase one. CHAOS_OUTPOST_ARGS gives outpost more flags
// (space-separated), e.g. --watch-cache=false to soak outpost without the
// node watch cache.
package chaos

import (
	"os"
	"testing"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	// No kube-controller-manager: nothing must evict, garbage-collect or
	// mark the node NotReady behind the soak's back.
	os.Exit(framework.Run(m, framework.Options{}, &cp))
}
