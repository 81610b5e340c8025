// Package bench compares client requests made directly to kube-apiserver
// with the same requests made through outpost, side by side in one run, on a
// real local control plane. Run with `make bench`.
package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	goruntime "runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var (
	cp      *framework.ControlPlane
	hub     *framework.Outpost
	shared  *framework.Outpost                   // a second outpost, with --watch-cache
	floor   *exec.Cmd                            // floorproxy, see startFloor
	clients = map[string]*kubernetes.Clientset{} // "direct", "floor", "outpost", "shared"
	// jsonClients are the same speaking JSON, as kubectl and scripts do.
	jsonClients = map[string]*kubernetes.Clientset{}
	token       string // the bench service account's
	floorURL    string
)

const (
	ns         = "bench"
	listNS     = "bench-list"
	listObject = 1000
	list10kNS  = "bench-10k"
)

func TestMain(m *testing.M) {
	code := framework.Run(m, framework.Options{}, &cp)
	if hub != nil {
		hub.Stop()
	}
	if shared != nil {
		shared.Stop()
	}
	stopFloor()
	os.Exit(code)
}

var setupOnce sync.Once

// setup starts the outposts and seeds objects once for all benchmarks.
func setup(b *testing.B) {
	setupOnce.Do(func() {
		ctx := context.Background()
		var err error
		hub, err = cp.StartOutpost(ctx, "edge-bench", "--log-level=warn", "--watch-cache=false")
		if err != nil {
			b.Fatalf("starting outpost: %v", err)
		}
		shared, err = cp.StartOutpost(ctx, "edge-bench-shared", "--log-level=warn", "--watch-cache")
		if err != nil {
			b.Fatalf("starting outpost --watch-cache: %v", err)
		}
		floorURL = startFloor(b)
		pinCores(b)
		// A service account's token: outpost shares answers with token
		// callers (after an access review made with the token).
		token = cp.ServiceAccountToken(b, "default", "bench", "cluster-admin")
		for name, host := range map[string]string{"direct": cp.URL(0), "floor": floorURL, "outpost": hub.URL, "shared": shared.URL} {
			ca := cp.CAFile
			switch name {
			case "floor", "outpost":
				ca = hub.ServingCAFile // floorproxy serves with outpost's certificate
			case "shared":
				ca = shared.ServingCAFile
			}
			cfg := &rest.Config{Host: host, BearerToken: token, QPS: -1, TLSClientConfig: rest.TLSClientConfig{CAFile: ca}}
			// Every answer is counted, with those the watch cache served.
			cfg.WrapTransport = answers.wrap(name)
			clients[name] = kubernetes.NewForConfigOrDie(cfg)
			cfg = rest.CopyConfig(cfg)
			cfg.ContentType, cfg.AcceptContentTypes = "application/json", "application/json"
			jsonClients[name] = kubernetes.NewForConfigOrDie(cfg)
		}
		c := cp.Client()
		if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		if _, err := c.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "target"}, Data: map[string]string{"k": "v"}}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		seedConfigMaps(b, listNS, listObject, 256, 16)
		seedConfigMaps(b, list10kNS, 10000, 256, 32)
	})
	if hub == nil {
		b.Fatal("setup failed earlier")
	}
}

// seedConfigMaps creates namespace ns with n ConfigMaps of size bytes (see
// framework.SeedConfigMaps), as the cluster admin without client-side rate
// limits.
func seedConfigMaps(b *testing.B, ns string, n, size, parallel int) {
	cfg := cp.AdminConfig()
	cfg.QPS = -1
	if err := framework.SeedConfigMaps(context.Background(), kubernetes.NewForConfigOrDie(cfg), ns, n, size, parallel); err != nil {
		b.Error(err)
	}
}

