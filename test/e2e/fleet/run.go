package fleet

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// notInBuild is what a mode's column says when the built outpost lacks its
// flag.
const notInBuild = "not in this build"

// A modeRun is one mode's run and its figures.
type modeRun struct {
	Mode string
	// Missing says why the mode did not run; the other fields are then
	// zero.
	Missing string
	// T0 is when the clients started; Synced how long until all had
	// synced.
	T0     time.Time
	Synced time.Duration
	// OutageAt and RestoreAt are when every link was cut and restored.
	OutageAt, RestoreAt time.Time
	// Samples are the periodic scrapes, in order.
	Samples []sample
	// Baseline is before the clients started (the apiserver's own
	// watchers); Steady is the second half of the steady state; Reconnect
	// the first minute after the restore (or all of After if shorter);
	// Outage the outage.
	Baseline          sample
	Steady, Reconnect window
	// Start is from Baseline to the steady state's second half: the
	// clients' first lists and watches, and outpost's first access
	// reviews.
	Start            window
	Outage           window
	ReconnectSeconds float64
	// Converged is how long after the restore the last node's clients all
	// held the outage's marker; NodesConverged how many nodes got there
	// within the wait; NotConverged why not all did.
	Converged      time.Duration
	NodesConverged int
	NotConverged   string
	// RSS is each outpost's VmRSS (MB) at the end of the steady state;
	// HarnessRSS the test process's (every node's clients), in MB.
	RSS        []float64
	HarnessRSS float64
	// RSSAnon and RSSFile split each outpost's RSS: anonymous memory (the
	// Go heap and stacks) and file-backed pages (the binary's text, the
	// store's mapped file).
	RSSAnon, RSSFile []float64
	// HeldConns is how many connections the links held at the end of the
	// outage; HarnessFiles the descriptors this process had open then.
	HeldConns, HarnessFiles int
	// OutpostStart, OutpostSteady and OutpostReconnect are the outposts'
	// own figures over the same windows as Start, Steady and Reconnect
	// (none in direct mode).
	OutpostStart, OutpostSteady, OutpostReconnect outpostWindow
}

// OutpostHasFlag reports whether `outpost run --help` of the binary the
// tests run lists flag (such as "--watch-cache").
func OutpostHasFlag(flag string) (bool, error) {
	bin, err := framework.OutpostBinary()
	if err != nil {
		return false, err
	}
	out, err := exec.Command(bin, "run", "--help").CombinedOutput()
	if err != nil && len(out) == 0 {
		return false, fmt.Errorf("%s run --help: %w", bin, err)
	}
	name := strings.TrimLeft(flag, "-")
	for line := range strings.Lines(string(out)) {
		if f := strings.Fields(line); len(f) > 0 && strings.TrimLeft(f[0], "-") == name && strings.HasPrefix(f[0], "-") {
			return true, nil
		}
	}
	return false, nil
}

