package recorder

import (
	"github.com/outposthq/outpost/internal/local"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// DocKey names a recorded document: the path, its query and what the
// client accepts, since discovery and OpenAPI vary by Accept.
func DocKey(info *request.Info) string {
	return docPrefix + info.Path + "?" + info.Query + "\x00" + info.AcceptHeader
}

// TableKey names a recorded Table answer of one identity.
func TableKey(info *request.Info) string {
	return tablePrefix + info.View.Identity + "\x00" + info.Path + "?" + info.Query + "\x00" + info.AcceptHeader
}

// The store documents the recorder owns, by key prefix: recorded
// documents and Tables. It also writes the service-account tokens that
// package local owns and serves.
const (
	docPrefix   = "doc\x00"
	tablePrefix = "table\x00"
)

// SealRule says which of the records written by the recorder hold
// credentials, to be sealed at rest when outpost has a key: Secrets (full
// and metadata-only copies, since last-applied-configuration repeats
// their data), recorded Tables (whose cells may show any field), and the
// service-account tokens it records for package local.
func SealRule() store.SealRule {
	return store.SealRule{Resources: []string{"/v1/secrets", "/v1/secrets#meta"},
		DocPrefixes: append([]string{tablePrefix}, local.SealedDocPrefixes()...)}
}
