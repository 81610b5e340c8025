package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

func TestHandler(t *testing.T) {
	tests := []struct {
		name       string
		mutator    Mutator
		wantPatch  string
		wantResult string
	}{
		{
			name: "patch",
			mutator: func(ctx context.Context, req *admissionv1.AdmissionRequest) ([]Op, error) {
				return []Op{{Op: "add", Path: "/metadata/annotations/" + Escape("outpost.io/x~y"), Value: "v"}, {Op: "remove", Path: "/spec/a"}}, nil
			},
			wantPatch:  `[{"op":"add","path":"/metadata/annotations/outpost.io~1x~0y","value":"v"},{"op":"remove","path":"/spec/a"}]`,
			wantResult: ResultPatched,
		},
		{
			name:       "no change",
			mutator:    func(context.Context, *admissionv1.AdmissionRequest) ([]Op, error) { return nil, nil },
			wantResult: ResultUnchanged,
		},
		{
			name: "error admits unchanged",
			mutator: func(context.Context, *admissionv1.AdmissionRequest) ([]Op, error) {
				return []Op{{Op: "remove", Path: "/x"}}, errors.New("boom")
			},
			wantResult: ResultError,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var result string
			h := &Handler{Mutator: tt.mutator, Logger: slog.New(slog.DiscardHandler), Observe: func(r string, _ time.Duration) { result = r }}
			srv := httptest.NewServer(h)
			defer srv.Close()

			in := admissionv1.AdmissionReview{
				TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
				Request:  &admissionv1.AdmissionRequest{UID: "42", Object: runtime.RawExtension{Raw: []byte(`{"kind":"Pod"}`)}},
			}
			body, _ := json.Marshal(in)
			resp, err := http.Post(srv.URL, "application/json", bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %s", resp.Status)
			}
			var out admissionv1.AdmissionReview
			if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
				t.Fatal(err)
			}
			r := out.Response
			if out.Kind != "AdmissionReview" || out.APIVersion != "admission.k8s.io/v1" || r == nil || r.UID != "42" || !r.Allowed {
				t.Fatalf("response %+v", out)
			}
			if string(r.Patch) != tt.wantPatch {
				t.Errorf("patch = %s, want %s", r.Patch, tt.wantPatch)
			}
			if (r.PatchType != nil) != (tt.wantPatch != "") {
				t.Errorf("patchType = %v", r.PatchType)
			}
			if result != tt.wantResult {
				t.Errorf("observed %q, want %q", result, tt.wantResult)
			}
		})
	}
}

func TestHandlerBadRequests(t *testing.T) {
	h := &Handler{Mutator: func(context.Context, *admissionv1.AdmissionRequest) ([]Op, error) {
		t.Error("mutator called")
		return nil, nil
	}}
	srv := httptest.NewServer(h)
	defer srv.Close()
	tests := []struct {
		method, contentType, body string
		want                      int
	}{
		{http.MethodGet, "", "", http.StatusMethodNotAllowed},
		{http.MethodPost, "text/plain", "{}", http.StatusUnsupportedMediaType},
		{http.MethodPost, "application/json", "{not json", http.StatusBadRequest},
		{http.MethodPost, "application/json; charset=utf-8", `{"kind":"AdmissionReview"}`, http.StatusBadRequest}, // no request
	}
	for _, tt := range tests {
		req, _ := http.NewRequest(tt.method, srv.URL, bytes.NewBufferString(tt.body))
		if tt.contentType != "" {
			req.Header.Set("Content-Type", tt.contentType)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.want {
			t.Errorf("%s %s %q: status %d, want %d", tt.method, tt.contentType, tt.body, resp.StatusCode, tt.want)
		}
	}
}
