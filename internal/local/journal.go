package local

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/status"
)

// journalEntry is one event created offline, kept until it is replayed.
type journalEntry struct {
	Path string          `json:"path"`
	Body json.RawMessage `json:"body"`
}

// journal appends an Event to the on-disk journal and answers 201 with it.
func (l *Writer) journal(w http.ResponseWriter, r *http.Request, info *request.Info) error {
	body, ct, err := requestJSON(r)
	if err != nil {
		return err
	}
	if ct != codec.MediaJSON {
		return unsupportedMedia(ct)
	}
	out, err := setMeta(body, "0", true)
	if err != nil {
		return status.BadRequest("outpost: the event is not a JSON object: " + err.Error())
	}
	l.mu.Lock()
	l.journalSeq++
	seq := l.journalSeq
	l.mu.Unlock()
	entry, _ := json.Marshal(journalEntry{Path: info.Path, Body: body})
	if err := l.Store.PutDoc(fmt.Sprintf("%s%020d", journalPrefix, seq), codec.MediaJSON, entry); err != nil {
		return apierrors.NewInternalError(fmt.Errorf("journaling event: %w", err))
	}
	l.trimJournal()
	if l.Metrics != nil {
		l.Metrics.JournalEvents.Inc()
	}
	kind, apiVersion := "Event", "v1"
	if info.APIGroup == "events.k8s.io" {
		apiVersion = "events.k8s.io/v1"
	}
	return answer(w, http.StatusCreated, "journal", codec.WithTypeMeta(out, kind, apiVersion), info.Accept)
}

// trimJournal keeps at most MaxJournal entries, dropping the oldest.
func (l *Writer) trimJournal() {
	var keys []string
	_ = l.Store.Docs(journalPrefix, func(key, _ string, _ []byte) error { keys = append(keys, key); return nil })
	over := len(keys) - l.MaxJournal
	for i := 0; i < over; i++ {
		if l.Store.DeleteDoc(keys[i]) != nil {
			continue
		}
		l.dropped.Add(1)
		if l.Metrics != nil {
			l.Metrics.JournalDropped.Inc()
		}
	}
	if over > 0 {
		l.Log.Warn("event journal full; oldest events dropped", "dropped", over, "kept", l.MaxJournal)
	}
}

// Journal returns how many events wait in the journal, its bound, and
// how many were dropped since start because it was full.
func (l *Writer) Journal() (depth, max int, dropped int64) {
	_ = l.Store.Docs(journalPrefix, func(string, string, []byte) error { depth++; return nil })
	return depth, l.MaxJournal, l.dropped.Load()
}

// ReplayJournal posts the journaled events to the apiserver through
// upstream (as the node), at most rate per second, deleting each one the
// apiserver answered. It stops at the first failure to reach the
// apiserver; the rest wait for the next reconnect. An event that already
// exists (409) was delivered by an earlier replay whose answer was lost
// (the link broke again meanwhile): it counts as delivered. An event the
// apiserver refuses otherwise (4xx) is dropped, counted
// (outpost_journal_rejected_total) and logged once per replay: offline it
// was answered 201, so a drop nobody counted would be an event silently
// lost.
func (l *Writer) ReplayJournal(ctx context.Context, rate int, upstream http.RoundTripper) (replayed int, err error) {
	var rejected, firstCode int
	var firstPath string
	defer func() {
		if rejected > 0 {
			l.Log.Warn("journaled events refused by the apiserver on replay; dropped", "refused", rejected, "first_code", firstCode, "first_path", firstPath)
		}
	}()
	type item struct {
		key   string
		entry journalEntry
	}
	var items []item
	var unreadable []string
	_ = l.Store.Docs(journalPrefix, func(key, _ string, body []byte) error {
		var e journalEntry
		if json.Unmarshal(body, &e) == nil {
			items = append(items, item{key, e})
		} else {
			unreadable = append(unreadable, key)
		}
		return nil
	})
	// Deleted after the reading transaction: a write inside it would wait
	// for a rebuild of the store that waits for that transaction.
	for _, key := range unreadable {
		_ = l.Store.DeleteDoc(key)
	}
	if rate <= 0 {
		rate = 10
	}
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for _, it := range items {
		code, err := send(ctx, upstream, http.MethodPost, it.entry.Path, "application/json", it.entry.Body)
		if err != nil {
			return replayed, err
		}
		// 2xx: delivered. 4xx: the apiserver will never take it (an
		// expired namespace, a duplicate): dropping it is final either way.
		if code >= 500 {
			return replayed, fmt.Errorf("replaying event: apiserver answered %d", code)
		}
		_ = l.Store.DeleteDoc(it.key)
		switch {
		case code < 300 || code == http.StatusConflict:
			replayed++
		case code >= 400:
			if rejected == 0 {
				firstCode, firstPath = code, it.entry.Path
			}
			rejected++
			if l.Metrics != nil {
				l.Metrics.JournalRejected.Inc()
			}
		}
		select {
		case <-ctx.Done():
			return replayed, ctx.Err()
		case <-tick.C:
		}
	}
	return replayed, nil
}

// loadJournalSeq continues the journal's numbering after a restart.
func (l *Writer) loadJournalSeq() {
	var last uint64
	_ = l.Store.Docs(journalPrefix, func(key, _ string, _ []byte) error {
		if n, err := strconv.ParseUint(strings.TrimPrefix(key, journalPrefix), 10, 64); err == nil && n > last {
			last = n
		}
		return nil
	})
	l.mu.Lock()
	l.journalSeq = last
	l.mu.Unlock()
}
