package local

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// TestReplayCountsRefusedEvents: an event journaled offline was answered
// 201; when the apiserver refuses it on replay (422: invalid), it is
// dropped, and the drop is counted and logged, never silent. Found by the
// chaos soak, whose first writer sent Node events in a namespace, which the
// apiserver refuses and outpost accepted offline.
func TestReplayCountsRefusedEvents(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "cache.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var logs strings.Builder
	m := metrics.New(prometheus.NewRegistry())
	l := &Writer{Store: st, Log: slog.New(slog.NewTextHandler(&logs, nil)), Metrics: m, Node: "edge-1"}
	l.Load()
	kubelet := request.Identity{Kind: request.NodeCert, User: "system:node:edge-1"}
	for _, ev := range []string{"a", "b", "c"} {
		body := `{"apiVersion":"v1","kind":"Event","metadata":{"name":"` + ev + `","namespace":"default"},"reason":"Started","involvedObject":{"kind":"Node","name":"edge-1"}}`
		r := httptest.NewRequest(http.MethodPost, "/api/v1/namespaces/default/events", strings.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		info, err := request.Parse(r, kubelet)
		if err != nil {
			t.Fatal(err)
		}
		w := httptest.NewRecorder()
		if !l.Answers(r, info) {
			t.Fatal("an event offline is not answered locally")
		}
		l.Serve(w, r, info)
		if w.Code != http.StatusCreated {
			t.Fatalf("journaling %s: %d %s", ev, w.Code, w.Body)
		}
	}
	// The apiserver takes b and refuses a and c.
	upstream := roundTripper(func(r *http.Request) (*http.Response, error) {
		body, _ := io.ReadAll(r.Body)
		code := http.StatusUnprocessableEntity
		if strings.Contains(string(body), `"name":"b"`) {
			code = http.StatusCreated
		}
		return &http.Response{StatusCode: code, Body: io.NopCloser(strings.NewReader("{}")), Request: r}, nil
	})
	n, err := l.ReplayJournal(context.Background(), 1000, upstream)
	if err != nil || n != 1 {
		t.Fatalf("replay: %d delivered, %v; want 1", n, err)
	}
	var rejected dto.Metric
	if err := m.JournalRejected.Write(&rejected); err != nil {
		t.Fatal(err)
	}
	if got := rejected.GetCounter().GetValue(); got != 2 {
		t.Errorf("outpost_journal_rejected_total = %v, want 2", got)
	}
	if depth, _, _ := l.Journal(); depth != 0 {
		t.Errorf("journal depth %d after replay, want 0", depth)
	}
	if c := strings.Count(logs.String(), "refused by the apiserver"); c != 1 || !strings.Contains(logs.String(), "refused=2") || !strings.Contains(logs.String(), "first_code=422") {
		t.Errorf("want one log line for the refused events, got:\n%s", logs.String())
	}
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
