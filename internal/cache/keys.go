package cache

import (
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// docKey names a recorded document: the path, its query and what the
// client accepts, since discovery and OpenAPI vary by Accept.
func docKey(info *request.Info) string {
	return docPrefix + info.Path + "?" + info.Query + "\x00" + info.AcceptHeader
}

// tableKey names a recorded Table answer of one identity.
func tableKey(info *request.Info) string {
	return tablePrefix + info.View.Identity + "\x00" + info.Path + "?" + info.Query + "\x00" + info.AcceptHeader
}

// The store documents the cache owns, by key prefix: recorded documents,
// Tables, service-account tokens (token.go), local overlays and the event
// journal (local.go).
const (
	docPrefix   = "doc\x00"
	tablePrefix = "table\x00"
)

// SealRule says which of the cache's records hold credentials, to be
// sealed at rest when outpost has a key: Secrets (full and metadata-only
// copies, since last-applied-configuration repeats their data), recorded
// service-account tokens, and recorded Tables (whose cells may show any
// field).
func SealRule() store.SealRule {
	return store.SealRule{Resources: []string{"/v1/secrets", "/v1/secrets#meta"}, DocPrefixes: []string{tokenPrefix, tablePrefix}}
}
