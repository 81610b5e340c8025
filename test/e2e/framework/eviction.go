package framework

import (
	"strconv"
	"time"
)

// EvictionOptions are the Options of suites about eviction: kube-controller-
// manager and kube-scheduler, a node silent for grace declared unreachable
// (checked every second) and its pods given a default toleration of
// toleration seconds, so that an ordinary node's pods go within seconds.
// Silent nodes are tainted at once rather than one per 10 s.
func EvictionOptions(toleration int, grace time.Duration) Options {
	return Options{
		ControllerManager: true,
		Scheduler:         true,
		APIServerArgs: []string{
			"--default-unreachable-toleration-seconds=" + strconv.Itoa(toleration),
			"--default-not-ready-toleration-seconds=" + strconv.Itoa(toleration),
		},
		ControllerManagerArgs: []string{
			"--node-monitor-period=1s",
			"--node-monitor-grace-period=" + grace.String(),
			"--node-eviction-rate=100",
		},
	}
}
