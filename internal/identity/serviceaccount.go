package identity

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/json"
	"github.com/go-jose/go-jose/v4/jwt"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/outposthq/outpost/internal/request"
)

// Issuer is the cluster's service-account token issuer, as kube-apiserver
// publishes it for OIDC discovery (/.well-known/openid-configuration and
// /openid/v1/jwks). Offline it stands in for the apiserver's token
// authenticator, for service-account tokens outpost never saw online: a
// token it signed, for an audience it accepts, within its lifetime, is the
// service account it names.
//
// What only the apiserver can check — that the account, and the pod or
// secret a token is bound to, still exist — is not checked: such a token
// is accepted offline until it expires, and even then it reads only what
// its service account read online.
//
// An Issuer is immutable and safe for concurrent use.
type Issuer struct {
	url       string // the iss claim of its tokens
	jwksURI   string
	keys      []jose.JSONWebKey
	algs      []jose.SignatureAlgorithm
	audiences []string
}

// signingAlgorithms are the algorithms kube-apiserver signs
// service-account tokens with (RSA or ECDSA keys, see
// k8s.io/kubernetes/pkg/serviceaccount). Everything else, notably "none"
// and the HMAC family, is refused before any key is tried.
var signingAlgorithms = []jose.SignatureAlgorithm{jose.RS256, jose.ES256, jose.ES384, jose.ES512}

// maxTokenSize bounds what is parsed at all; the apiserver's tokens are
// about a kilobyte.
const maxTokenSize = 16 << 10

// notBeforeLeeway tolerates clocks a little apart for nbf and iat, as the
// apiserver does. exp gets none: offline, a token is never stretched.
const notBeforeLeeway = 60 * time.Second

// NewIssuer builds an Issuer from the bodies of the apiserver's
// /.well-known/openid-configuration and /openid/v1/jwks. audiences are
// those a token must carry one of (the apiserver's --api-audiences); empty
// means the issuer itself, the apiserver's default.
func NewIssuer(openidConfiguration, jwks []byte, audiences []string) (*Issuer, error) {
	var cfg struct {
		Issuer  string   `json:"issuer"`
		JWKSURI string   `json:"jwks_uri"`
		Algs    []string `json:"id_token_signing_alg_values_supported"`
	}
	if err := json.Unmarshal(openidConfiguration, &cfg); err != nil {
		return nil, fmt.Errorf("decoding openid-configuration: %w", err)
	}
	if cfg.Issuer == "" {
		return nil, errors.New("openid-configuration names no issuer")
	}
	i := &Issuer{url: cfg.Issuer, jwksURI: cfg.JWKSURI, algs: signingAlgorithms}
	if len(cfg.Algs) > 0 {
		i.algs = nil
		for _, a := range signingAlgorithms {
			if slices.Contains(cfg.Algs, string(a)) {
				i.algs = append(i.algs, a)
			}
		}
		if len(i.algs) == 0 {
			return nil, fmt.Errorf("openid-configuration: none of the signing algorithms %v is one kube-apiserver uses", cfg.Algs)
		}
	}

	// Keys one by one: a key of a type this library does not know must
	// not make the others unusable.
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(jwks, &set); err != nil {
		return nil, fmt.Errorf("decoding jwks: %w", err)
	}
	for _, raw := range set.Keys {
		var k jose.JSONWebKey
		if json.Unmarshal(raw, &k) != nil || !k.Valid() || !k.IsPublic() || k.Use == "enc" {
			continue
		}
		i.keys = append(i.keys, k)
	}
	if len(i.keys) == 0 {
		return nil, fmt.Errorf("jwks holds no usable public key (of %d)", len(set.Keys))
	}

	i.audiences = slices.Clone(audiences)
	if len(i.audiences) == 0 {
		i.audiences = []string{cfg.Issuer}
	}
	return i, nil
}

// URL is the issuer (the iss claim of its tokens).
func (i *Issuer) URL() string { return i.url }

// Keys is how many public keys the issuer verifies with.
func (i *Issuer) Keys() int { return len(i.keys) }

