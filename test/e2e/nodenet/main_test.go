// Package nodenet proves the node networking the framework runs on a real
// node — kube-proxy v1.37.2 on the host and CoreDNS in a Deployment — directly
// against the apiserver: a Service's name resolves at the kube-dns virtual IP
// and its virtual IP answers from the pod behind it. The suites that put
// outpost in front build on the same pieces.
package nodenet

import (
	"os"
	"testing"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	// kube-controller-manager runs Deployments and fills EndpointSlices,
	// which kube-proxy and CoreDNS read. No scheduler: every pod is bound
	// to its node.
	os.Exit(framework.Run(m, framework.Options{ControllerManager: true}, &cp))
}
