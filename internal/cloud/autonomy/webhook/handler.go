package webhook

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"mime"
	"net/http"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
)

// Mutator returns the JSON patch for the object of one admission request,
// or nil to admit it unchanged.
type Mutator func(ctx context.Context, req *admissionv1.AdmissionRequest) ([]Op, error)

// Outcomes of a review, as passed to Handler.Observe.
const (
	ResultPatched   = "patched"
	ResultUnchanged = "unchanged"
	ResultError     = "error"
)

// maxReviewBytes bounds a request body. An AdmissionReview carries the
// object twice at most (object and oldObject), and etcd refuses objects
// over 1.5 MiB, so this is generous.
const maxReviewBytes = 8 << 20

// Handler answers AdmissionReview (admission.k8s.io/v1) requests with the
// patch its Mutator returns.
//
// It never denies: an error from the Mutator is logged and the object is
// admitted unchanged. The webhooks served here exist to keep workloads
// available, and must never be the reason a write fails.
type Handler struct {
	// Mutator decides the patch. It must be set.
	Mutator Mutator
	// Logger receives Mutator errors. If nil, slog.Default() is used.
	Logger *slog.Logger
	// Observe, if not nil, is called after each review with its outcome
	// (ResultPatched, ResultUnchanged or ResultError) and duration.
	Observe func(result string, d time.Duration)
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "admission reviews are POSTed", http.StatusMethodNotAllowed)
		return
	}
	if ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); ct != "application/json" {
		http.Error(w, fmt.Sprintf("content type %q: want application/json", ct), http.StatusUnsupportedMediaType)
		return
	}
	var review admissionv1.AdmissionReview
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxReviewBytes)).Decode(&review); err != nil {
		http.Error(w, "decoding AdmissionReview: "+err.Error(), http.StatusBadRequest)
		return
	}
	req := review.Request
	if req == nil {
		http.Error(w, "AdmissionReview has no request", http.StatusBadRequest)
		return
	}

	resp := &admissionv1.AdmissionResponse{UID: req.UID, Allowed: true}
	result := ResultUnchanged
	ops, err := h.Mutator(r.Context(), req)
	if err == nil && len(ops) > 0 {
		resp.Patch, err = json.Marshal(ops)
	}
	switch {
	case err != nil:
		result = ResultError
		resp.Patch = nil
		h.logger().Warn("admitting unchanged after mutation error",
			"resource", req.Resource.Resource, "namespace", req.Namespace, "name", req.Name,
			"operation", req.Operation, "uid", req.UID, "err", err)
	case len(resp.Patch) > 0:
		result = ResultPatched
		pt := admissionv1.PatchTypeJSONPatch
		resp.PatchType = &pt
	}

	out := admissionv1.AdmissionReview{TypeMeta: review.TypeMeta, Response: resp}
	out.APIVersion, out.Kind = admissionv1.SchemeGroupVersion.String(), "AdmissionReview"
	body, err := json.Marshal(out)
	if err != nil {
		// Cannot happen with these types; answer so that the apiserver's
		// failure policy applies rather than hanging the request.
		http.Error(w, "encoding AdmissionReview: "+err.Error(), http.StatusInternalServerError)
		result = ResultError
	} else {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	}
	if h.Observe != nil {
		h.Observe(result, time.Since(start))
	}
}

func (h *Handler) logger() *slog.Logger {
	if h.Logger != nil {
		return h.Logger
	}
	return slog.Default()
}
