package framework

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"
)

// The images StartNode imports into every node's containerd. No registry is
// reachable from the test machine, so both are built from testdata and pods
// must use imagePullPolicy: Never.
const (
	// WebImage runs testdata/webserver: an HTTP server on -addr (default
	// ":$PORT", $PORT defaulting to 8080) answering /healthz, and
	// /file?path=P with the content of file P in the container, so tests
	// read what kubelet mounted.
	WebImage = "outpost.test/web:1"
	// PauseImage is the pod sandbox image, testdata/pause under the name
	// containerd's sandbox_image setting expects.
	PauseImage = "registry.k8s.io/pause:3.10"
)

// WebBinary is the path of the webserver inside WebImage, for pod commands.
const WebBinary = "/webserver"

// CoreDNSImage runs CoreDNS, the binary hack/k8s.sh builds into
// _output/k8s/coredns, at CoreDNSBinary. StartNode does not import it;
// DeployCoreDNS imports it into the node that runs it.
const (
	CoreDNSImage  = "outpost.test/coredns:1"
	CoreDNSBinary = "/coredns"
)

// testImage is an image made of one static binary built from testdata.
type testImage struct {
	ref    string // image reference, as kubelet asks for it
	source string // directory under testdata with package main
	binary string // absolute path of the binary in the image; the entrypoint
}

var testImages = []testImage{
	{ref: WebImage, source: "webserver", binary: WebBinary},
	{ref: PauseImage, source: "pause", binary: "/pause"},
}

// imagesMu serialises image builds: several nodes starting at once share
// one control plane's image directory.
var imagesMu sync.Mutex

// imageArchives builds each test image as an OCI archive in Dir/images,
// once per control plane, and returns their paths. The Go build cache makes
// a rebuild for a second control plane cost only the link.
func (c *ControlPlane) imageArchives(ctx context.Context) ([]string, error) {
	imagesMu.Lock()
	defer imagesMu.Unlock()
	dir := filepath.Join(c.Dir, "images")
	archives := make([]string, len(testImages))
	missing := false
	for i, img := range testImages {
		archives[i] = filepath.Join(dir, img.source+".oci.tar")
		if _, err := os.Stat(archives[i]); err != nil {
			missing = true
		}
	}
	if !missing {
		return archives, nil
	}
	if err := buildBinaries(ctx, dir); err != nil {
		return nil, err
	}
	for i, img := range testImages {
		data, err := os.ReadFile(filepath.Join(dir, img.source))
		if err != nil {
			return nil, fmt.Errorf("building image %s: %w", img.ref, err)
		}
		tarball, err := ociArchive(img.ref, img.binary, data)
		if err != nil {
			return nil, fmt.Errorf("packing image %s: %w", img.ref, err)
		}
		if err := writeFileAtomic(archives[i], tarball, 0o644); err != nil {
			return nil, err
		}
	}
	return archives, nil
}

// buildBinaries compiles the sources of all test images into dir, in one
// go build so that they link in parallel, as static binaries: the images
// hold no libc.
func buildBinaries(ctx context.Context, dir string) error {
	root, err := RepoRoot()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("building test images: %w", err)
	}
	args := []string{"build", "-trimpath", "-ldflags=-s -w", "-o", dir + string(filepath.Separator)}
	for _, img := range testImages {
		args = append(args, "./"+filepath.ToSlash(filepath.Join("test", "e2e", "framework", "testdata", img.source)))
	}
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	// For the machine's own architecture, which its containerd runs.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building test images: go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// OCI media types and annotations used by ociArchive
// (https://github.com/opencontainers/image-spec).
const (
	mediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
	mediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	mediaTypeLayer    = "application/vnd.oci.image.layer.v1.tar"
	// annotationRefName is the OCI tag of a manifest in an index;
	// annotationImageName is containerd's full image name, which `ctr
	// images import` uses as is (an OCI ref name alone gets an
	// "import-DATE" prefix unless --base-name is given).
	annotationRefName   = "org.opencontainers.image.ref.name"
	annotationImageName = "io.containerd.image.name"
)

type ociDescriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int               `json:"size"`
	Platform    *ociPlatform      `json:"platform,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type ociPlatform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

// ociArchive returns an OCI image layout, as a tar stream, holding one image
// named ref: one uncompressed layer with binary at path (and the few
// directories a container expects), run as the entrypoint.
func ociArchive(ref, path string, binary []byte) ([]byte, error) {
	return ociArchiveFiles(ref, path, []string{"PATH=/"}, []layerFile{{path: path, mode: 0o755, data: binary}})
}

// ociArchiveFiles is ociArchive for an image of several files: its layer
// holds content, its entrypoint is entrypoint (one of them) and its
// environment env.
func ociArchiveFiles(ref, entrypoint string, env []string, content []layerFile) ([]byte, error) {
	layer, err := layerTar(content)
	if err != nil {
		return nil, err
	}
	type file struct {
		name string
		data []byte
	}
	var blobs []file
	add := func(mediaType string, data []byte) ociDescriptor {
		sum := sha256.Sum256(data)
		hexSum := hex.EncodeToString(sum[:])
		blobs = append(blobs, file{"blobs/sha256/" + hexSum, data})
		return ociDescriptor{MediaType: mediaType, Digest: "sha256:" + hexSum, Size: len(data)}
	}
	layerDesc := add(mediaTypeLayer, layer)

	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config": map[string]any{
			"Entrypoint": []string{entrypoint},
			"Env":        env,
		},
		// The layer is uncompressed, so its diff ID is its digest.
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{layerDesc.Digest}},
	})
	if err != nil {
		return nil, err
	}
	configDesc := add(mediaTypeConfig, config)

	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaTypeManifest,
		"config":        configDesc,
		"layers":        []ociDescriptor{layerDesc},
	})
	if err != nil {
		return nil, err
	}
	manifestDesc := add(mediaTypeManifest, manifest)
	manifestDesc.Platform = &ociPlatform{Architecture: runtime.GOARCH, OS: "linux"}
	tag := ref[strings.LastIndex(ref, ":")+1:]
	manifestDesc.Annotations = map[string]string{annotationImageName: ref, annotationRefName: tag}

	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaTypeIndex,
		"manifests":     []ociDescriptor{manifestDesc},
	})
	if err != nil {
		return nil, err
	}

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	files := append([]file{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
	}, blobs...)
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: imageTime}); err != nil {
			return nil, err
		}
	}
	for _, f := range files {
		if err := writeTarFile(tw, f.name, 0o644, f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// imageTime is the fixed mtime of every file in a test image, so that the
// same binary always gives the same digests.
var imageTime = time.Unix(0, 0)

// A layerFile is a regular file of an image layer.
type layerFile struct {
	path string // absolute path in the image
	mode int64  // permission bits
	data []byte // content
}

// layerTar returns a layer holding files, each after the directories on
// its path, plus /etc and /tmp, which runtimes and programs expect to exist.
// Files come in the order given, so the same files always give the same
// layer.
func layerTar(files []layerFile) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	addDir := func(name string, mode int64) error {
		dirs[name] = true
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: imageTime})
	}
	for _, d := range []struct {
		name string
		mode int64
	}{{"etc/", 0o755}, {"tmp/", 0o1777}} {
		if err := addDir(d.name, d.mode); err != nil {
			return nil, err
		}
	}
	for _, f := range files {
		name := strings.TrimPrefix(filepath.ToSlash(filepath.Clean(f.path)), "/")
		// Every directory on the way, outermost first: "usr/", "usr/sbin/".
		for i, c := range name {
			if c != '/' || dirs[name[:i+1]] {
				continue
			}
			if err := addDir(name[:i+1], 0o755); err != nil {
				return nil, err
			}
		}
		if err := writeTarFile(tw, name, f.mode, f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func writeTarFile(tw *tar.Writer, name string, mode int64, data []byte) error {
	hdr := &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: imageTime}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	_, err := tw.Write(data)
	return err
}

// importImages imports the test images into the node's containerd, in the
// k8s.io namespace that its CRI plugin serves kubelet from, unpacked for
// the CRI's snapshotter (overlayfs, ctr's default too).
func (n *Node) importImages(ctx context.Context, archives []string) error {
	refs := make([]string, len(testImages))
	for i, img := range testImages {
		refs[i] = img.ref
	}
	return n.importArchives(ctx, archives, refs)
}

// importArchives imports archives into the node's containerd and checks
// that it then has every image of refs.
func (n *Node) importArchives(ctx context.Context, archives, refs []string) error {
	for _, archive := range archives {
		if _, err := n.ctr(ctx, "images", "import", archive); err != nil {
			return fmt.Errorf("importing %s: %w", filepath.Base(archive), err)
		}
	}
	out, err := n.ctr(ctx, "images", "ls", "-q")
	if err != nil {
		return fmt.Errorf("listing imported images: %w", err)
	}
	have := strings.Fields(string(out))
	for _, ref := range refs {
		if !slices.Contains(have, ref) {
			return fmt.Errorf("importing images: %s missing after import; containerd has %v", ref, have)
		}
	}
	return nil
}

// prebuiltImageArchive packs binary name of _output/k8s (see Binary) as
// image ref, with the binary at path as its entrypoint, into an OCI archive
// in Dir/images, once per control plane, and returns the archive's path.
func (c *ControlPlane) prebuiltImageArchive(ref, name, path string) (string, error) {
	imagesMu.Lock()
	defer imagesMu.Unlock()
	archive := filepath.Join(c.Dir, "images", name+".oci.tar")
	if _, err := os.Stat(archive); err == nil {
		return archive, nil
	}
	bin, err := Binary(name)
	if err != nil {
		return "", fmt.Errorf("packing image %s: %w", ref, err)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return "", fmt.Errorf("packing image %s: %w", ref, err)
	}
	tarball, err := ociArchive(ref, path, data)
	if err != nil {
		return "", fmt.Errorf("packing image %s: %w", ref, err)
	}
	if err := os.MkdirAll(filepath.Dir(archive), 0o755); err != nil {
		return "", err
	}
	if err := writeFileAtomic(archive, tarball, 0o644); err != nil {
		return "", err
	}
	return archive, nil
}

// ImportCoreDNSImage imports CoreDNSImage into the node's containerd.
func (n *Node) ImportCoreDNSImage(ctx context.Context) error {
	archive, err := n.cp.prebuiltImageArchive(CoreDNSImage, "coredns", CoreDNSBinary)
	if err != nil {
		return err
	}
	ctx, cancel := n.cp.withStop(ctx)
	defer cancel()
	if err := n.importArchives(ctx, []string{archive}, []string{CoreDNSImage}); err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	return nil
}

// hostLayerFiles reads files of the host (absolute paths), to be packed at
// the same paths in an image: each one's content, symbolic links followed,
// and permission bits.
func hostLayerFiles(paths ...string) ([]layerFile, error) {
	files := make([]layerFile, 0, len(paths))
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			return nil, err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		files = append(files, layerFile{path: p, mode: int64(fi.Mode().Perm()), data: data})
	}
	return files, nil
}

// sharedLibraries returns what the dynamically linked host program needs to
// run in an image: the shared libraries ldd lists for it and the dynamic
// loader, at the paths ldd gives, in ldd's order. The vDSO, which the kernel
// provides, has no path and is left out.
func sharedLibraries(ctx context.Context, program string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", program).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w: %s", program, err, bytes.TrimSpace(out))
	}
	var libs []string
	for line := range strings.Lines(string(out)) {
		// "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)",
		// "/lib64/ld-linux-x86-64.so.2 (0x...)" or "linux-vdso.so.1 (0x...)".
		line = strings.TrimSpace(line)
		if _, target, ok := strings.Cut(line, "=>"); ok {
			line = strings.TrimSpace(target)
		}
		if strings.HasPrefix(line, "not found") {
			return nil, fmt.Errorf("ldd %s: a library is not found:\n%s", program, out)
		}
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "/") && !slices.Contains(libs, f[0]) {
			libs = append(libs, f[0])
		}
	}
	if len(libs) == 0 {
		return nil, fmt.Errorf("ldd %s lists no shared library: %s", program, bytes.TrimSpace(out))
	}
	return libs, nil
}