// privateClaims are the claims kube-apiserver adds to bound tokens.
type privateClaims struct {
	Kubernetes *struct {
		Namespace      string `json:"namespace"`
		ServiceAccount struct {
			Name string `json:"name"`
		} `json:"serviceaccount"`
	} `json:"kubernetes.io"`
}

// Verify checks token as kube-apiserver would check a service-account
// token of this issuer at time now, and returns the identity the apiserver
// would give it. The error says why a token is refused; it never quotes
// the token.
func (i *Issuer) Verify(token string, now time.Time) (request.Identity, error) {
	if len(token) > maxTokenSize {
		return request.Identity{}, fmt.Errorf("token is larger than %d bytes", maxTokenSize)
	}
	jws, err := jose.ParseSignedCompact(token, i.algs)
	if err != nil {
		return request.Identity{}, fmt.Errorf("not a JWT signed with %v: %w", i.algs, err)
	}
	head := jws.Signatures[0].Header
	var payload []byte
	verified := false
	for _, k := range i.keys {
		if head.KeyID != "" && k.KeyID != "" && k.KeyID != head.KeyID {
			continue
		}
		if k.Algorithm != "" && k.Algorithm != head.Algorithm {
			continue
		}
		if payload, err = jws.Verify(k.Key); err == nil {
			verified = true
			break
		}
	}
	if !verified {
		return request.Identity{}, fmt.Errorf("signature does not verify with any key of issuer %s", i.url)
	}
	var claims jwt.Claims
	var private privateClaims
	if err := errors.Join(json.Unmarshal(payload, &claims), json.Unmarshal(payload, &private)); err != nil {
		return request.Identity{}, fmt.Errorf("decoding the claims: %w", err)
	}

	if claims.Issuer != i.url {
		return request.Identity{}, fmt.Errorf("token is issued by %q, not by %q", claims.Issuer, i.url)
	}
	if claims.Expiry == nil {
		return request.Identity{}, errors.New("token has no expiry")
	}
	if exp := claims.Expiry.Time(); !now.Before(exp) {
		return request.Identity{}, fmt.Errorf("token expired at %s", exp.UTC().Format(time.RFC3339))
	}
	if claims.NotBefore != nil && now.Add(notBeforeLeeway).Before(claims.NotBefore.Time()) {
		return request.Identity{}, fmt.Errorf("token is not valid before %s", claims.NotBefore.Time().UTC().Format(time.RFC3339))
	}
	if claims.IssuedAt != nil && now.Add(notBeforeLeeway).Before(claims.IssuedAt.Time()) {
		return request.Identity{}, fmt.Errorf("token is issued in the future (%s)", claims.IssuedAt.Time().UTC().Format(time.RFC3339))
	}
	if !slices.ContainsFunc(i.audiences, claims.Audience.Contains) {
		return request.Identity{}, fmt.Errorf("token is for audiences %q, none of %q", []string(claims.Audience), i.audiences)
	}

	ns, name, err := serviceAccount(claims.Subject)
	if err != nil {
		return request.Identity{}, err
	}
	if k := private.Kubernetes; k != nil && (k.Namespace != ns || k.ServiceAccount.Name != name) {
		return request.Identity{}, fmt.Errorf("subject %q and the kubernetes.io claims (%s/%s) disagree", claims.Subject, k.Namespace, k.ServiceAccount.Name)
	}
	return request.Identity{
		Kind:      request.BearerToken,
		User:      claims.Subject,
		Groups:    []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
		TokenHash: tokenHash(token),
	}, nil
}

// serviceAccount splits a subject system:serviceaccount:<ns>:<name>, with
// the apiserver's rules for both names.
func serviceAccount(sub string) (namespace, name string, err error) {
	rest, ok := strings.CutPrefix(sub, "system:serviceaccount:")
	if !ok {
		return "", "", fmt.Errorf("subject %q is not a service account", sub)
	}
	namespace, name, ok = strings.Cut(rest, ":")
	if !ok || len(validation.IsDNS1123Label(namespace)) > 0 || len(validation.IsDNS1123Subdomain(name)) > 0 {
		return "", "", fmt.Errorf("subject %q is not system:serviceaccount:<namespace>:<name>", sub)
	}
	return namespace, name, nil
}
