// Command coredns is CoreDNS with only the plugins a node's cluster DNS
// needs, for the end-to-end tests' coredns Deployment: names of the cluster
// from the kubernetes plugin, a cache, the health and readiness endpoints its
// probes call, loop detection, Corefile reloads and logging. CoreDNS's own
// main links every plugin it has (cloud DNS providers, etcd, ...); this one
// is a fraction of the size and of the dependencies. hack/k8s.sh builds it
// into _output/k8s/coredns.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	// Each plugin registers its Corefile directive in its init.
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// directives are the plugins linked above in the order they handle a query,
// which is CoreDNS's own order (core/dnsserver/zdirectives.go), not the
// order a Corefile lists them in.
var directives = []string{
	"reload",
	"ready",
	"health",
	"errors",
	"log",
	"cache",
	"kubernetes",
	"loop",
	"forward",
}

func main() {
	if err := dnsserver.SetDirectives(directives); err != nil {
		panic(err)
	}
	coremain.Run()
}
