package framework

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// modulePath identifies the product go.mod, as opposed to the tool modules
// under hack/tools that have their own go.mod.
const modulePath = "github.com/outposthq/outpost"

// RepoRoot returns the directory of the product go.mod, searched from the
// working directory upwards. `go test` runs each package in its own
// directory, so this finds the repository from any test package.
func RepoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("finding repository root: %w", err)
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		if isProductModule(filepath.Join(dir, "go.mod")) {
			return dir, nil
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("finding repository root: no go.mod of module %s above %s", modulePath, wd)
		}
	}
}

func isProductModule(goMod string) bool {
	f, err := os.Open(goMod)
	if err != nil {
		return false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if mod, ok := strings.CutPrefix(strings.TrimSpace(s.Text()), "module "); ok {
			return strings.Trim(strings.TrimSpace(mod), `"`) == modulePath
		}
	}
	return false
}

// Binary returns the absolute path of a pinned Kubernetes binary in
// _output/k8s (etcd, kube-apiserver, kubectl, kwok, ...). A missing binary is
// an error that says how to build it, never a reason to skip.
func Binary(name string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	path := filepath.Join(root, "_output", "k8s", name)
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "", fmt.Errorf("%s not found at %s: run make k8s (hack/k8s.sh) to build it", name, path)
	case err != nil:
		return "", fmt.Errorf("finding %s: %w", name, err)
	case fi.IsDir() || fi.Mode().Perm()&0o111 == 0:
		return "", fmt.Errorf("%s at %s is not an executable file: run make k8s (hack/k8s.sh) to rebuild it", name, path)
	}
	return path, nil
}
