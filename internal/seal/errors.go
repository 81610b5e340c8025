package seal

import "errors"

// ErrBadKey is returned for a key, or key file, that is not an AES-256 key
// in one of the accepted forms. The message says which form was expected,
// never what the file held.
var ErrBadKey = errors.New("invalid encryption key")

// ErrInsecureKeyFile is returned by LoadKey for a key file that group or
// others may access.
var ErrInsecureKeyFile = errors.New("encryption key file is not private to its owner")

// ErrNotSealed is returned by Open for a value that does not carry the
// sealed prefix of this version: plaintext, or a format this outpost does
// not know.
var ErrNotSealed = errors.New("value is not sealed")

// ErrWrongKey is returned by Open for a value sealed with another key.
var ErrWrongKey = errors.New("value was sealed with another key")

// ErrTampered is returned by Open for a value that does not authenticate
// with its associated data: altered, truncated, or moved to another place.
var ErrTampered = errors.New("sealed value does not authenticate")
