package identity

import (
	"encoding/json"
	"log/slog"
	"time"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// Memory keeps the token identities the apiserver confirmed in the store,
// under the token's hash (the token itself is never stored), so that a
// caller is known offline after outpost restarts: the Authenticator's
// Remember and Recall.
type Memory struct {
	Store *store.Store
	Log   *slog.Logger
}

// memoryPrefix starts the store documents Memory owns. They are not
// sealed: a hash and a user name are what offline selection of views
// needs anyway (see ARCHITECTURE.md, At rest).
const memoryPrefix = "identity\x00"

// rememberedToken is how a confirmed token identity is kept.
type rememberedToken struct {
	User    string    `json:"user"`
	Groups  []string  `json:"groups,omitempty"`
	Expires time.Time `json:"expires"`
}

// Remember stores id, confirmed for the token of hash until expires.
func (m Memory) Remember(hash string, id request.Identity, expires time.Time) {
	body, _ := json.Marshal(rememberedToken{User: id.User, Groups: id.Groups, Expires: expires})
	if err := m.Store.PutDoc(memoryPrefix+hash, "application/json", body); err != nil {
		m.Log.Warn("cannot remember a token identity; it will not be known offline after a restart", "user", id.User, "err", err)
	}
}

// Recall reads back what Remember stored for hash.
func (m Memory) Recall(hash string) (request.Identity, time.Time, bool) {
	_, body, ok, err := m.Store.Doc(memoryPrefix + hash)
	if err != nil || !ok {
		return request.Identity{}, time.Time{}, false
	}
	var r rememberedToken
	if json.Unmarshal(body, &r) != nil || r.User == "" {
		return request.Identity{}, time.Time{}, false
	}
	return request.Identity{User: r.User, Groups: r.Groups}, r.Expires, true
}
