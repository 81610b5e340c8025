package plot

import (
	"encoding/xml"
	"errors"
	"image"
	"image/color"
	"image/png"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// run is a chart like the chaos soak draws: a growing curve, two outages and
// a few faults.
func run() Chart {
	var rss, fds Series
	rss.Name, fds.Name = "rss", "fds"
	for i := range 120 {
		t := time.Duration(i) * 5 * time.Second
		rss.T, rss.V = append(rss.T, t), append(rss.V, 40+float64(i%17))
		fds.T, fds.V = append(fds.T, t), append(fds.V, 20+float64(i%5))
	}
	return Chart{
		Title: "outpost", YLabel: "MiB / count",
		Series: []Series{rss, fds},
		Spans: []Span{
			{From: 60 * time.Second, To: 90 * time.Second, Label: "offline"},
			{From: 300 * time.Second, To: 420 * time.Second, Label: "offline"},
		},
		Marks: []Mark{
			{At: 60 * time.Second, Label: "black-hole"},
			{At: 200 * time.Second, Label: "kill -9"},
			{At: 300 * time.Second, Label: "black-hole"},
		},
	}
}

func TestSavePNG(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run.png")
	if err := run().Save(path); err != nil {
		t.Fatal(err)
	}
	img := decodePNG(t, path)
	b := img.Bounds()
	if b.Dx() < 400 || b.Dy() < 100 {
		t.Fatalf("image is %dx%d, want a chart-sized image", b.Dx(), b.Dy())
	}
	// A blank or nearly blank image has a handful of colours; curves,
	// shading, dashes and anti-aliased text give hundreds.
	if n := colours(img); n < 50 {
		t.Errorf("image has %d distinct colours; nothing was drawn", n)
	}
}

func TestSaveSVG(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run.svg")
	if err := run().Save(path); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) < 5_000 {
		t.Errorf("SVG is %d bytes; want a drawn chart", len(data))
	}
	root, paths := "", 0
	dec := xml.NewDecoder(strings.NewReader(string(data)))
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok {
			if root == "" {
				root = se.Name.Local
			}
			if se.Name.Local == "path" {
				paths++
			}
		}
	}
	if root != "svg" {
		t.Errorf("root element is %q, want svg", root)
	}
	// 2 curves, 2 spans, 3 marks, a grid, axes and legend thumbnails.
	if paths < 10 {
		t.Errorf("SVG has %d paths; the chart is not all there", paths)
	}
}

func TestStack(t *testing.T) {
	dir := t.TempDir()
	one, two := filepath.Join(dir, "one.png"), filepath.Join(dir, "two.png")
	if err := Stack(one, run()); err != nil {
		t.Fatal(err)
	}
	second := run()
	second.Title = "second"
	second.Series = second.Series[:1]
	if err := Stack(two, run(), second); err != nil {
		t.Fatal(err)
	}
	h1, h2 := decodePNG(t, one).Bounds().Dy(), decodePNG(t, two).Bounds().Dy()
	if h2 != 2*h1 {
		t.Errorf("two stacked charts are %d px high, one is %d; want twice", h2, h1)
	}
}

func TestErrors(t *testing.T) {
	dir := t.TempDir()
	bad := run()
	bad.Series[0].V = bad.Series[0].V[1:]
	for name, err := range map[string]error{
		"extension":    run().Save(filepath.Join(dir, "run.gif")),
		"no chart":     Stack(filepath.Join(dir, "none.png")),
		"lengths":      bad.Save(filepath.Join(dir, "bad.png")),
		"missing dir":  run().Save(filepath.Join(dir, "no", "such", "dir.png")),
		"empty series": Chart{Title: "empty"}.Save(filepath.Join(dir, "empty.png")),
	} {
		wantErr := name != "empty series"
		if (err != nil) != wantErr {
			t.Errorf("%s: err = %v, want error %v", name, err, wantErr)
		}
	}
}

func decodePNG(t *testing.T, path string) image.Image {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("%s is not a PNG: %v", path, err)
	}
	return img
}

func colours(img image.Image) int {
	seen := map[color.RGBA]bool{}
	b := img.Bounds()
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			r, g, bl, a := img.At(x, y).RGBA()
			seen[color.RGBA{uint8(r >> 8), uint8(g >> 8), uint8(bl >> 8), uint8(a >> 8)}] = true
		}
	}
	return len(seen)
}
