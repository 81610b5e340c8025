package webhook

import "strings"

// Op is one JSON patch (RFC 6902) operation, the form in which a mutating
// webhook must answer.
type Op struct {
	Op   string `json:"op"`
	Path string `json:"path"`
	// Value is omitted for "remove".
	Value any `json:"value,omitempty"`
}

// pointerEscaper escapes a reference token of a JSON pointer (RFC 6901).
var pointerEscaper = strings.NewReplacer("~", "~0", "/", "~1")

// Escape returns token escaped for use as one segment of an Op's Path, as
// annotation keys such as "outpost.io/x" need.
func Escape(token string) string {
	return pointerEscaper.Replace(token)
}
