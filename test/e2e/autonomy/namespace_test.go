package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/internal/cloud/autonomy"
	"github.com/outposthq/outpost/test/e2e/framework"
)

// syncBuffer is a log sink the test reads while the controller writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// runOutside runs outpost-controller as a user would outside the cluster,
// with kubeconfig, working in namespace, its webhook configuration one that
// does not exist (so that it leaves the suite's alone), until the test ends.
// It returns the /readyz URL and the log.
func runOutside(t *testing.T, kubeconfig, namespace string) (string, *syncBuffer) {
	t.Helper()
	metricsPort, hookPort := framework.FreePort(t), framework.FreePort(t)
	logs := &syncBuffer{}
	runController(t, autonomy.Config{
		Kubeconfig:     kubeconfig,
		Namespace:      namespace,
		MetricsAddress: fmt.Sprintf("127.0.0.1:%d", metricsPort),
		Webhook: autonomy.Webhook{Address: fmt.Sprintf("127.0.0.1:%d", hookPort), Hosts: []string{"127.0.0.1"},
			ConfigName: "outpost-namespace-test"},
	}, slog.New(slog.NewTextHandler(io.MultiWriter(logs, t.Output()), nil)))
	return fmt.Sprintf("http://127.0.0.1:%d/readyz", metricsPort), logs
}

// readyz returns what /readyz answers, or the error reaching it.
func readyz(ctx context.Context, url string) string {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(body)))
}

// TestMissingNamespace: outpost-controller started before the namespace
// it works in exists (outside the cluster, before deploy/ was applied)
// does not fail on the Lease and the CA Secret every few seconds, forever.
// With credentials that may not create the namespace it says once,
// plainly, what is missing and how to fix it, /readyz says so, and it goes
// on once the namespace appears; with credentials that may, it creates it.
func TestMissingNamespace(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	const late, created = "outpost-late", "outpost-created"

	// May read everything, create nothing.
	token := cp.ServiceAccountToken(t, "default", "namespace-reader", framework.ReaderRole)
	kubeconfig := filepath.Join(t.TempDir(), "reader.kubeconfig")
	if err := framework.WriteKubeconfig(kubeconfig, cp.URL(0), cp.CAFile, "", "", token); err != nil {
		t.Fatal(err)
	}
	url, logs := runOutside(t, kubeconfig, late)
	want := "namespace " + late + " does not exist and these credentials may not create it: create it (kubectl create namespace " + late
	framework.WaitFor(ctx, t, "/readyz saying the namespace is missing", func(ctx context.Context) (bool, error) {
		return strings.HasPrefix(readyz(ctx, url), "503 not ready: "+want), nil
	})
	time.Sleep(7 * time.Second) // more than one more check
	if n := strings.Count(logs.String(), "waiting for the namespace outpost-controller works in"); n != 1 {
		t.Errorf("the missing namespace was logged %d times; want once:\n%s", n, logs)
	}
	if strings.Contains(logs.String(), "webhook certificates") {
		t.Errorf("the CA Secret was tried in a missing namespace:\n%s", logs)
	}
	if _, err := cp.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: late}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	framework.WaitFor(ctx, t, "the controller going on once the namespace exists", func(ctx context.Context) (bool, error) {
		return !strings.Contains(readyz(ctx, url), "namespace") && strings.Contains(logs.String(), "namespace present"), nil
	})

	// May create it: created.
	_, adminLogs := runOutside(t, cp.AdminKubeconfig, created)
	framework.WaitFor(ctx, t, "the namespace created by the controller", func(ctx context.Context) (bool, error) {
		_, err := cp.Client().CoreV1().Namespaces().Get(ctx, created, metav1.GetOptions{})
		return err == nil && strings.Contains(adminLogs.String(), "created the namespace outpost-controller works in"), nil
	})
	if strings.Contains(adminLogs.String(), "waiting for the namespace") {
		t.Errorf("a controller that may create its namespace reported it missing:\n%s", adminLogs)
	}
}
