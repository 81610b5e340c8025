// Package framework starts a real, throwaway Kubernetes control plane on
// 127.0.0.1 for end-to-end tests: etcd, one or more kube-apiservers sharing
// it, and optionally kube-controller-manager, kube-scheduler and kwok.
//
// It exists because Outpost's behaviour only matters against the real thing:
// watch bookmarks, resourceVersion semantics, the Node authorizer, CSR
// approval and an apiserver that disappears and comes back are all things a
// fake gets subtly wrong. The binaries are the pinned ones that
// hack/k8s.sh builds into _output/k8s; nothing is downloaded at test time.
//
// Everything a run needs — PKI, kubeconfigs, etcd data and one log file per
// process — lives in ControlPlane.Dir, so a failed run can be inspected with
// OUTPOST_E2E_KEEP=1. Every process is started in its own process group with
// a parent-death signal, so none outlives the test binary even when a test
// panics or times out.
//
// The package also holds whatever more than one suite needs, so that no
// suite copies another's helpers: outpost processes (StartOutpostT, and
// StartOutpostWithLinkT behind a FaultProxy the test cuts), callers
// (ServiceAccountToken, Outpost.ClientConfig, CertPool), real nodes and
// their web pods (RequireRealNode, StartNodeForTest, CreateWebPods,
// Node.WaitPodsReady), and small probes (GetOK, Poll, Outpost.Metric).
//
// A test package typically owns one control plane for all of its tests:
//
//	var cp *framework.ControlPlane
//
//	func TestMain(m *testing.M) {
//		os.Exit(framework.Run(m, framework.Options{ControllerManager: true}, &cp))
//	}
package framework
