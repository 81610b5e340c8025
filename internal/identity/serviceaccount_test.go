package identity

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/outposthq/outpost/internal/request"
)

const testIssuer = "https://kubernetes.default.svc.cluster.local"

// t0 is the time every test token is checked at.
var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// signingKey is a private key with the kid and algorithm it signs with.
type signingKey struct {
	kid string
	alg jose.SignatureAlgorithm
	key crypto.Signer
}

func newRSAKey(t testing.TB, kid string) signingKey {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return signingKey{kid, jose.RS256, k}
}

func newECKey(t testing.TB, kid string, curve elliptic.Curve, alg jose.SignatureAlgorithm) signingKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(curve, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return signingKey{kid, alg, k}
}

// documents returns the two discovery documents kube-apiserver would
// publish for keys.
func documents(t testing.TB, keys ...signingKey) (openidConfiguration, jwks []byte) {
	t.Helper()
	set := jose.JSONWebKeySet{}
	for _, k := range keys {
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: k.key.Public(), KeyID: k.kid, Algorithm: string(k.alg), Use: "sig"})
	}
	jwks, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	cfg, _ := json.Marshal(map[string]any{
		"issuer":                                testIssuer,
		"jwks_uri":                              testIssuer + "/openid/v1/jwks",
		"response_types_supported":              []string{"id_token"},
		"subject_types_supported":               []string{"public"},
		"id_token_signing_alg_values_supported": []string{"RS256", "ES256", "ES384"},
	})
	return cfg, jwks
}

func newIssuer(t testing.TB, audiences []string, keys ...signingKey) *Issuer {
	t.Helper()
	cfg, jwks := documents(t, keys...)
	i, err := NewIssuer(cfg, jwks, audiences)
	if err != nil {
		t.Fatal(err)
	}
	return i
}

// saClaims are the claims of a bound token the apiserver would issue for
// service account ns/name at t0.
func saClaims(ns, name string) map[string]any {
	return map[string]any{
		"iss": testIssuer,
		"sub": "system:serviceaccount:" + ns + ":" + name,
		"aud": []string{testIssuer},
		"iat": t0.Add(-time.Minute).Unix(),
		"nbf": t0.Add(-time.Minute).Unix(),
		"exp": t0.Add(time.Hour).Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      ns,
			"serviceaccount": map[string]any{"name": name, "uid": "0b3f0c52-0000-4000-8000-000000000001"},
		},
	}
}

func sign(t testing.TB, k signingKey, claims map[string]any) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: k.alg, Key: k.key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", k.kid))
	if err != nil {
		t.Fatal(err)
	}
	token, err := jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return token
}

// unsigned builds a token with the given header and claims and no valid
// signature, as an attacker would.
func unsigned(header string, claims map[string]any, sig string) string {
	payload, _ := json.Marshal(claims)
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(header)) + "." + enc(payload) + "." + sig
}

