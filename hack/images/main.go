// Command images builds OCI image archives of outpost and
// outpost-controller from their static binaries (make images), with the
// project's own code: no container engine is needed to build them. Each
// archive is an OCI image layout, with a Docker manifest.json beside it,
// so that `ctr images import`, `docker load` and `podman load` all take it.
//
// Usage: go run ./hack/images -bin _output/bin -out _output/images -version v1.2.3
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"
)

// image is one program's image.
type image struct {
	name        string // the binary, and the image's name
	description string
	// user runs the program. outpost-controller needs nothing of the host;
	// outpost on a node reads kubelet's client certificate and keeps its
	// cache in /var/lib/outpost, which belong to root.
	user string
	cmd  []string
}

var images = []image{
	{name: "outpost", description: "Outpost node hub: a caching gateway between node components and kube-apiserver", user: "0:0", cmd: []string{"run"}},
	{name: "outpost-controller", description: "Outpost cloud controller: keeps pods of autonomous edge nodes from being evicted", user: "65532:65532", cmd: []string{"run"}},
}

// repository is the name images are tagged with.
const repository = "outposthq/"

func main() {
	bin := flag.String("bin", "_output/bin", "directory of the static binaries")
	out := flag.String("out", "_output/images", "directory for the image archives")
	version := flag.String("version", "v0.0.0-dev", "image tag and org.opencontainers.image.version")
	revision := flag.String("revision", "", "org.opencontainers.image.revision (a commit)")
	created := flag.Int64("created", 0, "creation time, seconds since the epoch (default: $SOURCE_DATE_EPOCH, else 0), so that builds are reproducible")
	flag.Parse()
	when := time.Unix(*created, 0).UTC()
	if *created == 0 {
		if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
			n, err := strconv.ParseInt(s, 10, 64)
			if err != nil {
				fmt.Fprintf(os.Stderr, "images: SOURCE_DATE_EPOCH %q is not a number\n", s)
				os.Exit(2)
			}
			when = time.Unix(n, 0).UTC()
		}
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "images: %v\n", err)
		os.Exit(1)
	}
	for _, im := range images {
		binary, err := os.ReadFile(filepath.Join(*bin, im.name))
		if err != nil {
			fmt.Fprintf(os.Stderr, "images: %v (run make build first)\n", err)
			os.Exit(1)
		}
		path := filepath.Join(*out, im.name+".tar")
		if err := writeArchive(path, im, binary, meta{version: *version, revision: *revision, created: when}); err != nil {
			fmt.Fprintf(os.Stderr, "images: %s: %v\n", im.name, err)
			os.Exit(1)
		}
		fmt.Printf("%s: %s%s:%s\n", path, repository, im.name, *version)
	}
}

type meta struct {
	version, revision string
	created           time.Time
}

// blob is content stored under its digest.
type blob struct {
	mediaType string
	data      []byte
}

func (b blob) digest() string {
	sum := sha256.Sum256(b.data)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func (b blob) descriptor() map[string]any {
	return map[string]any{"mediaType": b.mediaType, "digest": b.digest(), "size": len(b.data)}
}

// Media types of the OCI image specification.
const (
	mediaManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaConfig   = "application/vnd.oci.image.config.v1+json"
	mediaLayer    = "application/vnd.oci.image.layer.v1.tar+gzip"
	mediaIndex    = "application/vnd.oci.image.index.v1+json"
)

// writeArchive writes the image of binary as an OCI layout in a tar file,
// atomically (temp file and rename).
func writeArchive(path string, im image, binary []byte, m meta) error {
	layerTar, err := layerTar(im, binary, m.created)
	if err != nil {
		return err
	}
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestCompression)
	zw.ModTime = m.created
	if _, err := zw.Write(layerTar); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	layer := blob{mediaLayer, gz.Bytes()}
	diffID := sha256.Sum256(layerTar)
	ref := repository + im.name + ":" + m.version
	labels := map[string]string{
		"org.opencontainers.image.title":       im.name,
		"org.opencontainers.image.description": im.description,
		"org.opencontainers.image.version":     m.version,
		"org.opencontainers.image.source":      "https://github.com/outposthq/outpost",
		"org.opencontainers.image.created":     m.created.Format(time.RFC3339),
	}
	if m.revision != "" {
		labels["org.opencontainers.image.revision"] = m.revision
	}
	entry := "/usr/local/bin/" + im.name
	configJSON, err := json.Marshal(map[string]any{
		"created":      m.created.Format(time.RFC3339),
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config": map[string]any{
			"User":       im.user,
			"Entrypoint": []string{entry},
			"Cmd":        im.cmd,
			"Env":        []string{"PATH=/usr/local/bin"},
			"Labels":     labels,
		},
		"rootfs":  map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + hex.EncodeToString(diffID[:])}},
		"history": []map[string]any{{"created": m.created.Format(time.RFC3339), "created_by": "outpost hack/images: " + entry}},
	})
	if err != nil {
		return err
	}
	config := blob{mediaConfig, configJSON}
	manifestJSON, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaManifest,
		"config":        config.descriptor(),
		"layers":        []any{layer.descriptor()},
		"annotations":   labels,
	})
	if err != nil {
		return err
	}
	manifest := blob{mediaManifest, manifestJSON}
	md := manifest.descriptor()
	md["annotations"] = map[string]string{
		"org.opencontainers.image.ref.name": m.version,
		"io.containerd.image.name":          "docker.io/" + ref,
	}
	index, err := json.Marshal(map[string]any{"schemaVersion": 2, "mediaType": mediaIndex, "manifests": []any{md}})
	if err != nil {
		return err
	}
	blobPath := func(b blob) string { return "blobs/sha256/" + b.digest()[len("sha256:"):] }
	// Docker's own archive manifest, which docker load reads.
	dockerManifest, err := json.Marshal([]map[string]any{{"Config": blobPath(config), "RepoTags": []string{ref}, "Layers": []string{blobPath(layer)}}})
	if err != nil {
		return err
	}

	tmp, err := os.CreateTemp(filepath.Dir(path), ".image-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	tw := tar.NewWriter(tmp)
	files := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{blobPath(layer), layer.data},
		{blobPath(config), config.data},
		{blobPath(manifest), manifest.data},
		{"index.json", index},
		{"manifest.json", dockerManifest},
	}
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: m.created}); err != nil {
			return err
		}
	}
	for _, f := range files {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: 0o644, Size: int64(len(f.data)), ModTime: m.created}); err != nil {
			return err
		}
		if _, err := tw.Write(f.data); err != nil {
			return err
		}
	}
	if err := errors.Join(tw.Close(), tmp.Chmod(0o644), tmp.Sync(), tmp.Close()); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// layerTar is the image's one layer: the binary, and the directories a
// program may need (a writable /tmp).
func layerTar(im image, binary []byte, created time.Time) ([]byte, error) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, d := range []struct {
		name string
		mode int64
	}{{"usr/", 0o755}, {"usr/local/", 0o755}, {"usr/local/bin/", 0o755}, {"tmp/", 0o1777}} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d.name, Mode: d.mode, ModTime: created}); err != nil {
			return nil, err
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "usr/local/bin/" + im.name, Mode: 0o755, Size: int64(len(binary)), ModTime: created}); err != nil {
		return nil, err
	}
	if _, err := io.Copy(tw, bytes.NewReader(binary)); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}
