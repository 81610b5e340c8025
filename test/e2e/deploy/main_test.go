// Package deploy runs outpost-controller as it ships: the image `make
// images` builds, imported into a real node's containerd, and deploy/
// applied with kubectl as it is (only the image, its pull policy and the
// replica count changed by a kustomize overlay), as a Deployment on that
// node. The pod reaches the apiserver with its in-cluster config, which
// leads to the node's outpost; the apiserver reaches its webhooks at the
// Service's endpoint, the pod's IP on the node's bridge. Against it the
// autonomy scenario must hold: an autonomous node's pods get the long
// tolerations, and their endpoints stay ready while the node is
// unreachable.
package deploy

import (
	"os"
	"testing"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

// gracePeriod is kube-controller-manager's --node-monitor-grace-period. The
// real node's kubelet renews its Lease every 10 s (a quarter of the default
// 40 s lease), so it must be comfortably longer than that, or the node
// running the controller would be declared unreachable too.
const gracePeriod = "20s"

func TestMain(m *testing.M) {
	os.Exit(framework.Run(m, framework.Options{
		// kube-controller-manager runs the Deployment, the endpoints of the
		// controller's Service and the node lifecycle (the unreachable
		// taint, pods marked not ready); it signs outpost's serving
		// certificate and publishes kube-root-ca.crt.
		ControllerManager: true,
		ControllerManagerArgs: []string{
			"--node-monitor-period=1s",
			"--node-monitor-grace-period=" + gracePeriod,
		},
		// The scheduler binds the controller's pod and the pods of the
		// autonomy scenario.
		Scheduler: true,
		// A webhook with a service reference is called at the Service's
		// endpoints, the pod's IP, which the host reaches through the
		// node's bridge: nothing here serves ClusterIPs (no kube-proxy).
		APIServerArgs: []string{"--enable-aggregator-routing=true"},
	}, &cp))
}
