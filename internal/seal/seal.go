// Package seal encrypts values that outpost keeps at rest, so that a copy
// of the disk, or of the cache file, does not give away the Secrets and
// tokens of the node's workloads when the key is kept elsewhere (a tmpfs
// the TPM unseals it into at boot, say).
//
// A Key is an AES-256 key read from a key file. Seal encrypts and
// authenticates one value with AES-GCM under a fresh random 96-bit nonce,
// binding it to associated data the caller chooses (where the value is
// stored), and Open reverses it. A sealed value is
//
//	"osl" | version (1) | key id (4 bytes) | nonce (12 bytes) | ciphertext | tag (16 bytes)
//
// The prefix makes sealed values recognizable, and the key id, the first
// bytes of the key's Fingerprint, tells a value sealed with another key
// from a tampered one. Neither reveals anything about the key.
//
// With random nonces one key must not seal more than 2^32 values; a node's
// cache rewrites a Secret only when it changes, far below that.
package seal

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"os"
)

// KeySize is the size of a key: AES-256.
const KeySize = 32

// Overhead is how much longer a sealed value is than its plaintext.
const Overhead = headerSize + 12 + 16

const (
	magic      = "osl"
	version    = 1
	idSize     = 4
	headerSize = len(magic) + 1 + idSize
	// maxKeyFile bounds what LoadKey reads: a key file is 32 or 45 bytes.
	maxKeyFile = 4 << 10
)

// Key seals and opens values with one AES-256-GCM key. It is safe for
// concurrent use.
type Key struct {
	aead   cipher.AEAD
	header [headerSize]byte
	fp     string
}

// NewKey returns the Key for raw, which must be KeySize bytes. raw is not
// kept: the caller may clear it.
func NewKey(raw []byte) (*Key, error) {
	if len(raw) != KeySize {
		return nil, fmt.Errorf("%w: %d bytes, want %d", ErrBadKey, len(raw), KeySize)
	}
	block, err := aes.NewCipher(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadKey, err)
	}
	aead, err := cipher.NewGCMWithRandomNonce(block)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadKey, err)
	}
	// The fingerprint hashes the key with a label of its own, so it is
	// not the hash anything else might compute over the same key file.
	h := sha256.New()
	h.Write([]byte("outpost seal key fingerprint\x00"))
	h.Write(raw)
	sum := h.Sum(nil)
	k := &Key{aead: aead, fp: hex.EncodeToString(sum[:16])}
	copy(k.header[:], magic)
	k.header[len(magic)] = version
	copy(k.header[len(magic)+1:], sum[:idSize])
	return k, nil
}

// LoadKey reads a key file: exactly KeySize raw bytes, or their standard
// base64 (44 characters) with an optional trailing newline, as made by
//
//	head -c 32 /dev/urandom > FILE    or    openssl rand -base64 32 > FILE
//
// It refuses anything else, including a file of 32 printable characters
// (a passphrase or a short base64 key, not 32 random bytes) and an all-zero
// key, and it refuses a file that group or others may access in any way,
// as ssh does for private keys: a key anyone on the node can read protects
// nothing. Errors never quote the file's contents.
func LoadKey(path string) (*Key, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading encryption key file: %w", err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("reading encryption key file: %w", err)
	}
	if info.IsDir() {
		return nil, fmt.Errorf("encryption key file %s: %w: is a directory", path, ErrBadKey)
	}
	if perm := info.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("encryption key file %s: %w: mode %04o lets group or others access it; chmod 600 it (in a Kubernetes volume, defaultMode 0400)",
			path, ErrInsecureKeyFile, perm)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxKeyFile+1))
	defer clear(b)
	if err != nil {
		return nil, fmt.Errorf("reading encryption key file %s: %w", path, err)
	}
	raw, err := parseKey(b)
	defer clear(raw)
	if err != nil {
		return nil, fmt.Errorf("encryption key file %s: %w", path, err)
	}
	return NewKey(raw)
}

