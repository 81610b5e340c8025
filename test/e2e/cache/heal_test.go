package cache_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestDamagedPageHealed: a page of the store file in use is damaged while
// outpost is down (a bad sector, a stray write) where Open does not look.
// Outpost, with the node watch cache on, whose streams keep their views
// fresh by watching and never replace them whole, finds the damage after
// it starts, rebuilds the file from what still reads, keeps the damaged
// one aside, fetches the views it lost again, and offline serves every
// object: no read fails on the damaged page, and no list is partial.
func TestDamagedPageHealed(t *testing.T) {
	ctx := t.Context()
	const ns, n = "heal", 60
	c := cp.Client()
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cm-%02d", i)},
			Data: map[string]string{"v": fmt.Sprintf("payload-%02d-", i) + strings.Repeat("z", 400)}}
		if _, err := c.CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	token := cp.ServiceAccountToken(t, "default", "heal-reader", framework.ReaderRole)
	o, link := cp.StartOutpostWithLinkT(t, "heal-node", append(framework.LenientProbes, "--watch-cache")...)
	client := kubernetes.NewForConfigOrDie(o.ClientConfig("", "", token))
	db := filepath.Join(o.DataDir, "cache.db")

	// An informer, as a node agent runs one, restarted with outpost.
	inform := func() func() {
		factory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(ns))
		inf := factory.Core().V1().ConfigMaps().Informer()
		ictx, stop := context.WithCancel(ctx)
		factory.Start(ictx.Done())
		if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
			t.Fatal("informer never synced")
		}
		return func() { stop(); factory.Shutdown() }
	}
	offlineList := func(when string) {
		t.Helper()
		link.Blackhole()
		if _, err := o.WaitState(ctx, "offline", 30*time.Second); err != nil {
			t.Fatal(err)
		}
		var l *corev1.ConfigMapList
		var err error
		for range 3 { // a read the cut broke on its way is asked again, as clients do
			if l, err = client.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{}); err == nil {
				break
			}
		}
		if err != nil {
			t.Fatalf("%s: offline list: %v\n%s", when, err, o.Log(30))
		}
		if len(l.Items) != n {
			t.Fatalf("%s: offline list holds %d of %d ConfigMaps", when, len(l.Items), n)
		}
		link.Pass()
		if _, err := o.WaitState(ctx, "online", 30*time.Second); err != nil {
			t.Fatal(err)
		}
	}

	stop := inform()
	time.Sleep(time.Second) // the recorder writes in batches
	offlineList("before the damage")
	stop()
	o.Stop()

	// Every page holding one ConfigMap's bytes: the one in use among them
	// is damaged (the others are free pages, old copies).
	before, _ := os.ReadFile(o.LogPath)
	logStart := len(before)
	damaged, err := overwritePages(db, []byte("payload-33-"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("overwrote %d page(s) holding cm-33", damaged)

	logged := func() string { // outpost's log since its restart
		b, _ := os.ReadFile(o.LogPath)
		return string(b[min(len(b), logStart):])
	}
	if err := o.Start(ctx); err != nil {
		t.Fatalf("outpost does not start on the damaged file: %v\n%s", err, o.Log(30))
	}
	if _, err := o.WaitState(ctx, "online", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	stop = inform()
	defer stop()
	if _, err := framework.Poll(ctx, 100*time.Millisecond, 20*time.Second, func(context.Context) (bool, string) {
		return strings.Contains(logged(), "rebuilt it from what still reads"), "no rebuild logged"
	}); err != nil {
		t.Fatalf("outpost never rebuilt the damaged file:\n%s", o.Log(40))
	}
	asides, _ := filepath.Glob(db + ".corrupt-*")
	if len(asides) != 1 {
		t.Errorf("damaged files kept aside: %v; want one", asides)
	}
	time.Sleep(2 * time.Second) // the lost views fetched again, written in batches
	offlineList("after the rebuild")
	for _, line := range strings.Split(logged(), "\n") {
		if strings.Contains(line, "store record is corrupt") {
			t.Logf("a transaction found the damage: %s", line)
		}
	}
}

// overwritePages fills with random bytes every page past the two meta
// pages of the bbolt file at path whose bytes hold needle, and returns how
// many it overwrote.
func overwritePages(path string, needle []byte) (int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	pageSize := os.Getpagesize()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n := 0
	for p := 2; (p+1)*pageSize <= len(data); p++ {
		if !bytes.Contains(data[p*pageSize:(p+1)*pageSize], needle) {
			continue
		}
		junk := make([]byte, pageSize)
		_, _ = rand.Read(junk)
		if _, err := f.WriteAt(junk, int64(p*pageSize)); err != nil {
			return n, err
		}
		n++
	}
	if n == 0 {
		return 0, fmt.Errorf("no page of %s holds %q", path, needle)
	}
	return n, f.Sync()
}
