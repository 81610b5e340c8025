package identity

import "sync"

// Tokens remembers the bearer token each user last called with, in memory
// only (never on disk), so that outpost can act for a quiet caller later:
// re-list its views after an outage (converge), or read the cluster's
// published service-account keys when the node may not. The zero value is
// ready to use.
type Tokens struct {
	mu     sync.RWMutex      // guards tokens
	tokens map[string]string // user -> the token it last used
}

// maxTokens bounds the tokens remembered; past it the memory starts again
// (callers are then remembered as they call again).
const maxTokens = 10000

// Seen notes that user called with token: the Authenticator's Seen hook.
func (t *Tokens) Seen(user, token string) {
	// Called on every token request: a read lock while nothing changes.
	t.mu.RLock()
	same := t.tokens[user] == token
	t.mu.RUnlock()
	if same {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.tokens == nil || len(t.tokens) > maxTokens {
		t.tokens = map[string]string{}
	}
	t.tokens[user] = token
}

// All returns a copy of what is remembered: user -> token.
func (t *Tokens) All() map[string]string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make(map[string]string, len(t.tokens))
	for u, tok := range t.tokens {
		out[u] = tok
	}
	return out
}
