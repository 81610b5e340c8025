package cache

import (
	"github.com/outposthq/outpost/internal/request"
)

// docKey names a recorded document: the path, its query and what the
// client accepts, since discovery and OpenAPI vary by Accept.
func docKey(info *request.Info) string {
	return "doc\x00" + info.Path + "?" + info.Query + "\x00" + info.AcceptHeader
}

// tableKey names a recorded Table answer of one identity.
func tableKey(info *request.Info) string {
	return "table\x00" + info.View.Identity + "\x00" + info.Path + "?" + info.Query + "\x00" + info.AcceptHeader
}
