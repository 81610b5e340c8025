package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// readArchive returns the files of a tar archive by name.
func readArchive(t *testing.T, data []byte) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[h.Name] = b
		}
	}
}

// TestImageArchive: the archive is a sound OCI image layout (every blob
// under its own digest, the config's diff_id the digest of the uncompressed
// layer, the index naming the image for containerd) with Docker's
// manifest.json beside it, the layer holds the binary executable at the
// entrypoint, the labels say the version and source, the user is as
// declared, and two builds are byte for byte the same.
func TestImageArchive(t *testing.T) {
	dir := t.TempDir()
	binary := []byte("\x7fELF not really, but bytes all the same")
	im := images[1] // outpost-controller
	m := meta{version: "v1.2.3", revision: "abc123", created: time.Unix(1700000000, 0).UTC()}
	path := filepath.Join(dir, "a.tar")
	if err := writeArchive(path, im, binary, m); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(path)
	files := readArchive(t, data)

	for name, b := range files {
		if hexDigest, ok := strings.CutPrefix(name, "blobs/sha256/"); ok {
			if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != hexDigest {
				t.Errorf("blob %s holds content of digest %x", name, sum)
			}
		}
	}
	blobOf := func(digest string) []byte {
		b, ok := files["blobs/sha256/"+strings.TrimPrefix(digest, "sha256:")]
		if !ok {
			t.Fatalf("blob %s missing", digest)
		}
		return b
	}
	if string(files["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout: %s", files["oci-layout"])
	}
	var index struct {
		Manifests []struct {
			MediaType, Digest string
			Annotations       map[string]string
		}
	}
	if err := json.Unmarshal(files["index.json"], &index); err != nil || len(index.Manifests) != 1 {
		t.Fatalf("index.json: %v %s", err, files["index.json"])
	}
	md := index.Manifests[0]
	if md.MediaType != mediaManifest || md.Annotations["io.containerd.image.name"] != "docker.io/outposthq/outpost-controller:v1.2.3" ||
		md.Annotations["org.opencontainers.image.ref.name"] != "v1.2.3" {
		t.Errorf("index manifest: %+v", md)
	}
	var manifest struct {
		Config struct{ MediaType, Digest string }
		Layers []struct{ MediaType, Digest string }
	}
	if err := json.Unmarshal(blobOf(md.Digest), &manifest); err != nil || len(manifest.Layers) != 1 || manifest.Config.MediaType != mediaConfig {
		t.Fatalf("manifest: %v %s", err, blobOf(md.Digest))
	}
	var config struct {
		Architecture, OS string
		Config           struct {
			User       string
			Entrypoint []string
			Labels     map[string]string
		}
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		}
	}
	if err := json.Unmarshal(blobOf(manifest.Config.Digest), &config); err != nil {
		t.Fatal(err)
	}
	if config.OS != "linux" || config.Config.User != "65532:65532" || len(config.Config.Entrypoint) != 1 ||
		config.Config.Entrypoint[0] != "/usr/local/bin/outpost-controller" || config.Config.Labels["org.opencontainers.image.version"] != "v1.2.3" ||
		config.Config.Labels["org.opencontainers.image.revision"] != "abc123" || config.Config.Labels["org.opencontainers.image.source"] == "" {
		t.Errorf("config: %+v", config)
	}
	zr, err := gzip.NewReader(bytes.NewReader(blobOf(manifest.Layers[0].Digest)))
	if err != nil {
		t.Fatal(err)
	}
	layer, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(layer); len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Errorf("diff_ids %v; the layer's digest is %x", config.RootFS.DiffIDs, sum)
	}
	tr := tar.NewReader(bytes.NewReader(layer))
	found := false
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Name == "usr/local/bin/outpost-controller" {
			got, _ := io.ReadAll(tr)
			found = bytes.Equal(got, binary) && h.Mode&0o111 != 0
		}
	}
	if !found {
		t.Error("the layer does not hold the binary, executable, at the entrypoint")
	}
	var docker []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(files["manifest.json"], &docker); err != nil || len(docker) != 1 || docker[0].RepoTags[0] != "outposthq/outpost-controller:v1.2.3" ||
		files[docker[0].Config] == nil || files[docker[0].Layers[0]] == nil {
		t.Errorf("manifest.json: %v %s", err, files["manifest.json"])
	}

	again := filepath.Join(dir, "b.tar")
	if err := writeArchive(again, im, binary, m); err != nil {
		t.Fatal(err)
	}
	if data2, _ := os.ReadFile(again); !bytes.Equal(data, data2) {
		t.Error("two builds of the same binary differ")
	}
}
