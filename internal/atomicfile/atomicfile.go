// Package atomicfile replaces files whole. A file rewritten in place is
// truncated first, so a crash or a full disk midway leaves half of it, which
// is then read as if whole: a kubeconfig that no longer parses, a PEM block
// cut short. Here the new content goes to a temporary file beside the old
// one, is flushed to disk, and then renamed over it, so that the path holds
// either the old content or the new.
package atomicfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// failpoint, if set by a test, is called before the steps "sync" and
// "rename"; an error it returns fails the write there, to check what a
// failure (or a crash) at that point leaves behind.
var failpoint func(step string) error

// WriteFile replaces path with data, with mode perm whatever the umask. If
// path is a symbolic link, the file it points to is replaced and the link
// kept, as a write in place would. On an error before the rename, path is
// untouched and the temporary file removed; the directory is flushed after
// the rename so that the new name itself survives a power loss.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	if target, err := filepath.EvalSymlinks(path); err == nil {
		path = target
	}
	if err := write(path, data, perm); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

func write(path string, data []byte, perm os.FileMode) (err error) {
	dir := filepath.Dir(path)
	// A dot name, so that tools listing the directory pass it over.
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	// CreateTemp made it 0600; Chmod is not subject to the umask.
	if err := tmp.Chmod(perm); err != nil {
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		return err
	}
	// Without the fsync the rename can reach the disk before the data,
	// and a power loss then leaves an empty file under the old name.
	if err := fail("sync"); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := fail("rename"); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return syncDir(dir)
}

func fail(step string) error {
	if failpoint == nil {
		return nil
	}
	return failpoint(step)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}
