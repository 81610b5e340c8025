package local

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/status"
)

// Service-account tokens. kubelet asks for a token (TokenRequest) for every
// pod that mounts one, again after each restart. Tokens it was given online
// are recorded with their expiry; offline, the same request (service
// account, audiences, bound object) gets the recorded token while it is
// still valid. Outpost never makes a token up.

const tokenPrefix = "sa-token\x00"

// SealedDocPrefixes are the prefixes of the store documents of package
// local that hold credentials (recorded tokens), to be sealed at rest.
func SealedDocPrefixes() []string { return []string{tokenPrefix} }

// tokenKey names a recorded token: namespace/service account, the bound
// object and the audiences.
func tokenKey(ns, sa string, spec authenticationv1.TokenRequestSpec) string {
	aud := append([]string(nil), spec.Audiences...)
	sort.Strings(aud)
	bound := ""
	if b := spec.BoundObjectRef; b != nil {
		bound = b.Kind + "/" + b.Name + "/" + string(b.UID)
	}
	return tokenPrefix + ns + "/" + sa + "\x00" + bound + "\x00" + strings.Join(aud, ",")
}

func isTokenRequest(info *request.Info) bool {
	return info.IsResourceRequest && info.APIGroup == "" && info.Resource == "serviceaccounts" && info.Subresource == "token" && info.Verb == "create"
}

func (l *Writer) ownNode(info *request.Info) bool {
	return l.Node != "" && info.Identity.Kind == request.NodeCert && info.Identity.User == "system:node:"+l.Node
}

// Records reports whether info's answer is a token for this node's
// kubelet, which RecordedToken turns into the document to store.
func (l *Writer) Records(info *request.Info) bool {
	return isTokenRequest(info) && l.ownNode(info)
}

// RecordedToken returns the store document of a TokenRequest answer (a
// 201 to this node's kubelet, see Records) for service account sa in
// namespace ns: the key it is served offline by, and the answer as JSON.
// ok is false for an answer that holds no token.
func RecordedToken(contentType string, body []byte, ns, sa string) (key string, doc []byte, ok bool) {
	tr, err := decodeTokenRequest(contentType, body)
	if err != nil || tr.Status.Token == "" {
		return "", nil, false
	}
	raw, _ := json.Marshal(tr)
	// Keyed by what the apiserver answered: it fills in default
	// audiences, which a later identical request leaves out again.
	return tokenKey(ns, sa, tr.Spec), raw, true
}

func decodeTokenRequest(contentType string, body []byte) (*authenticationv1.TokenRequest, error) {
	tr := &authenticationv1.TokenRequest{}
	if codec.MediaType(contentType) == codec.MediaJSON {
		return tr, json.Unmarshal(body, tr)
	}
	obj, err := codec.Decode(body, tr)
	if err != nil {
		return nil, err
	}
	t, ok := obj.(*authenticationv1.TokenRequest)
	if !ok {
		return nil, fmt.Errorf("not a TokenRequest: %T", obj)
	}
	return t, nil
}

// serveToken answers a TokenRequest offline with a recorded, unexpired
// token for the same service account, bound object and audiences.
func (l *Writer) serveToken(w http.ResponseWriter, r *http.Request, info *request.Info) error {
	body, _, err := requestJSON(r)
	if err != nil {
		return err
	}
	var req authenticationv1.TokenRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return status.BadRequest("decoding TokenRequest: " + err.Error())
	}
	now := l.Now()
	var found *authenticationv1.TokenRequest
	pick := func(raw []byte) {
		var tr authenticationv1.TokenRequest
		if json.Unmarshal(raw, &tr) != nil || !now.Add(time.Minute).Before(tr.Status.ExpirationTimestamp.Time) {
			return
		}
		if found == nil || tr.Status.ExpirationTimestamp.After(found.Status.ExpirationTimestamp.Time) {
			found = &tr
		}
	}
	if len(req.Spec.Audiences) > 0 {
		if _, raw, ok, err := l.Store.Doc(tokenKey(info.Namespace, info.Name, req.Spec)); err == nil && ok {
			pick(raw)
		}
	} else {
		// No audiences asked: the apiserver's defaults, as recorded.
		prefix := tokenKey(info.Namespace, info.Name, req.Spec)
		prefix = prefix[:strings.LastIndexByte(prefix, 0)+1]
		_ = l.Store.Docs(prefix, func(_, _ string, raw []byte) error { pick(raw); return nil })
	}
	if found == nil {
		return status.Unavailable(fmt.Sprintf("outpost: the cloud is unreachable and no unexpired token for service account %s/%s (this bound object and audiences) was issued to this node online", info.Namespace, info.Name), 5)
	}
	out, _ := json.Marshal(found)
	return answer(w, http.StatusCreated, "recorded-token", codec.WithTypeMeta(stripKind(out), "TokenRequest", "authentication.k8s.io/v1"), info.Accept)
}

func stripKind(b []byte) []byte {
	out, err := codec.StripTypeMeta(b)
	if err != nil {
		return b
	}
	return out
}
