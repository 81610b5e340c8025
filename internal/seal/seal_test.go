package seal

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func randomKey(t testing.TB) []byte {
	t.Helper()
	raw := make([]byte, KeySize)
	if _, err := rand.Read(raw); err != nil {
		t.Fatal(err)
	}
	return raw
}

func newKey(t testing.TB) *Key {
	t.Helper()
	k, err := NewKey(randomKey(t))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestSealOpen(t *testing.T) {
	k := newKey(t)
	for _, plain := range [][]byte{nil, {}, []byte("x"), []byte(`{"data":{"password":"aHVudGVyMg=="}}`), bytes.Repeat([]byte("s"), 1<<20)} {
		sealed := k.Seal(nil, plain, []byte("where"))
		if len(sealed) != len(plain)+Overhead {
			t.Errorf("sealed %d bytes into %d, want overhead %d", len(plain), len(sealed), Overhead)
		}
		if !IsSealed(sealed) {
			t.Errorf("IsSealed(sealed) = false")
		}
		if len(plain) > 8 && bytes.Contains(sealed, plain) {
			t.Errorf("sealed value holds its plaintext")
		}
		got, err := k.Open(nil, sealed, []byte("where"))
		if err != nil || !bytes.Equal(got, plain) {
			t.Errorf("Open = %.40q, %v; want %.40q", got, err, plain)
		}
	}
}

func TestSealAppends(t *testing.T) {
	k := newKey(t)
	sealed := k.Seal([]byte("head:"), []byte("body"), nil)
	if !bytes.HasPrefix(sealed, []byte("head:")) {
		t.Fatalf("Seal did not append to dst: %q", sealed)
	}
	got, err := k.Open([]byte("out:"), sealed[len("head:"):], nil)
	if err != nil || string(got) != "out:body" {
		t.Fatalf("Open = %q, %v", got, err)
	}
}

func TestNoncesDiffer(t *testing.T) {
	k := newKey(t)
	a, b := k.Seal(nil, []byte("same"), nil), k.Seal(nil, []byte("same"), nil)
	if bytes.Equal(a, b) {
		t.Fatal("two seals of one value are equal: the nonce is not fresh")
	}
}

func TestOpenRefuses(t *testing.T) {
	k, other := newKey(t), newKey(t)
	sealed := k.Seal(nil, []byte("secret value"), []byte("ad"))
	flip := func(i int) []byte {
		b := bytes.Clone(sealed)
		b[i] ^= 1
		return b
	}
	tests := []struct {
		name   string
		key    *Key
		sealed []byte
		ad     string
		want   error
	}{
		{"plaintext", k, []byte(`{"kind":"Secret","data":{"a":"b"}}`), "ad", ErrNotSealed},
		{"empty", k, nil, "ad", ErrNotSealed},
		{"short", k, sealed[:Overhead-1], "ad", ErrNotSealed},
		{"unknown version", k, flip(len(magic)), "ad", ErrNotSealed},
		{"another key", other, sealed, "ad", ErrWrongKey},
		{"key id changed", k, flip(len(magic) + 1), "ad", ErrWrongKey},
		{"other ad", k, sealed, "elsewhere", ErrTampered},
		{"nonce changed", k, flip(headerSize), "ad", ErrTampered},
		{"ciphertext changed", k, flip(headerSize + 12), "ad", ErrTampered},
		{"tag changed", k, flip(len(sealed) - 1), "ad", ErrTampered},
		{"truncated", k, sealed[:len(sealed)-1], "ad", ErrTampered},
		{"extended", k, append(bytes.Clone(sealed), 0), "ad", ErrTampered},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.key.Open(nil, tt.sealed, []byte(tt.ad))
			if !errors.Is(err, tt.want) || got != nil {
				t.Errorf("Open = %q, %v; want %v", got, err, tt.want)
			}
		})
	}
}

func TestFingerprint(t *testing.T) {
	raw := randomKey(t)
	a, _ := NewKey(raw)
	b, _ := NewKey(bytes.Clone(raw))
	c := newKey(t)
	if a.Fingerprint() != b.Fingerprint() || a.Fingerprint() == c.Fingerprint() || len(a.Fingerprint()) != 32 {
		t.Fatalf("fingerprints: same key %s %s, other %s", a.Fingerprint(), b.Fingerprint(), c.Fingerprint())
	}
	if strings.Contains(a.Fingerprint(), fmt.Sprintf("%x", raw[:4])) {
		t.Fatal("fingerprint shows key bytes")
	}
	for _, s := range []string{fmt.Sprint(a), fmt.Sprintf("%+v", a), fmt.Sprintf("%#v", a)} {
		if !strings.Contains(s, a.Fingerprint()) || strings.Contains(s, fmt.Sprintf("%x", raw[:4])) {
			t.Errorf("printed key: %s", s)
		}
	}
}

