package bench

import (
	"context"
	"fmt"
	"net/http"
	"sync/atomic"
	"testing"

	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/internal/reader"
	"github.com/outposthq/outpost/internal/share"
)

// list1000rv0 is the LIST workload the apiserver answers from its watch
// cache (resourceVersion "0"): the 1,000 ConfigMaps of listNS, as an
// informer's first list asks them.
func list1000rv0(c *kubernetes.Clientset) func(context.Context) error {
	return func(ctx context.Context) error {
		l, err := c.CoreV1().ConfigMaps(listNS).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
		if err == nil && len(l.Items) != listObject {
			err = fmt.Errorf("listed %d objects, want %d", len(l.Items), listObject)
		}
		return err
	}
}

// answerCount counts the answers one path's clients received, and of them
// those marked as served by outpost's watch cache.
type answerCount struct {
	all, watchCache atomic.Int64
}

// answers are the counts by path, filled by the clients' transports.
var answers = answerCounts{"direct": {}, "floor": {}, "outpost": {}, "shared": {}}

type answerCounts map[string]*answerCount

// wrap is a rest.Config WrapTransport that counts path's answers.
func (a answerCounts) wrap(path string) func(http.RoundTripper) http.RoundTripper {
	n := a[path]
	return func(rt http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(r *http.Request) (*http.Response, error) {
			resp, err := rt.RoundTrip(r)
			if err == nil {
				n.all.Add(1)
				if resp.Header.Get(reader.ServedByHeader) == share.ServedBy {
					n.watchCache.Add(1)
				}
			}
			return resp, err
		})
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// checkShared lists listNS at resourceVersion 0 directly and through the
// outpost with the watch cache, in protobuf and in JSON, and fails b unless
// the outpost's answer came from its watch cache (its X-Outpost-Served-By
// header) and holds the same objects as the apiserver's, field by field.
func checkShared(b *testing.B) {
	ctx := context.Background()
	for enc, cs := range map[string]map[string]*kubernetes.Clientset{"protobuf": clients, "json": jsonClients} {
		opts := metav1.ListOptions{ResourceVersion: "0"}
		want, err := cs["direct"].CoreV1().ConfigMaps(listNS).List(ctx, opts)
		if err != nil {
			b.Fatalf("%s: listing directly: %v", enc, err)
		}
		before := answers["shared"].watchCache.Load()
		got, err := cs["shared"].CoreV1().ConfigMaps(listNS).List(ctx, opts)
		if err != nil {
			b.Fatalf("%s: listing through outpost --watch-cache: %v", enc, err)
		}
		if answers["shared"].watchCache.Load() != before+1 {
			b.Errorf("%s: the LIST at resourceVersion 0 through outpost --watch-cache was not served by its watch cache (no %s: %s)", enc, reader.ServedByHeader, share.ServedBy)
		}
		if len(want.Items) != listObject || !equality.Semantic.DeepEqual(got.Items, want.Items) {
			b.Errorf("%s: outpost --watch-cache listed %d objects, direct %d: not the same objects", enc, len(got.Items), len(want.Items))
			for i := range min(len(got.Items), len(want.Items)) {
				if !equality.Semantic.DeepEqual(got.Items[i], want.Items[i]) {
					b.Logf("first difference at item %d: %s rv %s, direct %s rv %s", i, got.Items[i].Name, got.Items[i].ResourceVersion, want.Items[i].Name, want.Items[i].ResourceVersion)
					break
				}
			}
		}
	}
}

// sharedServed, called before a workload's windows, returns the func to
// call after them with the number of calls the "shared" path made. It
// fails b unless every one of them was answered by the watch cache, as the
// answers' headers and the outpost's outpost_watchcache_served_total{verb="list"}
// both say, and reports the fraction (shared-from-watch-cache, 1 = all).
func sharedServed(b *testing.B) func(calls int) {
	n := answers["shared"]
	all, fromWatchCache := n.all.Load(), n.watchCache.Load()
	servedList := func() float64 { return metric(b, shared, "outpost_watchcache_served_total", `verb="list"`) }
	metricBefore := servedList()
	return func(calls int) {
		gotAll, gotWC := n.all.Load()-all, n.watchCache.Load()-fromWatchCache
		gotMetric := servedList() - metricBefore
		if calls > 0 {
			b.ReportMetric(float64(gotWC)/float64(calls), "shared-from-watch-cache")
		}
		if gotAll != int64(calls) || gotWC != int64(calls) || gotMetric != float64(calls) {
			b.Errorf("outpost --watch-cache: %d calls, %d answers, %d of them marked %s, outpost_watchcache_served_total{verb=list} +%v: want all %d served by the watch cache",
				calls, gotAll, gotWC, share.ServedBy, gotMetric, calls)
		}
	}
}
