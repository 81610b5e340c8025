// Command pause is the pod sandbox process of the real-kubelet e2e tests,
// packed into the image registry.k8s.io/pause:3.10 by the framework because
// no registry is reachable. Like the real pause it holds the pod's
// namespaces, reaps orphaned children when it is PID 1 of a shared PID
// namespace, and exits on SIGTERM or SIGINT.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
