// Package status writes Kubernetes Status objects as HTTP responses, so that
// every error outpost produces itself reads to clients like an apiserver's.
package status

import (
	"encoding/json"
	"net/http"
	"strconv"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Write writes st as a JSON Status with st.Code as the HTTP status.
// JSON is understood by every client whatever it asked for, as the apiserver
// itself falls back to JSON for errors it cannot encode otherwise.
func Write(w http.ResponseWriter, st metav1.Status) {
	st.Kind, st.APIVersion = "Status", "v1"
	st.Status = metav1.StatusFailure
	if st.Code == 0 {
		st.Code = http.StatusInternalServerError
	}
	body, _ := json.Marshal(st) // a Status always marshals
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("X-Content-Type-Options", "nosniff")
	if st.Details != nil && st.Details.RetryAfterSeconds > 0 {
		h.Set("Retry-After", strconv.Itoa(int(st.Details.RetryAfterSeconds)))
	}
	w.WriteHeader(int(st.Code))
	_, _ = w.Write(body)
}

// WriteError writes err as a Status: its own if it is an APIStatus, else a 500.
func WriteError(w http.ResponseWriter, err error) {
	if s, ok := err.(apierrors.APIStatus); ok {
		Write(w, s.Status())
		return
	}
	Write(w, apierrors.NewInternalError(err).Status())
}

// Unauthorized is a 401 Status error with msg.
func Unauthorized(msg string) *apierrors.StatusError { return apierrors.NewUnauthorized(msg) }

// BadRequest is a 400 Status error with msg.
func BadRequest(msg string) *apierrors.StatusError { return apierrors.NewBadRequest(msg) }

// Forbidden is a 403 Status error with msg.
func Forbidden(msg string) *apierrors.StatusError {
	return &apierrors.StatusError{ErrStatus: metav1.Status{
		Status: metav1.StatusFailure, Code: http.StatusForbidden, Reason: metav1.StatusReasonForbidden, Message: msg,
	}}
}

// Unavailable is a 503 Status error with msg and a Retry-After.
func Unavailable(msg string, retryAfterSeconds int32) *apierrors.StatusError {
	return &apierrors.StatusError{ErrStatus: metav1.Status{
		Status: metav1.StatusFailure, Code: http.StatusServiceUnavailable, Reason: metav1.StatusReasonServiceUnavailable,
		Message: msg, Details: &metav1.StatusDetails{RetryAfterSeconds: retryAfterSeconds},
	}}
}

// NotAcceptable is a 406 Status error with msg: the answer exists, but not
// in an encoding the client accepts.
func NotAcceptable(msg string) *apierrors.StatusError {
	return &apierrors.StatusError{ErrStatus: metav1.Status{
		Status: metav1.StatusFailure, Code: http.StatusNotAcceptable, Reason: metav1.StatusReasonNotAcceptable, Message: msg,
	}}
}

// UnsupportedMediaType is a 415 Status error with msg.
func UnsupportedMediaType(msg string) *apierrors.StatusError {
	return &apierrors.StatusError{ErrStatus: metav1.Status{
		Status: metav1.StatusFailure, Code: http.StatusUnsupportedMediaType, Reason: metav1.StatusReasonUnsupportedMediaType, Message: msg,
	}}
}