func TestIssuerVerify(t *testing.T) {
	rsaKey := newRSAKey(t, "rsa-1")
	ecKey := newECKey(t, "ec-1", elliptic.P256(), jose.ES256)
	ec384 := newECKey(t, "ec-2", elliptic.P384(), jose.ES384)
	issuer := newIssuer(t, nil, rsaKey, ecKey, ec384)
	good := saClaims("shop", "web")
	with := func(change func(map[string]any)) map[string]any {
		c := saClaims("shop", "web")
		change(c)
		return c
	}
	impostor := newRSAKey(t, "rsa-1") // same kid, another key
	stranger := newRSAKey(t, "rsa-other")

	// HS256 with the RSA public key as the HMAC secret: the classic
	// algorithm-confusion forgery.
	pubDER, _ := json.Marshal(jose.JSONWebKey{Key: rsaKey.key.Public()})
	hmac, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: pubDER}, nil)
	if err != nil {
		t.Fatal(err)
	}
	hs256, err := jwt.Signed(hmac).Claims(good).Serialize()
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name  string
		token string
		want  string // substring of the error; "" = accepted
	}{
		{"RS256", sign(t, rsaKey, good), ""},
		{"ES256", sign(t, ecKey, good), ""},
		{"ES384", sign(t, ec384, good), ""},
		{"no kid", sign(t, signingKey{"", rsaKey.alg, rsaKey.key}, good), ""},
		{"nbf within the leeway", sign(t, rsaKey, with(func(c map[string]any) { c["nbf"] = t0.Add(30 * time.Second).Unix() })), ""},
		{"legacy-style claims absent", sign(t, rsaKey, with(func(c map[string]any) { delete(c, "kubernetes.io") })), ""},
		{"one of several audiences", sign(t, rsaKey, with(func(c map[string]any) { c["aud"] = []string{"vault", testIssuer} })), ""},

		{"another key, same kid", sign(t, impostor, good), "signature does not verify"},
		{"another key, unknown kid", sign(t, stranger, good), "signature does not verify"},
		{"EC key claiming RS256", unsigned(`{"alg":"RS256","kid":"ec-1"}`, good, "AAAA"), "signature does not verify"},
		{"alg none", unsigned(`{"alg":"none"}`, good, ""), "not a JWT signed with"},
		{"alg none, uppercase", unsigned(`{"alg":"NONE"}`, good, ""), "not a JWT signed with"},
		{"HS256 with the public key", hs256, "not a JWT signed with"},
		{"ES512 not published", sign(t, newECKey(t, "ec-3", elliptic.P521(), jose.ES512), good), "not a JWT signed with"},
		{"wrong issuer", sign(t, rsaKey, with(func(c map[string]any) { c["iss"] = "https://evil.example" })), "issued by"},
		{"legacy issuer", sign(t, rsaKey, with(func(c map[string]any) { c["iss"] = "kubernetes/serviceaccount" })), "issued by"},
		{"expired", sign(t, rsaKey, with(func(c map[string]any) { c["exp"] = t0.Add(-time.Second).Unix() })), "expired"},
		{"expires now", sign(t, rsaKey, with(func(c map[string]any) { c["exp"] = t0.Unix() })), "expired"},
		{"no expiry", sign(t, rsaKey, with(func(c map[string]any) { delete(c, "exp") })), "no expiry"},
		{"not valid yet", sign(t, rsaKey, with(func(c map[string]any) { c["nbf"] = t0.Add(5 * time.Minute).Unix() })), "not valid before"},
		{"issued in the future", sign(t, rsaKey, with(func(c map[string]any) { c["iat"] = t0.Add(5 * time.Minute).Unix() })), "issued in the future"},
		{"wrong audience", sign(t, rsaKey, with(func(c map[string]any) { c["aud"] = []string{"vault"} })), "audiences"},
		{"no audience", sign(t, rsaKey, with(func(c map[string]any) { delete(c, "aud") })), "audiences"},
		{"not a service account", sign(t, rsaKey, with(func(c map[string]any) { c["sub"] = "admin" })), "not a service account"},
		{"node subject", sign(t, rsaKey, with(func(c map[string]any) { c["sub"] = "system:node:edge-1" })), "not a service account"},
		{"no name", sign(t, rsaKey, with(func(c map[string]any) { c["sub"] = "system:serviceaccount:shop" })), "not system:serviceaccount"},
		{"extra colon", sign(t, rsaKey, with(func(c map[string]any) { c["sub"] = "system:serviceaccount:shop:web:x" })), "not system:serviceaccount"},
		{"claims disagree", sign(t, rsaKey, with(func(c map[string]any) { c["sub"] = "system:serviceaccount:kube-system:web" })), "disagree"},
		{"empty", "", "not a JWT"},
		{"garbage", "not-a-token", "not a JWT"},
		{"three empty parts", "..", "not a JWT"},
		{"huge", strings.Repeat("a", maxTokenSize+1), "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id, err := issuer.Verify(tc.token, t0)
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("err = %v; want one saying %q", err, tc.want)
				}
				if id.User != "" {
					t.Fatalf("refused token still has an identity: %+v", id)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := request.Identity{Kind: request.BearerToken, User: "system:serviceaccount:shop:web",
				Groups:    []string{"system:serviceaccounts", "system:serviceaccounts:shop", "system:authenticated"},
				TokenHash: tokenHash(tc.token)}
			if id.Kind != want.Kind || id.User != want.User || !slices.Equal(id.Groups, want.Groups) || id.TokenHash != want.TokenHash || id.Token != "" {
				t.Fatalf("identity = %+v; want %+v", id, want)
			}
		})
	}
}

func TestIssuerAudiences(t *testing.T) {
	k := newRSAKey(t, "k")
	custom := newIssuer(t, []string{"api", "vault"}, k)
	claims := saClaims("a", "b")
	claims["aud"] = []string{"vault"}
	if _, err := custom.Verify(sign(t, k, claims), t0); err != nil {
		t.Fatalf("configured audience: %v", err)
	}
	if _, err := custom.Verify(sign(t, k, saClaims("a", "b")), t0); err == nil {
		t.Fatal("the issuer as audience, when other audiences are configured: accepted")
	}
}

