package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// names lists dir, to check that no temporary file is left behind.
func names(t *testing.T, dir string) []string {
	t.Helper()
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got, err := d.Readdirnames(-1)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	return got
}

func check(t *testing.T, path, want string, mode os.FileMode) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Fatalf("%s holds %q, want %q", path, got, want)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != mode {
		t.Fatalf("%s has mode %v, want %v", path, fi.Mode().Perm(), mode)
	}
}

func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kubeconfig")
	// 0666 would be 0644 under the usual umask if the umask applied.
	if err := WriteFile(path, []byte("first"), 0o666); err != nil {
		t.Fatal(err)
	}
	check(t, path, "first", 0o666)
	if err := WriteFile(path, []byte("second"), 0o600); err != nil {
		t.Fatal(err)
	}
	check(t, path, "second", 0o600)
	if got := names(t, dir); !slices.Equal(got, []string{"kubeconfig"}) {
		t.Fatalf("directory holds %q, want only the file", got)
	}
}

// TestFailedWriteKeepsOldFile: a write that fails at any step (as a full
// disk or a crash would stop it) leaves the old content, its mode, and no
// temporary file.
func TestFailedWriteKeepsOldFile(t *testing.T) {
	for _, step := range []string{"sync", "rename"} {
		t.Run(step, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "ca.crt")
			if err := WriteFile(path, []byte("old"), 0o644); err != nil {
				t.Fatal(err)
			}
			boom := errors.New("no space left on device")
			failpoint = func(s string) error {
				if s == step {
					return boom
				}
				return nil
			}
			t.Cleanup(func() { failpoint = nil })
			if err := WriteFile(path, []byte("new content, longer than the old"), 0o600); !errors.Is(err, boom) {
				t.Fatalf("WriteFile = %v, want %v", err, boom)
			}
			check(t, path, "old", 0o644)
			if got := names(t, dir); !slices.Equal(got, []string{"ca.crt"}) {
				t.Fatalf("directory holds %q, want only the old file", got)
			}
		})
	}
}

// TestRenameFails: a real failure (the path is a directory) leaves it as
// it was, without a temporary file beside it.
func TestRenameFails(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "taken")
	if err := os.MkdirAll(filepath.Join(path, "inside"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(path, []byte("data"), 0o600); err == nil {
		t.Fatal("WriteFile over a non-empty directory succeeded")
	}
	if got := names(t, dir); !slices.Equal(got, []string{"taken"}) {
		t.Fatalf("directory holds %q, want only the directory", got)
	}
	if got := names(t, path); !slices.Equal(got, []string{"inside"}) {
		t.Fatalf("the directory now holds %q", got)
	}
	if err := WriteFile(filepath.Join(dir, "missing", "file"), []byte("data"), 0o600); err == nil {
		t.Fatal("WriteFile into a missing directory succeeded")
	}
}

// TestWriteThroughSymlink: a link is kept and the file it points to
// replaced, as a write in place would do.
func TestWriteThroughSymlink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "real")
	link := filepath.Join(dir, "link")
	if err := WriteFile(target, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("real", link); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(link, []byte("new"), 0o600); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("link replaced by a file (%v)", err)
	}
	check(t, target, "new", 0o600)
}
