package store

import (
	"bytes"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// filled writes a store with n objects of about 1 KB at path.
func filled(t *testing.T, path string, n int) {
	t.Helper()
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	objs := make([]Object, n)
	for i := range objs {
		objs[i] = benchObject("ns", i, "1")
	}
	if err := s.ReplaceView(View{Key: key("node", "", "", "")}, objs); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// rawBolt changes the file at path with bbolt directly.
func rawBolt(t *testing.T, path string, fn func(*bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(fn); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestOpenMovesUnusableFilesAside(t *testing.T) {
	tests := []struct {
		name   string
		make   func(t *testing.T, path string)
		reason string // in the log line
	}{{
		name: "garbage",
		make: func(t *testing.T, path string) {
			b := make([]byte, 64<<10)
			for i := range b {
				b[i] = byte(rand.IntN(256))
			}
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
		},
		reason: "invalid database",
	}, {
		name: "text shorter than a page",
		make: func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("hello\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		},
		reason: "invalid database",
	}, {
		name: "truncated to half",
		make: func(t *testing.T, path string) {
			filled(t, path, 2000)
			info, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(path, info.Size()/2); err != nil {
				t.Fatal(err)
			}
		},
	}, {
		name: "truncated to its meta pages",
		make: func(t *testing.T, path string) {
			filled(t, path, 200)
			if err := os.Truncate(path, 3*4096); err != nil {
				t.Fatal(err)
			}
		},
	}, {
		name: "meta pages overwritten",
		make: func(t *testing.T, path string) {
			filled(t, path, 200)
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			for _, off := range []int64{16, 4096 + 16} {
				if _, err := f.WriteAt(bytes.Repeat([]byte{0xff}, 64), off); err != nil {
					t.Fatal(err)
				}
			}
		},
	}, {
		name: "unknown format version",
		make: func(t *testing.T, path string) {
			filled(t, path, 10)
			rawBolt(t, path, func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(metaFormat, []byte("99")) })
		},
		reason: "unknown format version",
	}, {
		name: "another program's bbolt file",
		make: func(t *testing.T, path string) {
			rawBolt(t, path, func(tx *bolt.Tx) error {
				b, err := tx.CreateBucket([]byte("settings"))
				if err != nil {
					return err
				}
				return b.Put([]byte("k"), []byte("v"))
			})
		},
		reason: "not an outpost store",
	}, {
		name: "missing bucket",
		make: func(t *testing.T, path string) {
			filled(t, path, 10)
			rawBolt(t, path, func(tx *bolt.Tx) error { return tx.DeleteBucket(bucketMembers) })
		},
		reason: "no members bucket",
	}, {
		name: "corrupt record",
		make: func(t *testing.T, path string) {
			filled(t, path, 10)
			rawBolt(t, path, func(tx *bolt.Tx) error {
				return tx.Bucket(bucketObjects).Put([]byte("\xff"), []byte{7, 7, 7})
			})
		},
		reason: "object record version 7",
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "store.db")
			tt.make(t, path)
			orig, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			s, err := Open(path, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil)), NoSync: true})
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer s.Close()

			asides, _ := filepath.Glob(path + ".corrupt-*")
			if len(asides) != 1 {
				t.Fatalf("files moved aside: %v", asides)
			}
			if moved, err := os.ReadFile(asides[0]); err != nil || !bytes.Equal(moved, orig) {
				t.Errorf("aside file differs from the original (%v)", err)
			}
			if n := strings.Count(logs.String(), "\n"); n != 1 || !strings.Contains(logs.String(), "moved it aside") ||
				!strings.Contains(logs.String(), asides[0]) || !strings.Contains(logs.String(), tt.reason) {
				t.Errorf("log (want one line naming the aside file and %q):\n%s", tt.reason, logs.String())
			}

			if o, v, err := s.Stats(); err != nil || o != 0 || v != 0 {
				t.Errorf("fresh store: %d objects, %d views, %v", o, v, err)
			}
			if err := s.ReplaceView(View{Key: key("node", "", "", "")}, []Object{pod("a", "p", "1")}); err != nil {
				t.Fatal(err)
			}
			if _, ok, err := s.Get(pods, "a", "p"); !ok || err != nil {
				t.Errorf("fresh store Get: %v %v", ok, err)
			}
			checkInvariants(t, s)
		})
	}
}

func TestOpenKeepsGoodFiles(t *testing.T) {
	dir := t.TempDir()
	var logs bytes.Buffer
	opts := Options{Logger: slog.New(slog.NewTextHandler(&logs, nil)), NoSync: true}

	// An empty file, as a crash right after creating it leaves, is a new store.
	empty := filepath.Join(dir, "empty.db")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(empty, opts)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()

	// So is a bbolt file without buckets.
	bare := filepath.Join(dir, "bare.db")
	rawBolt(t, bare, func(*bolt.Tx) error { return nil })
	s, err = Open(bare, opts)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()

	good := filepath.Join(dir, "good.db")
	filled(t, good, 500)
	if err := os.Chmod(good, 0o644); err != nil {
		t.Fatal(err)
	}
	s, err = Open(good, opts)
	if err != nil {
		t.Fatal(err)
	}
	if o, _, _ := s.Stats(); o != 500 {
		t.Errorf("reopened store has %d objects", o)
	}
	checkInvariants(t, s)
	s.Close()
	if info, _ := os.Stat(good); info.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", info.Mode().Perm())
	}
	if logs.Len() != 0 {
		t.Errorf("logged for good files: %s", logs.String())
	}
	if asides, _ := filepath.Glob(filepath.Join(dir, "*.corrupt-*")); len(asides) != 0 {
		t.Errorf("moved aside: %v", asides)
	}
}

func TestOpenCreates0600(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", info.Mode().Perm())
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "store.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	defer func(d time.Duration) { lockTimeout = d }(lockTimeout)
	lockTimeout = 100 * time.Millisecond
	if _, err := Open(path, Options{}); !errors.Is(err, ErrLocked) {
		t.Errorf("second Open: %v, want ErrLocked", err)
	}

	// A directory in the way is an error, not something to move aside.
	if _, err := Open(dir, Options{}); err == nil {
		t.Error("Open of a directory succeeded")
	}
	if _, err := Open(filepath.Join(dir, "missing", "store.db"), Options{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open in a missing directory: %v", err)
	}
	if os.Getuid() != 0 {
		ro := filepath.Join(dir, "ro.db")
		if err := os.WriteFile(ro, []byte("x"), 0o400); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(ro, Options{}); !errors.Is(err, os.ErrPermission) {
			t.Errorf("Open of a read-only file: %v", err)
		}
		if _, err := os.Stat(ro); err != nil {
			t.Errorf("read-only file was moved: %v", err)
		}
	}
	if asides, _ := filepath.Glob(filepath.Join(dir, "*.corrupt-*")); len(asides) != 0 {
		t.Errorf("moved aside: %v", asides)
	}
}
