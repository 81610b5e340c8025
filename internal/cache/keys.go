package cache

import (
	"net/http"
	"strings"

	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// kind is what a cacheable request is, for recording and answering.
type kind int

const (
	notCacheable kind = iota
	getObject         // GET of one object (or its status subresource)
	listObjects       // LIST
	watchObjects      // WATCH
	table             // a LIST or GET answered as a Table: recorded whole
	document          // discovery, /version, OpenAPI
)

// resourceKey is the store's name of the resource a request reads:
// "group/version/resource", with "#meta" for metadata-only answers, which
// are kept apart so they never replace full objects.
func resourceKey(info *request.Info, a codec.Accept) string {
	k := info.APIGroup + "/" + info.APIVersion + "/" + info.Resource
	if strings.HasPrefix(a.As, "PartialObjectMetadata") {
		k += "#meta"
	}
	return k
}

// canonicalLabels and canonicalFields make equivalent selectors one key.
func canonicalLabels(s string) (string, error) {
	if s == "" {
		return "", nil
	}
	sel, err := labels.Parse(s)
	if err != nil {
		return "", err
	}
	return sel.String(), nil
}

func canonicalFields(s string) (string, error) {
	if s == "" {
		return "", nil
	}
	sel, err := fields.ParseSelector(s)
	if err != nil {
		return "", err
	}
	return sel.String(), nil
}

// classify says what r is for the cache and, for object requests, the
// view it reads.
func classify(r *http.Request, info *request.Info) (kind, store.ViewKey, codec.Accept) {
	a := codec.ParseAccept(r.Header.Get("Accept"))
	if r.Method != http.MethodGet || info.Upgrade {
		return notCacheable, store.ViewKey{}, a
	}
	if !info.IsResourceRequest {
		if isDocumentPath(info.Path) {
			return document, store.ViewKey{}, a
		}
		return notCacheable, store.ViewKey{}, a
	}
	if info.Subresource != "" && info.Subresource != "status" {
		return notCacheable, store.ViewKey{}, a
	}
	ls, err1 := canonicalLabels(info.LabelSelector)
	fs, err2 := canonicalFields(info.FieldSelector)
	if err1 != nil || err2 != nil {
		return notCacheable, store.ViewKey{}, a
	}
	key := store.ViewKey{Identity: info.Identity.Key(), Resource: resourceKey(info, a), Namespace: info.Namespace,
		LabelSelector: ls, FieldSelector: fs}
	switch info.Verb {
	case "get":
		key.Name = info.Name
		key.LabelSelector, key.FieldSelector = "", ""
		if a.As == "Table" {
			return table, key, a
		}
		return getObject, key, a
	case "list":
		if a.As == "Table" {
			return table, key, a
		}
		return listObjects, key, a
	case "watch":
		return watchObjects, key, a
	}
	return notCacheable, store.ViewKey{}, a
}

// isDocumentPath reports whether path is discovery, /version or OpenAPI.
func isDocumentPath(p string) bool {
	switch {
	case p == "/version", p == "/api", p == "/apis":
		return true
	case strings.HasPrefix(p, "/api/"), strings.HasPrefix(p, "/apis/"):
		return true // group and group-version discovery (resource paths never get here)
	case p == "/openapi/v2", p == "/openapi/v3", strings.HasPrefix(p, "/openapi/v3/"):
		return true
	}
	return false
}

// docKey names a recorded document: the path, its query and what the
// client accepts, since discovery and OpenAPI vary by Accept.
func docKey(r *http.Request) string {
	return "doc\x00" + r.URL.Path + "?" + r.URL.RawQuery + "\x00" + r.Header.Get("Accept")
}

// tableKey names a recorded Table answer of one identity.
func tableKey(identity string, r *http.Request) string {
	return "table\x00" + identity + "\x00" + r.URL.Path + "?" + r.URL.RawQuery + "\x00" + r.Header.Get("Accept")
}
