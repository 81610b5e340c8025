// Package plot draws the time curves the long end-to-end runs publish beside
// their reports: a value over the run's time axis (RSS, open files, latency),
// with the run's events on the same axis — an outage as a shaded interval, a
// fault as a vertical line — so a reader sees at a glance whether a curve
// moved with a fault or drifted on its own.
//
// It is a thin layer over gonum.org/v1/plot that fixes the few choices every
// such picture shares: the time axis in seconds or minutes, one colour and
// one legend entry per series and per event label, and several charts of the
// same run stacked one above another in one file.
package plot

import (
	"errors"
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	gplot "gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// Series is one curve: V[i] measured at T[i] from the start of the run.
type Series struct {
	Name string
	T    []time.Duration
	V    []float64
}

// Span is a shaded interval of the time axis, such as an outage. Spans with
// the same Label share a colour and one legend entry.
type Span struct {
	From, To time.Duration
	Label    string
}

// Mark is a vertical line at one instant, such as an injected fault. Marks
// with the same Label share a colour and one legend entry.
type Mark struct {
	At    time.Duration
	Label string
}

// Chart is one plot: curves over time with the run's spans and marks.
type Chart struct {
	Title, YLabel string
	Series        []Series
	Spans         []Span
	Marks         []Mark
}

// The size of one chart; Stack makes the file Height taller per chart.
const (
	Width  = 24 * vg.Centimeter
	Height = 9 * vg.Centimeter
)

// Save writes the chart to path, as PNG or SVG by the extension.
func (c Chart) Save(path string) error {
	return Stack(path, c)
}

// Stack writes the charts one above another into one file, as PNG or SVG by
// the extension of path. The charts share the file's width; their time axes
// are aligned so that the same instant is at the same x in every chart.
func Stack(path string, charts ...Chart) error {
	if len(charts) == 0 {
		return errors.New("plot: no chart to draw")
	}
	format := strings.ToLower(strings.TrimPrefix(filepath.Ext(path), "."))
	if format != "png" && format != "svg" {
		return fmt.Errorf("plot: %s: the extension must be .png or .svg", path)
	}
	// One time unit for the whole file, so stacked axes read alike.
	var end time.Duration
	for _, ch := range charts {
		end = max(end, ch.end())
	}
	unit := unitFor(end)
	plots := make([][]*gplot.Plot, len(charts))
	for i, ch := range charts {
		p, err := ch.plot(unit)
		if err != nil {
			return fmt.Errorf("plot: chart %q: %w", ch.Title, err)
		}
		plots[i] = []*gplot.Plot{p}
	}
	alignX(plots)

	canvas, err := draw.NewFormattedCanvas(Width, Height*vg.Length(len(charts)), format)
	if err != nil {
		return fmt.Errorf("plot: %w", err)
	}
	tiles := draw.Tiles{
		Rows: len(charts), Cols: 1,
		PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2,
		PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 4,
		PadY: vg.Millimeter * 4,
	}
	dc := draw.New(canvas)
	for i, row := range gplot.Align(plots, tiles, dc) {
		plots[i][0].Draw(row[0])
	}

	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("plot: %w", err)
	}
	if _, err := canvas.WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("plot: writing %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("plot: writing %s: %w", path, err)
	}
	return nil
}

// timeUnit is the unit of the x axis: seconds for short runs, minutes for
// long ones, so the tick labels stay short.
type timeUnit struct {
	d    time.Duration
	name string
}

func unitFor(end time.Duration) timeUnit {
	if end > 5*time.Minute {
		return timeUnit{time.Minute, "min"}
	}
	return timeUnit{time.Second, "s"}
}

func (u timeUnit) of(d time.Duration) float64 { return float64(d) / float64(u.d) }

// end is the latest instant the chart mentions.
func (c Chart) end() time.Duration {
	var end time.Duration
	for _, s := range c.Series {
		for _, t := range s.T {
			end = max(end, t)
		}
	}
	for _, s := range c.Spans {
		end = max(end, s.From, s.To)
	}
	for _, m := range c.Marks {
		end = max(end, m.At)
	}
	return end
}