func writeKeyFile(t *testing.T, content []byte, mode os.FileMode) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(path, content, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // whatever the umask
		t.Fatal(err)
	}
	return path
}

func TestLoadKey(t *testing.T) {
	raw := randomKey(t)
	want, _ := NewKey(raw)
	b64 := base64.StdEncoding.EncodeToString(raw)
	for name, content := range map[string]string{
		"raw":          string(raw),
		"base64":       b64,
		"base64 LF":    b64 + "\n",
		"base64 CR LF": b64 + "\r\n",
	} {
		t.Run(name, func(t *testing.T) {
			k, err := LoadKey(writeKeyFile(t, []byte(content), 0o600))
			if err != nil {
				t.Fatal(err)
			}
			if k.Fingerprint() != want.Fingerprint() {
				t.Fatal("loaded another key")
			}
		})
	}
	t.Run("0400", func(t *testing.T) {
		if _, err := LoadKey(writeKeyFile(t, raw, 0o400)); err != nil {
			t.Fatal(err)
		}
	})
}

func TestLoadKeyRefuses(t *testing.T) {
	raw := randomKey(t)
	b64 := base64.StdEncoding.EncodeToString(raw)
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
		want    error
		says    string
	}{
		{"readable by others", b64, 0o644, ErrInsecureKeyFile, "chmod 600"},
		{"readable by group", b64, 0o640, ErrInsecureKeyFile, "chmod 600"},
		{"writable by group", b64, 0o620, ErrInsecureKeyFile, "chmod 600"},
		{"empty", "", 0o600, ErrBadKey, "has 0 bytes"},
		{"short raw", string(raw[:16]), 0o600, ErrBadKey, "has 16 bytes"},
		{"raw and a newline", string(raw) + "\n", 0o600, ErrBadKey, "has 33 bytes"},
		{"passphrase", "correct horse battery staple!!!!", 0o600, ErrBadKey, "printable"},
		{"base64 of 24 bytes", base64.StdEncoding.EncodeToString(raw[:24]), 0o600, ErrBadKey, "printable"},
		{"all zeros", string(make([]byte, 32)), 0o600, ErrBadKey, "all zeros"},
		{"hex", fmt.Sprintf("%x\n", raw), 0o600, ErrBadKey, "has 65 bytes"},
		{"base64 without padding", strings.TrimRight(b64, "="), 0o600, ErrBadKey, "has 43 bytes"},
		{"not base64", strings.Repeat("!", 44), 0o600, ErrBadKey, "not the base64"},
		{"two newlines", b64 + "\n\n", 0o600, ErrBadKey, "has 46 bytes"},
		{"huge", strings.Repeat("A", 10000), 0o600, ErrBadKey, "bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := LoadKey(writeKeyFile(t, []byte(tt.content), tt.mode))
			if !errors.Is(err, tt.want) || k != nil {
				t.Fatalf("LoadKey = %v, %v; want %v", k, err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.says) {
				t.Errorf("error %q does not say %q", err, tt.says)
			}
			// Never the key, in any form.
			for _, s := range []string{b64, b64[:12], fmt.Sprintf("%x", raw[:6]), "correct horse"} {
				if strings.Contains(err.Error(), s) {
					t.Errorf("error %q quotes the file", err)
				}
			}
		})
	}
	if _, err := LoadKey(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if _, err := LoadKey(t.TempDir()); err == nil {
		t.Errorf("a directory loaded as a key")
	}
}

func BenchmarkOpen1KB(b *testing.B) {
	k := newKey(b)
	plain := bytes.Repeat([]byte("x"), 1024)
	sealed := k.Seal(nil, plain, []byte("ad"))
	var out []byte
	b.SetBytes(int64(len(plain)))
	for b.Loop() {
		var err error
		if out, err = k.Open(out[:0], sealed, []byte("ad")); err != nil {
			b.Fatal(err)
		}
	}
}