// measure runs op b.N times over `clients` goroutines and reports p50 and
// p99 latency and throughput.
func measure(b *testing.B, concurrency int, op func(ctx context.Context) error) {
	ctx := context.Background()
	for range 5 { // warm connections and caches
		if err := op(ctx); err != nil {
			b.Fatal(err)
		}
	}
	lat := make([][]time.Duration, concurrency)
	var next sync.Mutex
	remaining := b.N
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for w := range concurrency {
		wg.Go(func() {
			for {
				next.Lock()
				if remaining == 0 {
					next.Unlock()
					return
				}
				remaining--
				next.Unlock()
				t0 := time.Now()
				if err := op(ctx); err != nil {
					b.Error(err)
					return
				}
				lat[w] = append(lat[w], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	if len(all) == 0 {
		return
	}
	b.ReportMetric(float64(all[len(all)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(all[len(all)*99/100].Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(len(all))/elapsed.Seconds(), "req/s")
}

// reportFromCache, deferred around an online benchmark through an outpost
// (path "outpost" or "shared"), reports how many of its answers that
// outpost served from its cache: when a health probe fails under load,
// outpost answers reads from the cache, and then the benchmark no longer
// measures the online path. It must be 0. The metric is named from-cache
// for "outpost", shared-from-cache for "shared".
func reportFromCache(b *testing.B, path string) func() {
	o := outpostOf(path)
	if o == nil {
		return func() {}
	}
	before := servedFromCache(b, o)
	return func() {
		n := servedFromCache(b, o) - before
		name := "from-cache"
		if path != "outpost" {
			name = path + "-" + name
		}
		b.ReportMetric(n, name)
		if n > 0 {
			b.Logf("%s: outpost served %v answers from its cache; its log:\n%s", path, n, o.Log(15))
		}
	}
}

// outpostOf is the outpost on a path, or nil.
func outpostOf(path string) *framework.Outpost {
	switch path {
	case "outpost":
		return hub
	case "shared":
		return shared
	}
	return nil
}

// servedFromCache sums o's outpost_requests_total{served_by="cache"}.
func servedFromCache(b *testing.B, o *framework.Outpost) float64 {
	return metric(b, o, "outpost_requests_total", `served_by="cache"`)
}

// getTarget is the GET workload: one small ConfigMap.
func getTarget(c *kubernetes.Clientset) func(context.Context) error {
	return func(ctx context.Context) error {
		_, err := c.CoreV1().ConfigMaps(ns).Get(ctx, "target", metav1.GetOptions{})
		return err
	}
}

// list1000 is the LIST workload: the 1,000 ConfigMaps of listNS.
func list1000(c *kubernetes.Clientset) func(context.Context) error {
	return func(ctx context.Context) error {
		l, err := c.CoreV1().ConfigMaps(listNS).List(ctx, metav1.ListOptions{})
		if err == nil && len(l.Items) != listObject {
			err = fmt.Errorf("listed %d objects, want %d", len(l.Items), listObject)
		}
		return err
	}
}

// list10k is the large LIST workload: the 10,000 ConfigMaps of list10kNS.
func list10k(c *kubernetes.Clientset) func(context.Context) error {
	return func(ctx context.Context) error {
		l, err := c.CoreV1().ConfigMaps(list10kNS).List(ctx, metav1.ListOptions{})
		if err == nil && len(l.Items) != 10000 {
			err = fmt.Errorf("listed %d objects, want 10000", len(l.Items))
		}
		return err
	}
}

// inProtobuf and inJSON run a workload with the path's clients speaking
// protobuf (as client-go does by default) or JSON.
func inProtobuf(op func(*kubernetes.Clientset) func(context.Context) error) func(string) func(context.Context) error {
	return func(path string) func(context.Context) error { return op(clients[path]) }
}

func inJSON(op func(*kubernetes.Clientset) func(context.Context) error) func(string) func(context.Context) error {
	return func(path string) func(context.Context) error { return op(jsonClients[path]) }
}

func BenchmarkGet(b *testing.B) { directAndOutpost(b, getTarget) }

func BenchmarkList1000(b *testing.B) { directAndOutpost(b, list1000) }

// directAndOutpost measures workload directly and through outpost, by one
// client and by 64 at once, one after the other.
func directAndOutpost(b *testing.B, workload func(*kubernetes.Clientset) func(context.Context) error) {
	setup(b)
	for _, conc := range []int{1, 64} {
		for _, path := range []string{"direct", "outpost"} {
			b.Run(fmt.Sprintf("c%d/%s", conc, path), func(b *testing.B) {
				defer reportFromCache(b, path)()
				measure(b, conc, workload(clients[path]))
			})
		}
	}
}

// BenchmarkInterleaved runs the GET and LIST workloads of BenchmarkGet and
// BenchmarkList1000 directly, through floorproxy and through outpost in
// alternating windows (direct, floor, outpost, then outpost, floor, direct,
// ...; each window long enough for every client to make several calls), and
// reports each path's p50 and throughput over all its windows and the
// ratios to direct: p50-ratio and throughput-ratio for outpost,
// floor-p50-ratio and floor-throughput-ratio for floorproxy. Run one after
// the other, as the other benchmarks are, the paths see the machine at
// different moments (a compaction, a controller's resync, another process),
// and their ratio moves by ±20% from run to run; interleaved, all see the
// same moments. floorproxy is the bare cost of a Go TLS HTTP/2 proxy hop on
// this machine: what outpost adds beyond it is outpost's own.
//
// The LISTs at resourceVersion 0 (list-rv0-*, issue 16) run a fourth path,
// "shared": a second outpost started with --watch-cache, which answers
// them from its node watch cache; shared-p50-ratio and
// shared-throughput-ratio are its ratios to direct. Each such workload
// checks that the shared outpost's answers are the objects direct answers
// (before and after its windows) and that every answer in its windows came
// from the watch cache (see checkShared and sharedServed); it fails if not.
func BenchmarkInterleaved(b *testing.B) {
	setup(b)
	for _, w := range workloads {
		b.Run(w.name, func(b *testing.B) {
			paths := w.paths()
			defer reportFromCache(b, "outpost")()
			var served func(calls int)
			if w.shared {
				defer reportFromCache(b, "shared")()
				checkShared(b)
				served = sharedServed(b)
			}
			lat := map[string][]time.Duration{}
			busy := map[string]time.Duration{}
			for r := range w.rounds {
				order := slices.Clone(paths)
				if r%2 == 1 {
					slices.Reverse(order)
				}
				for _, path := range order {
					l, d, err := runWindow(w.concurrency, w.window, w.op(path))
					if err != nil {
						b.Fatalf("%s: %v", path, err)
					}
					lat[path] = append(lat[path], l...)
					busy[path] += d
				}
			}
			for range b.N {
			}
			p50 := map[string]float64{}
			rate := map[string]float64{}
			for path, l := range lat {
				slices.Sort(l)
				p50[path] = float64(l[len(l)/2].Microseconds()) / 1000
				rate[path] = float64(len(l)) / busy[path].Seconds()
				b.ReportMetric(p50[path], path+"-p50-ms")
				b.ReportMetric(rate[path], path+"-req/s")
			}
			b.ReportMetric(p50["outpost"]/p50["direct"], "p50-ratio")
			b.ReportMetric(rate["outpost"]/rate["direct"], "throughput-ratio")
			b.ReportMetric(p50["floor"]/p50["direct"], "floor-p50-ratio")
			b.ReportMetric(rate["floor"]/rate["direct"], "floor-throughput-ratio")
			if w.shared {
				b.ReportMetric(p50["shared"]/p50["direct"], "shared-p50-ratio")
				b.ReportMetric(rate["shared"]/rate["direct"], "shared-throughput-ratio")
				served(len(lat["shared"]))
				checkShared(b)
			}
		})
	}
}

// workload is an online workload of BenchmarkInterleaved and
// BenchmarkProfile, with the window and rounds of BenchmarkInterleaved.
type workload struct {
	name        string
	concurrency int
	op          func(path string) func(context.Context) error
	window      time.Duration
	rounds      int
	// shared adds the path through outpost --watch-cache.
	shared bool
}

// paths are the paths w runs on.
func (w workload) paths() []string {
	if w.shared {
		return []string{"direct", "floor", "outpost", "shared"}
	}
	return []string{"direct", "floor", "outpost"}
}

var workloads = []workload{
	{"get-c1", 1, inProtobuf(getTarget), 250 * time.Millisecond, 12, false},
	{"get-c64", 64, inProtobuf(getTarget), 250 * time.Millisecond, 12, false},
	{"list-c1", 1, inProtobuf(list1000), 500 * time.Millisecond, 8, false},
	{"list-c64", 64, inProtobuf(list1000), 2 * time.Second, 6, false},
	// Issue 20: JSON lists, as kubectl and scripts ask, against the floor.
	{"list-json-c1", 1, inJSON(list1000), 500 * time.Millisecond, 8, false},
	{"list-json-c16", 16, inJSON(list1000), 2 * time.Second, 6, false},
	{"list10k-json-c1", 1, inJSON(list10k), 3 * time.Second, 4, false},
	{"list10k-json-c16", 16, inJSON(list10k), 6 * time.Second, 3, false},
	// Issue 16: LISTs the apiserver answers from its watch cache, and
	// outpost --watch-cache from its own.
	{"list-rv0-c1", 1, inProtobuf(list1000rv0), 500 * time.Millisecond, 8, true},
	{"list-rv0-c64", 64, inProtobuf(list1000rv0), 2 * time.Second, 6, true},
	{"list-rv0-json-c1", 1, inJSON(list1000rv0), 500 * time.Millisecond, 8, true},
	{"list-rv0-json-c64", 64, inJSON(list1000rv0), 2 * time.Second, 6, true},
}

// runWindow runs op from `concurrency` goroutines for d (each finishes the
// call it is in) and returns every call's latency and the time it took.
func runWindow(concurrency int, d time.Duration, op func(context.Context) error) ([]time.Duration, time.Duration, error) {
	ctx := context.Background()
	lat := make([][]time.Duration, concurrency)
	errs := make([]error, concurrency)
	start := time.Now()
	deadline := start.Add(d)
	var wg sync.WaitGroup
	for g := range concurrency {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if err := op(ctx); err != nil {
					errs[g] = err
					return
				}
				lat[g] = append(lat[g], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, 0, err
	}
	if len(all) == 0 {
		return nil, 0, fmt.Errorf("no call ended within %v", d)
	}
	return all, elapsed, nil
}

// BenchmarkWatchDelivery measures the time from a write made directly to
// the apiserver until a watcher receives the event, directly and through
// outpost.
func BenchmarkWatchDelivery(b *testing.B) {
	setup(b)
	for _, path := range []string{"direct", "outpost"} {
		b.Run(path, func(b *testing.B) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			w, err := clients[path].CoreV1().ConfigMaps(ns).Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=target", ResourceVersion: "0"})
			if err != nil {
				b.Fatal(err)
			}
			defer w.Stop()
			<-w.ResultChan() // the initial ADDED
			writer := cp.Client().CoreV1().ConfigMaps(ns)
			var lat []time.Duration
			b.ResetTimer()
			for i := range b.N {
				// A value never written before: an update that changes
				// nothing sends no event.
				val := path + strconv.FormatInt(time.Now().UnixNano(), 10) + "-" + strconv.Itoa(i)
				cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "target"}, Data: map[string]string{"k": val}}
				t0 := time.Now()
				if _, err := writer.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
					b.Fatal(err)
				}
				for ev := range w.ResultChan() {
					if ev.Type == watch.Modified && ev.Object.(*corev1.ConfigMap).Data["k"] == val {
						break
					}
				}
				lat = append(lat, time.Since(t0))
			}
			b.StopTimer()
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
		})
	}
}

// BenchmarkProfile runs only when OUTPOST_BENCH_PROFILE names a directory.
// It runs each online workload for a fixed time, directly and through
// outpost, and reports the requests per second and the CPU time each
// process of the path spent per request (the benchmark's own clients, the
// apiserver, etcd, outpost): on a small machine they share the cores, so
// outpost's CPU per request is what its throughput costs. Through outpost it
// also saves outpost's CPU profile and the allocations made meanwhile (from
// its admin /debug/pprof) as <workload>.cpu.pprof and
// <workload>.allocs.pprof; read them with `go tool pprof -top <file>`. The
// list-rv0 workloads also run through outpost --watch-cache ("shared"),
// whose profiles are <workload>.shared.cpu.pprof and
// <workload>.shared.allocs.pprof. OUTPOST_BENCH_PROFILE_ONLY, a regular
// expression, limits the workloads to those whose names it matches.
func BenchmarkProfile(b *testing.B) {
	dir := os.Getenv("OUTPOST_BENCH_PROFILE")
	if dir == "" {
		b.Skip("set OUTPOST_BENCH_PROFILE=dir to profile outpost under load")
	}
	only, err := regexp.Compile(os.Getenv("OUTPOST_BENCH_PROFILE_ONLY"))
	if err != nil {
		b.Fatalf("OUTPOST_BENCH_PROFILE_ONLY: %v", err)
	}
	setup(b)
	const seconds = 10
	for _, w := range workloads {
		if !only.MatchString(w.name) {
			continue
		}
		for _, path := range w.paths() {
			b.Run(w.name+"/"+path, func(b *testing.B) {
				procs := pathProcesses(b)
				before, busyBefore := cpuTimes(procs), machineBusy(b)
				var wg sync.WaitGroup
				if o := outpostOf(path); o != nil {
					prefix := w.name
					if path != "outpost" {
						prefix += "." + path
					}
					for _, kind := range []string{"profile", "allocs"} {
						wg.Go(func() {
							name := fmt.Sprintf("%s/%s.%s.pprof", dir, prefix, strings.Replace(kind, "profile", "cpu", 1))
							if err := savePprof(o.AdminURL+"/debug/pprof/"+kind+"?seconds="+strconv.Itoa(seconds), name); err != nil {
								b.Error(err)
							}
						})
					}
				}
				lat, elapsed, err := runWindow(w.concurrency, seconds*time.Second, w.op(path))
				wg.Wait()
				if err != nil {
					b.Fatal(err)
				}
				after, busyAfter := cpuTimes(procs), machineBusy(b)
				n := float64(len(lat))
				b.ReportMetric(n/elapsed.Seconds(), "req/s")
				var ours time.Duration
				for name, t := range after {
					b.ReportMetric(float64((t-before[name]).Microseconds())/n, name+"-cpu-us/req")
					ours += t - before[name]
				}
				// Whether the path used the cores, and whether others did.
				b.ReportMetric(ours.Seconds()/elapsed.Seconds(), "paths-cores")
				b.ReportMetric((busyAfter-busyBefore).Seconds()/elapsed.Seconds(), "machine-busy-cores")
				for range b.N {
				}
			})
		}
	}
}

// pinCores, with OUTPOST_BENCH_PIN=1, puts the control plane (etcd and
// kube-apiserver) on the last core, and this process (the clients) and
// outpost on the others. In production the apiserver runs in the cloud and
// outpost on the node, so outpost's CPU never comes out of the apiserver's;
// on one small machine it does unless they are pinned apart. Direct and
// proxied runs then compare the same apiserver capacity.
func pinCores(b *testing.B) {
	if os.Getenv("OUTPOST_BENCH_PIN") == "" {
		return
	}
	n := goruntime.NumCPU()
	if n < 2 {
		b.Fatal("OUTPOST_BENCH_PIN needs two cores or more")
	}
	controlPlane, others := strconv.Itoa(n-1), "0-"+strconv.Itoa(n-2)
	for name, pid := range pathProcesses(b) {
		cpus := others
		if name == "kube-apiserver" || name == "etcd" {
			cpus = controlPlane
		}
		// -a: every thread of the process; threads made later inherit it.
		if out, err := exec.Command("taskset", "-a", "-p", "-c", cpus, strconv.Itoa(pid)).CombinedOutput(); err != nil {
			b.Fatalf("pinning %s: %v\n%s", name, err, out)
		}
	}
}

// pathProcesses finds the processes on the request paths by pid: this test
// binary, the control plane's etcd and apiserver (their command lines name
// its directory), floorproxy, outpost, and the outpost with --watch-cache
// ("shared").
func pathProcesses(b *testing.B) map[string]int {
	procs := map[string]int{"client": os.Getpid(), "outpost": hub.PID(), "shared": shared.PID()}
	if floor != nil {
		procs["floor"] = floor.Process.Pid
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		b.Fatal(err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !strings.Contains(string(cmdline), cp.Dir) {
			continue
		}
		exe, _, _ := strings.Cut(string(cmdline), "\x00")
		switch base := exe[strings.LastIndexByte(exe, '/')+1:]; base {
		case "kube-apiserver", "etcd":
			procs[base] = pid
		}
	}
	return procs
}

// cpuTimes returns the user+system CPU time of each process so far.
func cpuTimes(procs map[string]int) map[string]time.Duration {
	out := map[string]time.Duration{}
	for name, pid := range procs {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// Fields after the command name, which is in parentheses: utime
		// and stime are the 12th and 13th, in clock ticks (100 per second).
		f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
		utime, _ := strconv.ParseInt(f[11], 10, 64)
		stime, _ := strconv.ParseInt(f[12], 10, 64)
		out[name] = time.Duration(utime+stime) * 10 * time.Millisecond
	}
	return out
}

// machineBusy returns the CPU time all cores of the machine spent busy so
// far (every field of /proc/stat's "cpu" line but idle and iowait).
func machineBusy(b *testing.B) time.Duration {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	line, _, _ := strings.Cut(string(data), "\n")
	f := strings.Fields(line)
	var ticks int64
	for i, v := range f[1:] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			b.Fatalf("/proc/stat: %q", line)
		}
		if i != 3 && i != 4 && i < 8 { // idle, iowait; guest time is in user already
			ticks += n
		}
	}
	return time.Duration(ticks) * 10 * time.Millisecond
}

// savePprof saves the profile outpost's /debug/pprof answers at url.
func savePprof(url, path string) error {
	profile, err := framework.GetOK(context.Background(), nil, url)
	if err != nil {
		return err
	}
	return os.WriteFile(path, profile, 0o644)
}

// BenchmarkX100k follows a cache of 100,000 objects (ConfigMaps of about
// 350 bytes in JSON) recorded from one LIST through a fresh outpost. It
// reports how long after the LIST answered its view was stored
// (persist-s), outpost's resident memory once idle with them cached
// (cached-idle-RSS-MB), the time from starting it again with the cloud
// unreachable until its /readyz says ready (offline-start-to-ready-ms), the
// time of its first offline LIST of all of them (offline-list-ms), and its
// resident memory right after that LIST (after-offline-list-RSS-MB), 3 s
// later (offline-idle-RSS-MB) and at its peak since the restart
// (offline-peak-RSS-MB), with the
// same LIST made directly online for comparison (online-direct-list-ms).
// It runs before BenchmarkYOfflineList10k stops the apiserver.
func BenchmarkX100k(b *testing.B) {
	setup(b)
	ctx := context.Background()
	const ns, n = "bench-100k", 100000
	seedConfigMaps(b, ns, n, 100, 64)
	if b.Failed() {
		return
	}

	// The same LIST made directly, for comparison.
	direct := clients["direct"]
	t0 := time.Now()
	if l, err := direct.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{}); err != nil || len(l.Items) != n {
		b.Fatalf("listing directly: %v", err)
	}
	b.ReportMetric(float64(time.Since(t0).Microseconds())/1000, "online-direct-list-ms")

	o, err := cp.StartOutpost(ctx, "edge-100k", "--log-level=warn", "--watch-cache=false")
	if err != nil {
		b.Fatal(err)
	}
	defer o.Stop()
	oc := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", token))
	list := func() time.Duration {
		t0 := time.Now()
		l, err := oc.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if len(l.Items) != n {
			b.Fatalf("listed %d objects, want %d", len(l.Items), n)
		}
		return time.Since(t0)
	}
	replaced := func() float64 { return metric(b, o, "outpost_cache_views_replaced_total") }
	before := replaced()
	// With OUTPOST_BENCH_PROFILE=dir, outpost's CPU profile while it
	// records, and its heap and memory map once idle, are saved there.
	dir := os.Getenv("OUTPOST_BENCH_PROFILE")
	var profiled sync.WaitGroup
	if dir != "" {
		profiled.Go(func() {
			if err := savePprof(o.AdminURL+"/debug/pprof/profile?seconds=15", dir+"/record-100k.cpu.pprof"); err != nil {
				b.Error(err)
			}
		})
	}
	list()
	answered := time.Now()
	for replaced() == before {
		if time.Since(answered) > time.Minute {
			b.Fatal("the 100,000-object list was not stored within a minute")
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.ReportMetric(time.Since(answered).Seconds(), "persist-s")
	time.Sleep(3 * time.Second)
	b.ReportMetric(rssMB(b, o.PID()), "cached-idle-RSS-MB")
	if fi, err := os.Stat(filepath.Join(o.DataDir, "cache.db")); err == nil {
		b.ReportMetric(float64(fi.Size())/(1<<20), "cache-db-MB")
	}
	if dir != "" {
		profiled.Wait()
		if err := savePprof(o.AdminURL+"/debug/pprof/heap", dir+"/cached-100k.heap.pprof"); err != nil {
			b.Error(err)
		}
		if smaps, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", o.PID())); err == nil {
			_ = os.WriteFile(dir+"/cached-100k.smaps", smaps, 0o644)
		}
	}

	// Start again with the cloud unreachable: --server replaces the
	// kubeconfig's apiserver with a port nothing listens on.
	o.Stop()
	o.ExtraArgs = []string{"--server=https://127.0.0.1:" + strconv.Itoa(framework.FreePort(b))}
	ready := make(chan time.Duration, 1)
	t0 = time.Now()
	go func() {
		for time.Since(t0) < 30*time.Second {
			if _, err := framework.GetOK(ctx, nil, o.AdminURL+"/readyz"); err == nil {
				ready <- time.Since(t0)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
		close(ready)
	}()
	if err := o.Start(ctx); err != nil {
		b.Fatal(err)
	}
	d, ok := <-ready
	if !ok {
		b.Fatal("outpost restarted offline was not ready within 30 s")
	}
	b.ReportMetric(float64(d.Microseconds())/1000, "offline-start-to-ready-ms")
	b.ReportMetric(float64(list().Microseconds())/1000, "offline-list-ms")
	b.ReportMetric(rssMB(b, o.PID()), "after-offline-list-RSS-MB")
	time.Sleep(3 * time.Second)
	b.ReportMetric(rssMB(b, o.PID()), "offline-idle-RSS-MB")
	// Of which the store's pages bbolt maps from the file, clean page
	// cache the kernel reclaims when memory is short, and the rest.
	b.ReportMetric(statusMB(b, o.PID(), "RssFile:"), "offline-idle-file-MB")
	b.ReportMetric(statusMB(b, o.PID(), "RssAnon:"), "offline-idle-anon-MB")
	b.ReportMetric(statusMB(b, o.PID(), "VmHWM:"), "offline-peak-RSS-MB")
	for range b.N {
	}
}

// metric returns the sum of the samples of one of o's metrics whose labels
// match each of match (see framework.SumMetric).
func metric(b *testing.B, o *framework.Outpost, name string, match ...string) float64 {
	v, err := o.Metric(name, match...)
	if err != nil {
		b.Fatal(err)
	}
	return v
}

// BenchmarkYOfflineList10k compares a LIST of 10,000 objects answered by
// the apiserver (directly, online) with the same LIST answered by outpost
// from its cache while the apiserver is down. It stops the apiserver, so it
// runs after the online benchmarks (by name) and before the RSS report.
func BenchmarkYOfflineList10k(b *testing.B) {
	setup(b)
	ctx := context.Background()
	const ns, n = list10kNS, 10000
	seed10k.Do(func() {
		// Recorded through outpost while online.
		if l, err := clients["outpost"].CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{}); err != nil || len(l.Items) != n {
			b.Fatalf("recording list: %v", err)
		}
		time.Sleep(2 * time.Second)
	})
	list := func(c *kubernetes.Clientset) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			l, err := c.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
			if err == nil && len(l.Items) != n {
				err = fmt.Errorf("listed %d objects, want %d", len(l.Items), n)
			}
			return err
		}
	}
	b.Run("online-direct", func(b *testing.B) { measure(b, 1, list(clients["direct"])) })
	b.Run("offline-outpost", func(b *testing.B) {
		if !apiserverStopped {
			if err := cp.StopAPIServer(0); err != nil {
				b.Fatal(err)
			}
			apiserverStopped = true
			time.Sleep(2 * time.Second) // outpost notices
		}
		measure(b, 1, list(clients["outpost"]))
	})
}

var (
	seed10k          sync.Once
	apiserverStopped bool
)

// BenchmarkZIdleRSS reports the resident memory of outpost idle: a fresh
// one that has only proxied a few requests, and the one that served the
// benchmarks above (named to run last). The same for outpost
// --watch-cache: a fresh one whose watch cache holds one scope, the 1,000
// ConfigMaps of listNS, after one LIST at resourceVersion 0
// (fresh-shared-RSS-MB, with the bytes the watch cache counts,
// fresh-shared-watchcache-MB), and the one that served the benchmarks.
// BenchmarkYOfflineList10k stops the apiserver: it is started again first,
// so that both fresh outposts are measured online.
func BenchmarkZIdleRSS(b *testing.B) {
	setup(b)
	ctx := context.Background()
	if apiserverStopped {
		if err := cp.StartAPIServer(0); err != nil {
			b.Fatal(err)
		}
		apiserverStopped = false
	}
	fresh, err := cp.StartOutpost(ctx, "edge-idle", "--log-level=warn", "--watch-cache=false")
	if err != nil {
		b.Fatal(err)
	}
	defer fresh.Stop()
	freshShared, err := cp.StartOutpost(ctx, "edge-idle-shared", "--log-level=warn", "--watch-cache")
	if err != nil {
		b.Fatal(err)
	}
	defer freshShared.Stop()
	fromWatchCache := func() float64 {
		return metric(b, freshShared, "outpost_watchcache_served_total", `verb="list"`)
	}
	c := kubernetes.NewForConfigOrDie(freshShared.ClientConfig("", "", token))
	// The first LIST may go upstream while the stream starts: list until
	// one is served from the watch cache.
	_, err = framework.Poll(ctx, 100*time.Millisecond, 30*time.Second, func(ctx context.Context) (bool, string) {
		if err := list1000rv0(c)(ctx); err != nil {
			return false, err.Error()
		}
		return fromWatchCache() > 0, "not served from the watch cache yet"
	})
	if err != nil {
		b.Fatalf("outpost --watch-cache: %v", err)
	}
	time.Sleep(3 * time.Second) // a few probes, then idle
	for range b.N {
	}
	b.ReportMetric(rssMB(b, fresh.PID()), "fresh-RSS-MB")
	b.ReportMetric(rssMB(b, hub.PID()), "after-load-RSS-MB")
	b.ReportMetric(statusMB(b, hub.PID(), "RssAnon:"), "after-load-anon-MB")
	b.ReportMetric(statusMB(b, hub.PID(), "RssFile:"), "after-load-file-MB")
	b.ReportMetric(rssMB(b, freshShared.PID()), "fresh-shared-RSS-MB")
	b.ReportMetric(metric(b, freshShared, "outpost_watchcache_bytes")/(1<<20), "fresh-shared-watchcache-MB")
	b.ReportMetric(rssMB(b, shared.PID()), "shared-after-load-RSS-MB")
	b.ReportMetric(statusMB(b, shared.PID(), "RssAnon:"), "shared-after-load-anon-MB")
}

func rssMB(b *testing.B, pid int) float64 { return statusMB(b, pid, "VmRSS:") }

// statusMB reads a memory figure (VmRSS:, VmHWM:) of a process.
func statusMB(b *testing.B, pid int, field string) float64 {
	v, err := framework.StatusMB(pid, field)
	if err != nil {
		b.Fatal(err)
	}
	return v
}

// startFloor builds floorproxy and starts it in front of the apiserver,
// serving with outpost's certificate, and returns its URL once it answers.
func startFloor(b *testing.B) string {
	root, err := framework.RepoRoot()
	if err != nil {
		b.Fatal(err)
	}
	bin := filepath.Join(cp.Dir, "floorproxy")
	build := exec.Command("go", "build", "-o", bin, "./test/e2e/bench/floorproxy")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("building floorproxy: %v\n%s", err, out)
	}
	addr := "127.0.0.1:" + strconv.Itoa(framework.FreePort(b))
	pki := filepath.Join(hub.DataDir, "pki")
	logFile, err := os.Create(filepath.Join(cp.Dir, "floorproxy.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer logFile.Close()
	floor = exec.Command(bin, addr, cp.URL(0), cp.CAFile, filepath.Join(pki, "serving.crt"), filepath.Join(pki, "serving.key"))
	floor.Stdout, floor.Stderr = logFile, logFile
	floor.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := floor.Start(); err != nil {
		b.Fatal(err)
	}
	url := "https://" + addr
	cfg := &rest.Config{Host: url, TLSClientConfig: rest.TLSClientConfig{CAFile: hub.ServingCAFile}}
	c := kubernetes.NewForConfigOrDie(cfg)
	_, err = framework.Poll(context.Background(), 50*time.Millisecond, 10*time.Second, func(context.Context) (bool, string) {
		if _, err := c.Discovery().ServerVersion(); err != nil {
			return false, err.Error()
		}
		return true, ""
	})
	if err != nil {
		b.Fatalf("floorproxy did not answer: %v", err)
	}
	return url
}

// stopFloor ends floorproxy, if it was started.
func stopFloor() {
	if floor != nil && floor.Process != nil {
		_ = floor.Process.Kill()
		_ = floor.Wait()
	}
}