func TestNewIssuer(t *testing.T) {
	k := newRSAKey(t, "k")
	cfg, jwks := documents(t, k)
	secret, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: []byte("0123456789abcdef0123456789abcdef"), KeyID: "k", Algorithm: "HS256"}}})
	private, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: k.key, KeyID: "k", Algorithm: "RS256"}}})
	mixed := []byte(`{"keys":[{"kty":"weird","kid":"x"},` + strings.TrimPrefix(string(jwks), `{"keys":[`))
	for _, tc := range []struct {
		name      string
		cfg, jwks []byte
		ok        bool
	}{
		{"published", cfg, jwks, true},
		{"an unknown key type beside a good one", cfg, mixed, true},
		{"no algorithms listed", []byte(`{"issuer":"` + testIssuer + `"}`), jwks, true},
		{"no issuer", []byte(`{"jwks_uri":"x"}`), jwks, false},
		{"only HMAC algorithms", []byte(`{"issuer":"x","id_token_signing_alg_values_supported":["HS256"]}`), jwks, false},
		{"not JSON", []byte("<html>"), jwks, false},
		{"keys not JSON", cfg, []byte("<html>"), false},
		{"no keys", cfg, []byte(`{"keys":[]}`), false},
		{"only a symmetric key", cfg, secret, false},
		{"a private key is not a published one", cfg, private, false},
	} {
		_, err := NewIssuer(tc.cfg, tc.jwks, nil)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
	i, err := NewIssuer(cfg, jwks, nil)
	if err != nil || i.URL() != testIssuer || i.Keys() != 1 {
		t.Fatalf("issuer %q with %d keys, %v", i.URL(), i.Keys(), err)
	}
}

// FuzzIssuerVerify: whatever the token, Verify never panics, and nothing
// but the signed seed's header and claims is ever accepted (the signature's
// encoding may vary in its unused trailing bits).
func FuzzIssuerVerify(f *testing.F) {
	k := newRSAKey(f, "k")
	issuer := newIssuer(f, nil, k)
	good := sign(f, k, saClaims("shop", "web"))
	f.Add(good)
	f.Add(unsigned(`{"alg":"none"}`, saClaims("shop", "web"), ""))
	f.Add(unsigned(`{"alg":"RS256","kid":"k"}`, saClaims("shop", "web"), "c2ln"))
	f.Add("a.b.c")
	f.Add("..")
	f.Add("eyJhbGciOiJSUzI1NiJ9.e30.")
	signed := good[:strings.LastIndexByte(good, '.')]
	f.Fuzz(func(t *testing.T, token string) {
		id, err := issuer.Verify(token, t0)
		if err == nil && (!strings.HasPrefix(token, signed+".") || id.User != "system:serviceaccount:shop:web") {
			t.Fatalf("accepted a token that is not the signed seed: %q -> %+v", token, id)
		}
	})
}

// FuzzNewIssuer: malformed discovery documents are errors, never panics.
func FuzzNewIssuer(f *testing.F) {
	cfg, jwks := documents(f, newRSAKey(f, "k"), newECKey(f, "e", elliptic.P256(), jose.ES256))
	f.Add(cfg, jwks)
	f.Add([]byte(`{"issuer":"x"}`), []byte(`{"keys":[{"kty":"RSA","n":"","e":""}]}`))
	f.Add([]byte(`{"issuer":"x"}`), []byte(`{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}`))
	f.Fuzz(func(t *testing.T, cfg, jwks []byte) {
		i, err := NewIssuer(cfg, jwks, nil)
		if err == nil {
			_, _ = i.Verify("a.b.c", t0)
		}
	})
}

func TestIssuerVerifyMalformedClaims(t *testing.T) {
	k := newRSAKey(t, "k")
	issuer := newIssuer(t, nil, k)
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: k.alg, Key: k.key}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, payload := range []string{`{"exp":"tomorrow"}`, `[1,2]`, `not json`, `{"aud":{"x":1}}`, `{"kubernetes.io":"x"}`} {
		jws, err := signer.Sign([]byte(payload))
		if err != nil {
			t.Fatal(err)
		}
		token, _ := jws.CompactSerialize()
		if _, err := issuer.Verify(token, t0); err == nil || !strings.Contains(err.Error(), "decoding the claims") {
			t.Errorf("signed payload %s: err = %v; want a claims error", payload, err)
		}
	}
}