// runMode runs the fleet in one mode: links and outposts, the clients, the
// steady state, the outage and after. Everything it starts ends with t.
func runMode(t *testing.T, c *cluster, mode string) *modeRun {
	ctx := t.Context()
	cfg := c.cfg
	r := &modeRun{Mode: mode}
	links := make([]*framework.FaultProxy, len(c.nodes))
	outposts := make([]*framework.Outpost, len(c.nodes))
	// Registered first, so run last: the logs are whole once the outposts
	// stopped.
	t.Cleanup(func() {
		if err := keepLogs(cfg.Out, mode, outposts); err != nil {
			t.Logf("%s: keeping the outposts' logs: %v", mode, err)
		}
	})
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for i := range c.nodes {
			wg.Go(func() {
				if outposts[i] != nil {
					outposts[i].Stop()
				}
				if links[i] != nil {
					_ = links[i].Close()
				}
			})
		}
		wg.Wait()
	})

	// Links first, then the outposts behind them: a FaultProxy listening
	// meanwhile could take the port an outpost was just given.
	for i := range c.nodes {
		link, err := framework.StartFaultProxy(c.cp.URL(0))
		if err != nil {
			t.Fatal(err)
		}
		links[i] = link
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(4)
	for i, n := range c.nodes {
		if mode == Direct {
			break
		}
		g.Go(func() error {
			args := append([]string{"--server=" + links[i].URL(), "--log-level=" + cfg.LogLevel}, framework.LenientProbes...)
			if mode == Shared {
				args = append(args, WatchCacheFlag)
			} else {
				// Outpost as it was before the node watch cache.
				args = append(args, WatchCacheFlag+"=false")
			}
			args = append(args, cfg.OutpostFlags...)
			// The framework's free ports are free when chosen, not
			// reserved: with thousands of connections opening on the
			// machine one may be taken before outpost binds it, which a
			// second try with other ports survives.
			// Only an outpost that exited is tried again: one that did
			// not come up in time may still be running, unowned.
			var err error
			for try := 0; try < 3; try++ {
				var o *framework.Outpost
				if o, err = c.cp.StartOutpost(gctx, n.Name, args...); err == nil {
					outposts[i] = o
					break
				}
				if !strings.Contains(err.Error(), "address already in use") {
					break
				}
			}
			if err != nil {
				return fmt.Errorf("outpost of %s: %w", n.Name, err)
			}
			if _, err := outposts[i].WaitState(gctx, "online", time.Minute); err != nil {
				return fmt.Errorf("%w\n%s", err, outposts[i].Log(20))
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatalf("%s: starting the outposts: %v", mode, err)
	}
	// The node's certificate: outpost's copy, or issued for the direct
	// clients.
	certs := make([][2]string, len(c.nodes))
	for i, n := range c.nodes {
		if o := outposts[i]; o != nil {
			certs[i] = [2]string{o.NodeCertFile, o.NodeKeyFile}
			continue
		}
		crt, key, err := c.cp.NodeCredentials(n.Name)
		if err != nil {
			t.Fatal(err)
		}
		certs[i] = [2]string{crt, key}
	}
	config := func(i int) configFor {
		return func(a agent) *rest.Config {
			cfg := &rest.Config{Host: links[i].URL(), TLSClientConfig: rest.TLSClientConfig{CAFile: c.cp.CAFile}}
			if o := outposts[i]; o != nil {
				cfg = &rest.Config{Host: o.URL, TLSClientConfig: rest.TLSClientConfig{CAFile: o.ServingCAFile}}
			}
			if a.ServiceAccount == "" {
				cfg.CertFile, cfg.KeyFile = certs[i][0], certs[i][1]
			} else {
				cfg.BearerToken = c.nodes[i].Tokens[a.Name]
			}
			return cfg
		}
	}

	var obaseline []*outpostSample
	r.Baseline, obaseline = c.scrapeBoth(t, mode, outposts)
	sampler := c.sample(ctx, cfg.Sample)

	// The clients, all at once as after a fleet-wide restart.
	r.T0 = time.Now()
	sets := make([]*nodeClients, len(c.nodes))
	t.Cleanup(func() {
		for _, s := range sets {
			if s != nil {
				s.close()
			}
		}
	})
	g, gctx = errgroup.WithContext(ctx)
	g.SetLimit(8)
	syncCtx, cancel := context.WithTimeout(gctx, max(cfg.Steady, 3*time.Minute))
	defer cancel()
	for i, n := range c.nodes {
		g.Go(func() error {
			s, err := startNode(syncCtx, n, config(i))
			sets[i] = s
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatalf("%s: starting the clients: %v", mode, err)
	}
	r.Synced = time.Since(r.T0)
	t.Logf("%s: %d nodes' clients synced in %v", mode, len(sets), r.Synced.Round(time.Millisecond))

	// Steady state: its second half is measured.
	sleepUntil(ctx, r.T0.Add(cfg.Steady/2))
	from, ofrom := c.scrapeBoth(t, mode, outposts)
	r.Start = between(r.Baseline, from)
	r.OutpostStart = outpostsBetween(obaseline, ofrom)
	sleepUntil(ctx, r.T0.Add(cfg.Steady))
	for _, o := range outposts {
		if o == nil {
			continue
		}
		if mb, err := framework.StatusMB(o.PID(), "VmRSS:"); err == nil {
			r.RSS = append(r.RSS, mb)
		}
		anon, err1 := framework.StatusMB(o.PID(), "RssAnon:")
		file, err2 := framework.StatusMB(o.PID(), "RssFile:")
		if err1 == nil && err2 == nil {
			r.RSSAnon, r.RSSFile = append(r.RSSAnon, anon), append(r.RSSFile, file)
		}
	}
	if mb, err := framework.StatusMB(os.Getpid(), "VmRSS:"); err == nil {
		r.HarnessRSS = mb
	}
	to, oto := c.scrapeBoth(t, mode, outposts)
	r.Steady = between(from, to)
	r.OutpostSteady = outpostsBetween(ofrom, oto)

	// The outage: every link black-holed, the marker written meanwhile.
	for _, l := range links {
		l.Blackhole()
	}
	r.OutageAt = time.Now()
	t.Logf("%s: outage for %v", mode, cfg.Outage)
	sleepUntil(ctx, r.OutageAt.Add(min(5*time.Second, cfg.Outage/3)))
	m, err := c.createMarker(ctx, mode)
	if err != nil {
		t.Fatalf("%s: %v", mode, err)
	}
	sleepUntil(ctx, r.OutageAt.Add(cfg.Outage))
	// The black-holed links hold every connection opened meanwhile, each
	// a descriptor of this process: past its limit they stop accepting.
	r.HeldConns = 0
	for _, l := range links {
		r.HeldConns += l.Conns()
	}
	if fds, err := os.ReadDir("/proc/self/fd"); err == nil {
		r.HarnessFiles = len(fds)
	}
	for _, l := range links {
		l.Pass()
	}
	r.RestoreAt = time.Now()
	restored, orestored := c.scrapeBoth(t, mode, outposts)
	r.Outage = between(to, restored)
	t.Logf("%s: link restored", mode)

	// Convergence is awaited beside the reconnect window's scrape.
	var (
		conv sync.WaitGroup
		late []int
	)
	conv.Go(func() { late = r.converge(ctx, sets, m, max(cfg.After, 3*time.Minute)) })
	reconnect := min(time.Minute, cfg.After)
	sleepUntil(ctx, r.RestoreAt.Add(reconnect))
	reconnected, oreconnected := c.scrapeBoth(t, mode, outposts)
	r.Reconnect = between(restored, reconnected)
	r.OutpostReconnect = outpostsBetween(orestored, oreconnected)
	sleepUntil(ctx, r.RestoreAt.Add(cfg.After))
	conv.Wait()
	r.Samples = sampler()
	if r.NotConverged != "" {
		t.Logf("%s: %s", mode, r.NotConverged)
		for _, i := range late {
			if o := outposts[i]; o != nil {
				t.Logf("%s: outpost of %s says %q; its last lines:\n%s", mode, o.Node, o.State(ctx), o.Log(15))
			}
		}
	} else {
		t.Logf("%s: every node's clients saw the outage's marker %v after the restore", mode, r.Converged.Round(time.Millisecond))
	}
	return r
}

// converge waits up to limit after the restore until every node's clients
// hold the marker, records when the last got there, and returns the nodes
// (indices) that did not.
func (r *modeRun) converge(ctx context.Context, sets []*nodeClients, m *marker, limit time.Duration) (late []int) {
	done := make([]bool, len(sets))
	for {
		all := true
		for i, s := range sets {
			if !done[i] && s.seen(m) {
				done[i] = true
				r.NodesConverged++
			}
			all = all && done[i]
		}
		if all {
			r.Converged = time.Since(r.RestoreAt)
			return nil
		}
		if time.Since(r.RestoreAt) > limit || ctx.Err() != nil {
			var names []string
			for i, s := range sets {
				if !done[i] {
					late = append(late, i)
					names = append(names, s.node+" ("+strings.Join(s.missing(m), ", ")+")")
				}
			}
			slices.Sort(names)
			if len(names) > 3 {
				names = append(names[:3], "…")
			}
			r.NotConverged = fmt.Sprintf("%d of %d nodes' clients lack the outage's marker %v after the restore: %s",
				len(sets)-r.NodesConverged, len(sets), limit, strings.Join(names, "; "))
			return late
		}
		select {
		case <-ctx.Done():
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// missing names the informers of the node that lack the marker.
func (nc *nodeClients) missing(m *marker) []string {
	var out []string
	for _, w := range nc.watches {
		if !w.seen(nc.node, m) {
			out = append(out, w.agent+" "+w.kind)
		}
	}
	return out
}

// sample scrapes the apiserver every period until ctx ends or the returned
// function is called, which returns the samples taken.
func (c *cluster) sample(ctx context.Context, period time.Duration) func() []sample {
	ctx, cancel := context.WithCancel(ctx)
	var (
		wg      sync.WaitGroup
		samples []sample
	)
	wg.Go(func() {
		tick := time.NewTicker(period)
		defer tick.Stop()
		for {
			if s, err := c.scrape(ctx); err == nil {
				samples = append(samples, s)
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	})
	return func() []sample {
		cancel()
		wg.Wait()
		return samples
	}
}

// scrapeBoth reads the apiserver's figures and, at the same time, the
// outposts' (none in direct mode), so that both describe the same window;
// an outpost that does not answer is left out, and said.
func (c *cluster) scrapeBoth(t *testing.T, mode string, outposts []*framework.Outpost) (sample, []*outpostSample) {
	t.Helper()
	var (
		outs []*outpostSample
		err  error
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		outs, err = scrapeOutposts(t.Context(), outposts)
	}()
	s := c.mustScrape(t)
	<-done
	if err != nil {
		t.Logf("%s: %v", mode, err)
	}
	return s, outs
}

func (c *cluster) mustScrape(t *testing.T) sample {
	t.Helper()
	s, err := c.scrape(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func sleepUntil(ctx context.Context, at time.Time) {
	select {
	case <-ctx.Done():
	case <-time.After(time.Until(at)):
	}
}