const howToMake = "make one with: head -c 32 /dev/urandom > FILE, or: openssl rand -base64 32 > FILE"

// parseKey decodes the contents of a key file into a fresh slice.
func parseKey(b []byte) ([]byte, error) {
	if len(b) == KeySize {
		if printable(b) {
			return nil, fmt.Errorf("%w: it holds 32 printable characters, a passphrase or a short base64 key rather than 32 random bytes; %s", ErrBadKey, howToMake)
		}
		if !bytes.ContainsFunc(b, func(r rune) bool { return r != 0 }) {
			return nil, fmt.Errorf("%w: the key is all zeros; %s", ErrBadKey, howToMake)
		}
		return bytes.Clone(b), nil
	}
	text := b
	if t, ok := bytes.CutSuffix(text, []byte("\n")); ok {
		text, _ = bytes.CutSuffix(t, []byte("\r"))
	}
	if len(text) > maxKeyFile || len(text) != base64.StdEncoding.EncodedLen(KeySize) {
		return nil, fmt.Errorf("%w: want %d raw bytes, or their base64 (%d characters) with an optional newline; the file has %d bytes; %s",
			ErrBadKey, KeySize, base64.StdEncoding.EncodedLen(KeySize), len(b), howToMake)
	}
	raw := make([]byte, base64.StdEncoding.DecodedLen(len(text)))
	n, err := base64.StdEncoding.Strict().Decode(raw, text)
	if err != nil || n != KeySize {
		clear(raw)
		// The decoder's error would quote an offset only, but say nothing
		// more than needed about a key.
		return nil, fmt.Errorf("%w: %d characters that are not the base64 of %d bytes; %s", ErrBadKey, len(text), KeySize, howToMake)
	}
	return raw[:n], nil
}

func printable(b []byte) bool {
	for _, c := range b {
		if c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}

// Fingerprint identifies the key without revealing it: 32 hex digits of a
// labelled SHA-256 of the key. Stores record it to notice a changed key.
func (k *Key) Fingerprint() string { return k.fp }

// String names the key by its fingerprint, so that printing a Key never
// prints key material.
func (k *Key) String() string { return "seal.Key(" + k.fp + ")" }

// GoString is String, for %#v.
func (k *Key) GoString() string { return k.String() }

// Seal appends the sealed form of plaintext, bound to ad, to dst and
// returns the result. ad is authenticated but not stored: Open must be
// given the same. dst and plaintext must not overlap.
func (k *Key) Seal(dst, plaintext, ad []byte) []byte {
	dst = append(dst, k.header[:]...)
	return k.aead.Seal(dst, nil, plaintext, ad)
}

// Open appends the plaintext of sealed, which must have been sealed with
// ad by this key, to dst and returns the result. It fails with
// ErrNotSealed, ErrWrongKey or ErrTampered, never with a partial result.
func (k *Key) Open(dst, sealed, ad []byte) ([]byte, error) {
	if len(sealed) < Overhead || string(sealed[:len(magic)]) != magic {
		return nil, ErrNotSealed
	}
	if v := sealed[len(magic)]; v != version {
		return nil, fmt.Errorf("%w: format version %d", ErrNotSealed, v)
	}
	if !bytes.Equal(sealed[len(magic)+1:headerSize], k.header[len(magic)+1:]) {
		return nil, fmt.Errorf("%w (key id %x, this key's is %x)", ErrWrongKey, sealed[len(magic)+1:headerSize], k.header[len(magic)+1:])
	}
	out, err := k.aead.Open(dst, nil, sealed[headerSize:], ad)
	if err != nil {
		return nil, ErrTampered
	}
	return out, nil
}

// IsSealed reports whether b looks like a value sealed by this package
// (any key): it has the prefix and is long enough. It does not
// authenticate anything.
func IsSealed(b []byte) bool {
	return len(b) >= Overhead && string(b[:len(magic)]) == magic
}
