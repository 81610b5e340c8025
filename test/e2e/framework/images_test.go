package framework

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"testing"
)

// TestOCIArchive checks the layout that `ctr images import` reads: an index
// naming the image, and blobs whose names are their digests, from the
// manifest down to a layer holding the binary.
func TestOCIArchive(t *testing.T) {
	binary := []byte("#!not really an ELF")
	data, err := ociArchive("outpost.test/web:1", "/webserver", binary)
	if err != nil {
		t.Fatal(err)
	}
	files := untar(t, data)
	if got := string(files["oci-layout"]); got != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout = %s", got)
	}
	for name, content := range files {
		if hexSum, ok := bytes.CutPrefix([]byte(name), []byte("blobs/sha256/")); ok && len(hexSum) > 0 {
			sum := sha256.Sum256(content)
			if hex.EncodeToString(sum[:]) != string(hexSum) {
				t.Errorf("blob %s has digest %x", name, sum)
			}
		}
	}

	var index struct {
		Manifests []ociDescriptor `json:"manifests"`
	}
	mustUnmarshal(t, files["index.json"], &index)
	if len(index.Manifests) != 1 {
		t.Fatalf("index has %d manifests, want 1", len(index.Manifests))
	}
	m := index.Manifests[0]
	if m.Annotations[annotationImageName] != "outpost.test/web:1" || m.Annotations[annotationRefName] != "1" {
		t.Errorf("manifest annotations = %v", m.Annotations)
	}
	var manifest struct {
		Config ociDescriptor   `json:"config"`
		Layers []ociDescriptor `json:"layers"`
	}
	mustUnmarshal(t, blob(t, files, m), &manifest)
	var config struct {
		Config struct{ Entrypoint []string }
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	mustUnmarshal(t, blob(t, files, manifest.Config), &config)
	if len(config.Config.Entrypoint) != 1 || config.Config.Entrypoint[0] != "/webserver" {
		t.Errorf("entrypoint = %v", config.Config.Entrypoint)
	}
	if len(manifest.Layers) != 1 || len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != manifest.Layers[0].Digest {
		t.Fatalf("layers %v, diff IDs %v: want one uncompressed layer", manifest.Layers, config.RootFS.DiffIDs)
	}
	layer := untar(t, blob(t, files, manifest.Layers[0]))
	if !bytes.Equal(layer["webserver"], binary) {
		t.Errorf("layer holds %q at webserver, want the binary", layer["webserver"])
	}

	again, err := ociArchive("outpost.test/web:1", "/webserver", binary)
	if err != nil || !bytes.Equal(again, data) {
		t.Errorf("packing the same binary twice gives different archives (err %v)", err)
	}
}

func untar(t *testing.T, data []byte) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		content, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[hdr.Name] = content
	}
}

func blob(t *testing.T, files map[string][]byte, d ociDescriptor) []byte {
	t.Helper()
	data, ok := files["blobs/sha256/"+d.Digest[len("sha256:"):]]
	if !ok || len(data) != d.Size {
		t.Fatalf("blob %s: present %v, size %d, want %d", d.Digest, ok, len(data), d.Size)
	}
	return data
}

func mustUnmarshal(t *testing.T, data []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(data, v); err != nil {
		t.Fatalf("decoding %s: %v", data, err)
	}
}