func (c Chart) plot(unit timeUnit) (*gplot.Plot, error) {
	p := gplot.New()
	p.Title.Text = c.Title
	p.X.Label.Text = "time (" + unit.name + ")"
	p.Y.Label.Text = c.YLabel
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.ThumbnailWidth = 0.4 * vg.Centimeter
	p.Add(plotter.NewGrid())

	// Spans first, so curves and marks are drawn over the shading.
	for i, label := range labels(c.Spans, func(s Span) string { return s.Label }) {
		sp := &spans{fill: translucent(plotutil.Color(i+4), 0x40)}
		for _, s := range c.Spans {
			if s.Label == label {
				sp.from = append(sp.from, unit.of(s.From))
				sp.to = append(sp.to, unit.of(s.To))
			}
		}
		p.Add(sp)
		p.Legend.Add(label, sp)
	}
	var y0, y1 float64
	for i, s := range c.Series {
		if len(s.T) != len(s.V) {
			return nil, fmt.Errorf("series %q has %d times and %d values", s.Name, len(s.T), len(s.V))
		}
		xys := make(plotter.XYs, len(s.T))
		for j := range s.T {
			xys[j] = plotter.XY{X: unit.of(s.T[j]), Y: s.V[j]}
			if i == 0 && j == 0 {
				y0, y1 = s.V[j], s.V[j]
			}
			y0, y1 = min(y0, s.V[j]), max(y1, s.V[j])
		}
		line, err := plotter.NewLine(xys)
		if err != nil {
			return nil, fmt.Errorf("series %q: %w", s.Name, err)
		}
		line.Color = plotutil.Color(i)
		line.Width = vg.Points(1.5)
		p.Add(line)
		p.Legend.Add(s.Name, line)
	}
	for i, label := range labels(c.Marks, func(m Mark) string { return m.Label }) {
		mk := &marks{line: draw.LineStyle{
			Color:  plotutil.Color(i + len(c.Series)),
			Width:  vg.Points(1),
			Dashes: []vg.Length{vg.Points(3), vg.Points(2)},
		}}
		for _, m := range c.Marks {
			if m.Label == label {
				mk.at = append(mk.at, unit.of(m.At))
			}
		}
		p.Add(mk)
		p.Legend.Add(label, mk)
	}
	// Start the value axis at zero for non-negative data (a resource curve
	// read from zero shows its growth honestly), and leave headroom above
	// the highest point for the legend.
	if len(c.Series) > 0 {
		if y0 >= 0 {
			p.Y.Min = 0
		}
		p.Y.Max = y1 + (y1-p.Y.Min)*0.25
		if p.Y.Max == p.Y.Min {
			p.Y.Max = p.Y.Min + 1
		}
	}
	p.X.Min = 0
	return p, nil
}

// alignX gives every stacked chart the same time range.
func alignX(plots [][]*gplot.Plot) {
	lo, hi := plots[0][0].X.Min, plots[0][0].X.Max
	for _, row := range plots {
		lo, hi = min(lo, row[0].X.Min), max(hi, row[0].X.Max)
	}
	for _, row := range plots {
		row[0].X.Min, row[0].X.Max = lo, hi
	}
}

// labels returns the distinct labels of items, in order of first use.
func labels[T any](items []T, label func(T) string) []string {
	var out []string
	seen := map[string]bool{}
	for _, it := range items {
		if l := label(it); !seen[l] {
			seen[l] = true
			out = append(out, l)
		}
	}
	return out
}

func translucent(c color.Color, alpha uint8) color.Color {
	r, g, b, _ := c.RGBA()
	// Premultiplied, as color.RGBA requires.
	pre := func(v uint32) uint8 { return uint8((v >> 8) * uint32(alpha) / 0xff) }
	return color.RGBA{R: pre(r), G: pre(g), B: pre(b), A: alpha}
}

// spans draws the intervals of one label as full-height shaded bands.
type spans struct {
	from, to []float64
	fill     color.Color
}

func (s *spans) Plot(c draw.Canvas, p *gplot.Plot) {
	trX, _ := p.Transforms(&c)
	c.SetColor(s.fill)
	for i := range s.from {
		x0, x1 := max(trX(s.from[i]), c.Min.X), min(trX(s.to[i]), c.Max.X)
		if x1 <= x0 {
			// Still visible: an interval shorter than a pixel is a line.
			x1 = x0 + vg.Points(0.5)
		}
		c.Fill(vg.Rectangle{Min: vg.Point{X: x0, Y: c.Min.Y}, Max: vg.Point{X: x1, Y: c.Max.Y}}.Path())
	}
}

// DataRange widens the time axis to the spans and leaves the value axis to
// the curves (+Inf/-Inf do not move a min/max).
func (s *spans) DataRange() (xmin, xmax, ymin, ymax float64) {
	return xrange(append(append([]float64(nil), s.from...), s.to...))
}

func (s *spans) Thumbnail(c *draw.Canvas) {
	c.SetColor(s.fill)
	c.Fill(c.Rectangle.Path())
}

// marks draws the instants of one label as full-height vertical lines.
type marks struct {
	at   []float64
	line draw.LineStyle
}

func (m *marks) Plot(c draw.Canvas, p *gplot.Plot) {
	trX, _ := p.Transforms(&c)
	for _, at := range m.at {
		x := trX(at)
		if x < c.Min.X || x > c.Max.X {
			continue
		}
		c.StrokeLine2(m.line, x, c.Min.Y, x, c.Max.Y)
	}
}

func (m *marks) DataRange() (xmin, xmax, ymin, ymax float64) { return xrange(m.at) }

func (m *marks) Thumbnail(c *draw.Canvas) {
	x := (c.Min.X + c.Max.X) / 2
	c.StrokeLine2(m.line, x, c.Min.Y, x, c.Max.Y)
}

func xrange(xs []float64) (xmin, xmax, ymin, ymax float64) {
	xmin, xmax = posInf, negInf
	for _, x := range xs {
		xmin, xmax = min(xmin, x), max(xmax, x)
	}
	return xmin, xmax, posInf, negInf
}

var posInf, negInf = math.Inf(1), math.Inf(-1)
