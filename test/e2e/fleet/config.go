package fleet

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// The modes a run compares.
const (
	// Direct: every node's clients talk straight to the apiserver, through
	// a FaultProxy of their own so that the outage cuts them too.
	Direct = "direct"
	// Outpost: every node's clients talk to that node's outpost, which
	// reaches the apiserver through its FaultProxy.
	Outpost = "outpost"
	// Shared: as Outpost, with outpost started with WatchCacheFlag.
	Shared = "shared"
)

// AllModes are the modes in the order a run takes them.
var AllModes = []string{Direct, Outpost, Shared}

// WatchCacheFlag is the outpost flag of the node watch cache (issue #16);
// the shared mode runs only when `outpost run --help` lists it.
const WatchCacheFlag = "--watch-cache"

// Config is what one run does. ConfigFromEnv reads it from FLEET_*
// variables; the zero value of a field means its default.
type Config struct {
	// Nodes is the number of nodes, each with its own outpost and client
	// set (FLEET_NODES, default 50).
	Nodes int
	// Modes are compared in this order (FLEET_MODES, comma-separated,
	// default AllModes).
	Modes []string
	// Steady is how long the clients run before the outage, counted from
	// their start; the steady-state figures are taken over its second half
	// (FLEET_STEADY, default 2m).
	Steady time.Duration
	// Outage is how long every node's link is black-holed (FLEET_OUTAGE,
	// default 120s).
	Outage time.Duration
	// After is how long the run goes on after the link is restored
	// (FLEET_AFTER, default 2m); the reconnect figures are taken over its
	// first minute (or all of it, if shorter).
	After time.Duration
	// Sample is the period of the apiserver /metrics scrapes (FLEET_SAMPLE,
	// default 5s).
	Sample time.Duration
	// Churn is how many writes per second the harness makes to each of
	// pods, nodes, services, endpointslices, configmaps and secrets, as a
	// live cluster's controllers and kubelets would (FLEET_CHURN, default
	// 2; a negative value makes none). It also decides the apiserver's watch-cache window (see
	// README.md): at 2/s it holds about 100 s of events, less than the
	// default outage, so direct clients must re-list after it.
	Churn float64
	// Namespaces, Services and PodsPerNode size the cluster the clients
	// watch (FLEET_NAMESPACES default 10, FLEET_SERVICES default 100,
	// FLEET_PODS_PER_NODE default 3). Each pod mounts a ConfigMap and a
	// Secret of its own, which the node's kubelet-like client watches by
	// name.
	Namespaces, Services, PodsPerNode int
	// Out is the directory of the report (FLEET_OUT, default
	// <repo>/_output/fleet); the outposts' logs go to Out/logs/<mode>/.
	Out string
	// LogLevel is the outposts' --log-level (FLEET_LOG_LEVEL, default
	// warn: at info a fleet of outposts logs every stream's re-list).
	LogLevel string
	// OutpostFlags are added to every outpost's flags, in the outpost and
	// shared modes (FLEET_OUTPOST_FLAGS, separated by spaces), such as
	// --watch-cache-recheck=5m to see what a setting costs.
	OutpostFlags []string
}

// withDefaults fills the zero fields.
func (c Config) withDefaults() Config {
	set := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	seti := func(n *int, v int) {
		if *n == 0 {
			*n = v
		}
	}
	seti(&c.Nodes, 50)
	if len(c.Modes) == 0 {
		c.Modes = AllModes
	}
	set(&c.Steady, 2*time.Minute)
	set(&c.Outage, 120*time.Second)
	set(&c.After, 2*time.Minute)
	set(&c.Sample, 5*time.Second)
	if c.Churn == 0 {
		c.Churn = 2
	}
	seti(&c.Namespaces, 10)
	seti(&c.Services, 100)
	seti(&c.PodsPerNode, 3)
	if c.LogLevel == "" {
		c.LogLevel = "warn"
	}
	return c
}

// validate refuses what the cluster cannot hold or the run cannot measure.
func (c Config) validate() error {
	switch {
	case c.Nodes < 1:
		return fmt.Errorf("FLEET_NODES %d: need at least 1", c.Nodes)
	case c.Services > 200:
		// The framework's service CIDR is a /24.
		return fmt.Errorf("FLEET_SERVICES %d: at most 200 fit the service CIDR", c.Services)
	case c.Namespaces < 1 || c.Services < 1 || c.PodsPerNode < 1:
		return fmt.Errorf("FLEET_NAMESPACES, FLEET_SERVICES and FLEET_PODS_PER_NODE must be at least 1")
	case c.Sample <= 0 || c.Steady <= 0 || c.Outage <= 0 || c.After <= 0:
		return fmt.Errorf("FLEET_SAMPLE, FLEET_STEADY, FLEET_OUTAGE and FLEET_AFTER must be positive")
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("FLEET_LOG_LEVEL %q: want debug, info, warn or error", c.LogLevel)
	}
	for _, f := range c.OutpostFlags {
		if !strings.HasPrefix(f, "-") {
			return fmt.Errorf("FLEET_OUTPOST_FLAGS: %q is not a flag such as --watch-cache-recheck=5m", f)
		}
	}
	for _, m := range c.Modes {
		switch m {
		case Direct, Outpost, Shared:
		default:
			return fmt.Errorf("FLEET_MODES: unknown mode %q (want %s)", m, strings.Join(AllModes, ","))
		}
	}
	return nil
}

// ConfigFromEnv reads the FLEET_* variables into a Config with defaults.
func ConfigFromEnv() (Config, error) {
	var c Config
	var errs []string
	num := func(name string, into *int) {
		if v := os.Getenv(name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s=%q: not an integer", name, v))
			}
			*into = n
		}
	}
	dur := func(name string, into *time.Duration) {
		if v := os.Getenv(name); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s=%q: not a duration such as 120s", name, v))
			}
			*into = d
		}
	}
	num("FLEET_NODES", &c.Nodes)
	num("FLEET_NAMESPACES", &c.Namespaces)
	num("FLEET_SERVICES", &c.Services)
	num("FLEET_PODS_PER_NODE", &c.PodsPerNode)
	dur("FLEET_STEADY", &c.Steady)
	dur("FLEET_OUTAGE", &c.Outage)
	dur("FLEET_AFTER", &c.After)
	dur("FLEET_SAMPLE", &c.Sample)
	if v := os.Getenv("FLEET_CHURN"); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil {
			errs = append(errs, fmt.Sprintf("FLEET_CHURN=%q: not a number", v))
		}
		c.Churn = f
	}
	if v := os.Getenv("FLEET_MODES"); v != "" {
		for m := range strings.SplitSeq(v, ",") {
			if m = strings.TrimSpace(m); m != "" {
				c.Modes = append(c.Modes, m)
			}
		}
	}
	c.Out = os.Getenv("FLEET_OUT")
	c.LogLevel = os.Getenv("FLEET_LOG_LEVEL")
	c.OutpostFlags = strings.Fields(os.Getenv("FLEET_OUTPOST_FLAGS"))
	if len(errs) > 0 {
		return c, fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	c = c.withDefaults()
	return c, c.validate()
}
