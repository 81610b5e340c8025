// Package request parses an incoming *http.Request once into a read-only
// Info: who the caller is, what it asks for (selectors, list and watch
// options, the encoding it accepts), and what that is to the cache (its
// class and the view it reads). Everything after the
// listener receives the Info instead of re-parsing the request or passing
// facts through context values.
package request

import (
	"context"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/net/http/httpguts"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/store"

	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/sets"
	apirequest "k8s.io/apiserver/pkg/endpoints/request"
)

// CredentialKind says how the caller proved who it is and so which
// credentials outpost uses toward the apiserver on its behalf.
type CredentialKind int

const (
	// Anonymous callers sent no credential.
	Anonymous CredentialKind = iota
	// NodeCert callers presented this node's client certificate (or came
	// through the insecure port, which stands for this node's kubelet). They
	// are served with the node's own upstream credentials.
	NodeCert
	// BearerToken callers sent a token; it is forwarded as it is and the
	// apiserver judges it.
	BearerToken
)

func (k CredentialKind) String() string {
	switch k {
	case NodeCert:
		return "node-cert"
	case BearerToken:
		return "bearer-token"
	default:
		return "anonymous"
	}
}

// Identity is the authenticated caller.
type Identity struct {
	Kind CredentialKind
	// User is the Kubernetes user name, when known: the node's user for
	// NodeCert, the apiserver's answer to a SelfSubjectReview for tokens.
	User string
	// Groups are the user's groups, when known.
	Groups []string
	// TokenHash is the hex SHA-256 of the bearer token; never the token.
	TokenHash string
	// Token is the bearer token itself, kept only to forward it. Never logged.
	Token string `json:"-"`
}

// Key identifies the caller for keeping cached data apart: the user name
// when known, otherwise the token hash.
func (id Identity) Key() string {
	switch {
	case id.User != "":
		return id.User
	case id.TokenHash != "":
		return "token:" + id.TokenHash
	default:
		return "system:anonymous"
	}
}

// Info is what one request asks for and who asks. It is read-only once built.
type Info struct {
	Identity Identity

	// Verb is the Kubernetes verb (get, list, watch, create, update, patch,
	// delete, deletecollection) for resource requests, or the lowercased HTTP
	// method for non-resource requests.
	Verb              string
	IsResourceRequest bool
	Path              string
	APIPrefix         string
	APIGroup          string
	APIVersion        string
	Namespace         string
	Resource          string
	Subresource       string
	Name              string

	LabelSelector string
	FieldSelector string
	// Labels and Fields are the selectors parsed; nil when invalid.
	Labels labels.Selector
	Fields fields.Selector
	// Query is the raw query, and Options the list and watch options in it.
	Query   string
	Options Options
	// AcceptHeader is the Accept header as sent, and Accept what it asks.
	AcceptHeader string
	Accept       codec.Accept

	// Class is what the request is to the cache, and View the view a get,
	// list or watch reads.
	Class Class
	View  store.ViewKey

	// Watch is true for watch requests, including list?watch=true.
	Watch bool
	// LongRunning is true for requests that may stay open indefinitely:
	// watches, logs follow, exec/attach/portforward and proxy upgrades.
	LongRunning bool
	// Upgrade is true for requests asking for a protocol upgrade (SPDY,
	// WebSocket).
	Upgrade bool
	// Impersonating is true when the request carries Impersonate-*
	// headers: the apiserver answers it as another user, whom outpost does
	// not know, so only the apiserver answers it, and it is not recorded.
	Impersonating bool
}

var resolver = &apirequest.RequestInfoFactory{
	APIPrefixes:          sets.NewString("api", "apis"),
	GrouplessAPIPrefixes: sets.NewString("api"),
}

var longRunningSubresources = sets.New("exec", "attach", "portforward", "proxy", "log")

// Parse builds the Info of r for the given identity, with k8s.io/apiserver's
// request-info resolver so paths are understood as the apiserver does.
func Parse(r *http.Request, id Identity) (*Info, error) {
	ri, err := resolver.NewRequestInfo(r)
	if err != nil {
		return nil, err
	}
	info := &Info{
		Identity:          id,
		Verb:              ri.Verb,
		IsResourceRequest: ri.IsResourceRequest,
		Path:              ri.Path,
		APIPrefix:         ri.APIPrefix,
		APIGroup:          ri.APIGroup,
		APIVersion:        ri.APIVersion,
		Namespace:         ri.Namespace,
		Resource:          ri.Resource,
		Subresource:       ri.Subresource,
		Name:              ri.Name,
		Upgrade:           isUpgrade(r),
		Impersonating:     impersonating(r.Header),
	}
	q := r.URL.Query()
	info.LabelSelector = q.Get("labelSelector")
	info.FieldSelector = q.Get("fieldSelector")
	info.Watch = ri.Verb == "watch"
	info.LongRunning = info.Watch || info.Upgrade ||
		(ri.IsResourceRequest && longRunningSubresources.Has(ri.Subresource) && (ri.Subresource != "log" || follows(q)))
	info.Query = r.URL.RawQuery
	info.Options = parseOptions(q)
	info.AcceptHeader = r.Header.Get("Accept")
	info.Accept = codec.ParseAccept(info.AcceptHeader)
	parseSelectors(info)
	classify(r, info)
	return info, nil
}

func follows(q url.Values) bool { return q.Get("follow") == "true" || q.Get("follow") == "1" }

func isUpgrade(r *http.Request) bool {
	return r.Header.Get("Upgrade") != "" && httpguts.HeaderValuesContainsToken(r.Header["Connection"], "Upgrade")
}

type infoKey struct{}

// WithInfo returns a context carrying info, for the one place that must cross
// an API that only passes a context (httputil.ReverseProxy's transport).
func WithInfo(ctx context.Context, info *Info) context.Context {
	return context.WithValue(ctx, infoKey{}, info)
}

// From returns the Info stored by WithInfo, or nil.
func From(ctx context.Context) *Info {
	info, _ := ctx.Value(infoKey{}).(*Info)
	return info
}

// impersonating reports Impersonate-User, -Group, -Uid or -Extra-* headers.
func impersonating(h http.Header) bool {
	for k := range h {
		if strings.HasPrefix(http.CanonicalHeaderKey(k), "Impersonate-") {
			return true
		}
	}
	return false
}
