package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestImagesRunInContainerd imports both archives into a private
// containerd with `ctr images import`, as a node would, and runs each
// program from its image with runc. It needs root and Debian's containerd,
// runc and ctr (hack/install-node-deps.sh, which CI runs): elsewhere it is
// skipped, and under CI=true their absence fails it.
func TestImagesRunInContainerd(t *testing.T) {
	missing := ""
	for _, bin := range []string{"containerd", "ctr", "runc"} {
		if _, err := exec.LookPath(bin); err != nil {
			missing += " " + bin
		}
	}
	if os.Geteuid() != 0 {
		missing += " root"
	}
	if missing != "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI must run this test; missing:%s (hack/install-node-deps.sh installs them)", missing)
		}
		t.Skipf("needs%s", missing)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()

	// The real binaries, static as make build makes them.
	dir := t.TempDir()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	for _, im := range images {
		cmd := exec.CommandContext(ctx, "go", "build", "-ldflags", "-X github.com/outposthq/outpost/internal/version.Version=v9.9.9-image-test",
			"-o", filepath.Join(dir, im.name), "./cmd/"+im.name)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", im.name, err, out)
		}
	}
	m := meta{version: "v9.9.9-image-test", created: time.Unix(1700000000, 0).UTC()}

	// A containerd of the test's own, stopped and removed at the end.
	state, err := os.MkdirTemp("", "outpost-images-")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(state, "c.sock")
	cd := exec.Command("containerd", "--root", filepath.Join(state, "root"), "--state", filepath.Join(state, "state"), "--address", sock)
	cd.Stdout, cd.Stderr = t.Output(), t.Output()
	if err := cd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cd.Process.Kill()
			<-done
		}
		_ = exec.Command("umount", "-R", filepath.Join(state, "root")).Run()
		_ = os.RemoveAll(state)
	})
	ctr := func(args ...string) (string, error) {
		out, err := exec.CommandContext(ctx, "ctr", append([]string{"--address", sock}, args...)...).CombinedOutput()
		return string(out), err
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := ctr("version"); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("containerd did not answer: %v", err)
		}
	}

	for _, im := range images {
		binary, err := os.ReadFile(filepath.Join(dir, im.name))
		if err != nil {
			t.Fatal(err)
		}
		archive := filepath.Join(dir, im.name+".tar")
		if err := writeArchive(archive, im, binary, m); err != nil {
			t.Fatal(err)
		}
		if out, err := ctr("images", "import", archive); err != nil {
			t.Fatalf("ctr images import %s: %v\n%s", im.name, err, out)
		}
		ref := "docker.io/" + repository + im.name + ":" + m.version
		if out, err := ctr("images", "ls", "-q"); err != nil || !strings.Contains(out, ref) {
			t.Fatalf("%s not among the imported images: %v\n%s", ref, err, out)
		}
		out, err := ctr("run", "--rm", ref, "image-test-"+im.name, "/usr/local/bin/"+im.name, "version")
		if err != nil || strings.TrimSpace(out) != im.name+" "+m.version {
			t.Errorf("%s version, run from its image: %v\n%s", im.name, err, out)
		}
	}
}
