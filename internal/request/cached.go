package request

import (
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/outposthq/outpost/internal/store"
)

// Class is what a request is to outpost's cache, decided once in Parse:
// what the recorder records of its answer and what the offline reader can
// answer.
type Class int

const (
	NotCached    Class = iota
	GetObject          // GET of one object (or its status subresource)
	ListObjects        // LIST
	WatchObjects       // WATCH
	Table              // a LIST or GET answered as a Table: recorded whole
	Document           // discovery, /version, OpenAPI
)

// Options are the list and watch options of a request's query.
type Options struct {
	ResourceVersion      string
	ResourceVersionMatch string
	Continue             string
	// Limit is 0 when not given.
	Limit int
	// TimeoutSeconds is 0 when not given.
	TimeoutSeconds      int64
	SendInitialEvents   bool
	AllowWatchBookmarks bool
	// InvalidLimit and InvalidTimeout hold what was sent for limit and
	// timeoutSeconds when the apiserver would refuse it (the field is then
	// 0). Online the apiserver says so; offline the reader does.
	InvalidLimit, InvalidTimeout string
}

func parseOptions(q map[string][]string) Options {
	get := func(k string) string {
		if v := q[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	o := Options{
		ResourceVersion:      get("resourceVersion"),
		ResourceVersionMatch: get("resourceVersionMatch"),
		Continue:             get("continue"),
		SendInitialEvents:    get("sendInitialEvents") == "true",
		AllowWatchBookmarks:  get("allowWatchBookmarks") == "true",
	}
	if s := get("limit"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n >= 0 {
			o.Limit = n
		} else {
			o.InvalidLimit = s
		}
	}
	if s := get("timeoutSeconds"); s != "" {
		if n, err := strconv.ParseInt(s, 10, 64); err == nil && n >= 0 {
			o.TimeoutSeconds = n
		} else {
			o.InvalidTimeout = s
		}
	}
	return o
}

// classify decides info's Class and View.
func classify(r *http.Request, info *Info) {
	if r.Method != http.MethodGet || info.Upgrade {
		return
	}
	if !info.IsResourceRequest {
		if isDocumentPath(info.Path) {
			info.Class = Document
		}
		return
	}
	if info.Subresource != "" && info.Subresource != "status" {
		return
	}
	if info.Labels == nil || info.Fields == nil {
		return // an invalid selector: the apiserver says so
	}
	key := store.ViewKey{Identity: info.Identity.Key(), Resource: info.ResourceKey(), Namespace: info.Namespace,
		LabelSelector: info.Labels.String(), FieldSelector: info.Fields.String()}
	table := info.Accept.As == "Table"
	switch {
	case info.Verb == "get":
		key.Name = info.Name
		key.LabelSelector, key.FieldSelector = "", ""
		info.Class = GetObject
	case info.Verb == "list":
		info.Class = ListObjects
	case info.Verb == "watch":
		info.Class, table = WatchObjects, false
	default:
		return
	}
	if table {
		info.Class = Table
	}
	info.View = key
}

// ResourceKey is the store's name of the resource info reads:
// "group/version/resource", with "#meta" for metadata-only answers, which
// are kept apart so they never replace full objects.
func (info *Info) ResourceKey() string {
	k := info.APIGroup + "/" + info.APIVersion + "/" + info.Resource
	if strings.HasPrefix(info.Accept.As, "PartialObjectMetadata") {
		k += "#meta"
	}
	return k
}

// parseSelectors parses the request's selectors; nil when invalid.
func parseSelectors(info *Info) {
	var err error
	if info.Labels, err = labels.Parse(info.LabelSelector); err != nil {
		info.Labels = nil
	}
	if info.Fields, err = fields.ParseSelector(info.FieldSelector); err != nil {
		info.Fields = nil
	}
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

// ViewURL is the path and query that read view k from an apiserver: the
// inverse of the View key a request gets. It fails for a key whose
// resource is not group/version/resource.
func ViewURL(k store.ViewKey) (string, error) {
	res, _ := strings.CutSuffix(k.Resource, "#meta")
	parts := strings.SplitN(res, "/", 3)
	if len(parts) != 3 || parts[1] == "" || parts[2] == "" {
		return "", fmt.Errorf("view of %q: not group/version/resource", k.Resource)
	}
	group, version, resource := parts[0], parts[1], parts[2]
	path := "/apis/" + group + "/" + version
	if group == "" {
		path = "/api/" + version
	}
	if k.Namespace != "" {
		path += "/namespaces/" + url.PathEscape(k.Namespace)
	}
	path += "/" + resource
	if k.Name != "" {
		path += "/" + url.PathEscape(k.Name)
	}
	q := url.Values{}
	if k.LabelSelector != "" {
		q.Set("labelSelector", k.LabelSelector)
	}
	if k.FieldSelector != "" {
		q.Set("fieldSelector", k.FieldSelector)
	}
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	return path, nil
}

// MatchesResource reports whether the store's resource key
// ("group/version/resource") is what the user named: "pods",
// "deployments.apps", or the key itself.
func MatchesResource(key, name string) bool {
	base, _, _ := strings.Cut(key, "#")
	if name == base || name == key {
		return true
	}
	parts := strings.SplitN(base, "/", 3)
	if len(parts) != 3 {
		return false
	}
	res, group := name, ""
	if i := strings.IndexByte(name, '.'); i > 0 {
		res, group = name[:i], name[i+1:]
	}
	return parts[2] == res && parts[0] == group
}
