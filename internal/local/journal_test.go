package local

import (
	"context"
	"errors"
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
	l, m, logs := newJournal(t, "a", "b", "c")
	// The apiserver takes b and refuses a and c.
	upstream := roundTripper(func(r *http.Request) (*http.Response, error) {
		body, _ := io.ReadAll(r.Body)
		code := http.StatusUnprocessableEntity
		if strings.Contains(string(body), `"name":"b"`) {
			code = http.StatusCreated
		}
		return answered(r, code), nil
	})
	n, err := l.ReplayJournal(context.Background(), 1000, upstream)
	if err != nil || n != 1 {
		t.Fatalf("replay: %d delivered, %v; want 1", n, err)
	}
	if got := rejected(t, m); got != 2 {
		t.Errorf("outpost_journal_rejected_total = %v, want 2", got)
	}
	if depth, _, _ := l.Journal(); depth != 0 {
		t.Errorf("journal depth %d after replay, want 0", depth)
	}
	if c := strings.Count(logs.String(), "refused by the apiserver"); c != 1 || !strings.Contains(logs.String(), "refused=2") || !strings.Contains(logs.String(), "first_code=422") {
		t.Errorf("want one log line for the refused events, got:\n%s", logs.String())
	}
}

// TestReplayAfterLostAnswer: the link breaks while the apiserver answers a
// replayed event, so the event stays journaled although it was created;
// the next replay meets 409 AlreadyExists, which is the event delivered,
// not refused. Found by the chaos soak (a flapping link).
func TestReplayAfterLostAnswer(t *testing.T) {
	l, m, _ := newJournal(t, "a")
	created := map[string]bool{}
	lost := true
	upstream := roundTripper(func(r *http.Request) (*http.Response, error) {
		body, _ := io.ReadAll(r.Body)
		if created[string(body)] {
			return answered(r, http.StatusConflict), nil
		}
		created[string(body)] = true
		if lost {
			return nil, errors.New("connection reset by peer")
		}
		return answered(r, http.StatusCreated), nil
	})
	if n, err := l.ReplayJournal(context.Background(), 1000, upstream); err == nil || n != 0 {
		t.Fatalf("replay over a broken link: %d, %v; want 0 and the error", n, err)
	}
	lost = false
	if n, err := l.ReplayJournal(context.Background(), 1000, upstream); err != nil || n != 1 {
		t.Fatalf("replay again: %d, %v; want the event counted as delivered", n, err)
	}
	if got := rejected(t, m); got != 0 {
		t.Errorf("outpost_journal_rejected_total = %v, want 0: the event was delivered", got)
	}
	if depth, _, _ := l.Journal(); depth != 0 {
		t.Errorf("journal depth %d, want 0", depth)
	}
}

// newJournal is a local writer for node edge-1 on a fresh store, with the
// events named journaled as they are offline, its metrics and its log.
func newJournal(t *testing.T, events ...string) (*Writer, *metrics.Metrics, *strings.Builder) {
	t.Helper()
	st, err := store.Open(filepath.Join(t.TempDir(), "cache.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	logs := &strings.Builder{}
	m := metrics.New(prometheus.NewRegistry())
	l := &Writer{Store: st, Log: slog.New(slog.NewTextHandler(logs, nil)), Metrics: m, Node: "edge-1"}
	l.Load()
	kubelet := request.Identity{Kind: request.NodeCert, User: "system:node:edge-1"}
	for _, ev := range events {
		body := `{"apiVersion":"v1","kind":"Event","metadata":{"name":"` + ev + `","namespace":"default"},"reason":"Started","involvedObject":{"kind":"Node","name":"edge-1"}}`
		r := httptest.NewRequest(http.MethodPost, "/api/v1/namespaces/default/events", strings.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		info, err := request.Parse(r, kubelet)
		if err != nil {
			t.Fatal(err)
		}
		if !l.Answers(r, info) {
			t.Fatal("an event offline is not answered locally")
		}
		w := httptest.NewRecorder()
		l.Serve(w, r, info)
		if w.Code != http.StatusCreated {
			t.Fatalf("journaling %s: %d %s", ev, w.Code, w.Body)
		}
	}
	return l, m, logs
}

func rejected(t *testing.T, m *metrics.Metrics) float64 {
	t.Helper()
	var d dto.Metric
	if err := m.JournalRejected.Write(&d); err != nil {
		t.Fatal(err)
	}
	return d.GetCounter().GetValue()
}

func answered(r *http.Request, code int) *http.Response {
	return &http.Response{StatusCode: code, Body: io.NopCloser(strings.NewReader("{}")), Request: r}
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
