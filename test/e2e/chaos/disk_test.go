package chaos

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// diskSize is the small file system under outpost's store: room for the
// soak's few hundred objects, small enough to fill in a moment.
const diskSize = "64m"

// A tmpfs is a file system of its own under outpost's data directory, which
// the disk-full fault fills.
type tmpfs struct {
	dir    string
	filler string
	full   atomic.Bool
}

// mountStore moves outpost's data directory onto a small tmpfs of its own
// (outpost stopped meanwhile and started again), unmounted when the test
// ends. It needs root; otherwise it returns nil and the soak goes without
// the disk-full fault, saying so.
func mountStore(t *testing.T, o *framework.Outpost) *tmpfs {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Log("chaos: not root: no file system of its own under the store, so no disk-full fault")
		return nil
	}
	dir := o.DataDir
	o.Stop()
	saved := dir + ".saved"
	if err := os.Rename(dir, saved); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "size="+diskSize+",mode=0700"); err != nil {
		t.Fatalf("mounting a tmpfs under the store: %v", err)
	}
	d := &tmpfs{dir: dir, filler: filepath.Join(dir, "chaos-filler")}
	t.Cleanup(func() {
		// Registered after outpost's own cleanup, so it runs first: stop
		// outpost so that nothing holds the file system open.
		o.Stop()
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmounting the tmpfs under the store: %v", err)
			_ = syscall.Unmount(dir, syscall.MNT_DETACH)
		}
	})
	if out, err := exec.Command("cp", "-a", saved+"/.", dir+"/").CombinedOutput(); err != nil {
		t.Fatalf("copying outpost's data onto the tmpfs: %v: %s", err, out)
	}
	if err := os.RemoveAll(saved); err != nil {
		t.Fatal(err)
	}
	if err := o.Start(t.Context()); err != nil {
		t.Fatalf("starting outpost on the tmpfs: %v", err)
	}
	if _, err := o.WaitState(t.Context(), "online", onlineWithin); err != nil {
		t.Fatal(err)
	}
	return d
}

// fill writes a file until the file system is full and returns its size.
func (d *tmpfs) fill() (int64, error) {
	f, err := os.OpenFile(d.filler, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var n int64
	for _, size := range []int{1 << 20, 4 << 10, 1} {
		buf := make([]byte, size)
		for {
			m, err := f.Write(buf)
			n += int64(m)
			if errors.Is(err, syscall.ENOSPC) {
				break
			}
			if err != nil {
				return n, fmt.Errorf("filling %s: %w", d.dir, err)
			}
		}
	}
	d.full.Store(true)
	return n, nil
}

// free removes what fill wrote.
func (d *tmpfs) free() error {
	d.full.Store(false)
	return os.Remove(d.filler)
}

func (d *tmpfs) isFull() bool { return d.full.Load() }
