package store

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// benchObject is a pod-like object of about 1 KB.
func benchObject(ns string, i int, rv string) Object {
	name := fmt.Sprintf("pod-%06d", i)
	node := fmt.Sprintf("edge-%d", i%8)
	labels := map[string]string{"app": fmt.Sprintf("app-%d", i%50), "tier": "web", "pod-template-hash": "5d8f7c9b6"}
	fields := map[string]string{"metadata.name": name, "metadata.namespace": ns, "spec.nodeName": node, "status.phase": "Running"}
	data := fmt.Sprintf(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":%q,"namespace":%q,"resourceVersion":%q,"labels":{"app":%q,"tier":"web","pod-template-hash":"5d8f7c9b6"}},"spec":{"nodeName":%q,"containers":[{"name":"main","image":"registry.example.com/team/app:v1.2.3","resources":{"requests":{"cpu":"100m","memory":"128Mi"}}}]},"status":{"phase":"Running","podIP":"10.1.%d.%d"},"pad":%q}`,
		name, ns, rv, labels["app"], node, i/250%250, i%250, strings.Repeat("x", 560))
	return Object{Namespace: ns, Name: name, ResourceVersion: rv, Labels: labels, Fields: fields, Data: []byte(data)}
}

func benchOpen(b *testing.B, sync bool) *Store {
	b.Helper()
	s, err := Open(filepath.Join(b.TempDir(), "store.db"), Options{NoSync: !sync})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	return s
}

func benchObjects(n int, rv int) []Object {
	objs := make([]Object, n)
	for i := range objs {
		objs[i] = benchObject(fmt.Sprintf("ns-%d", i%20), i, strconv.Itoa(rv))
	}
	slices.SortFunc(objs, func(a, b Object) int {
		return strings.Compare(MemberKey(a.Namespace, a.Name), MemberKey(b.Namespace, b.Name))
	})
	return objs
}

// BenchmarkReplaceView100k persists a list of 100,000 objects of about 1 KB
// with fsync: into an empty store (also with a protobuf encoding of about
// 600 bytes each, as a protobuf client's list is stored), over a list
// whose every object changed, and over an unchanged one.
func BenchmarkReplaceView100k(b *testing.B) {
	const n = 100_000
	k := key("node", "", "", "")
	gens := [][]Object{benchObjects(n, 1)}
	withProto := slices.Clone(gens[0])
	for i := range withProto {
		withProto[i].Proto = bytes.Repeat([]byte{0x0a}, len(withProto[i].Data)*6/10)
	}
	for name, objs := range map[string][]Object{"new": gens[0], "new-with-protobuf": withProto} {
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				s := benchOpen(b, true)
				b.StartTimer()
				if err := s.ReplaceView(View{Key: k, ResourceVersion: "1"}, objs); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "objects/s")
		})
	}
	b.Run("changed", func(b *testing.B) {
		s := benchOpen(b, true)
		if err := s.ReplaceView(View{Key: k}, gens[0]); err != nil {
			b.Fatal(err)
		}
		rv := 2
		for b.Loop() {
			b.StopTimer()
			objs := benchObjects(n, rv)
			rv++
			b.StartTimer()
			if err := s.ReplaceView(View{Key: k}, objs); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "objects/s")
	})
	b.Run("unchanged", func(b *testing.B) {
		s := benchOpen(b, true)
		if err := s.ReplaceView(View{Key: k}, gens[0]); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if err := s.ReplaceView(View{Key: k}, gens[0]); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "objects/s")
	})
}

// BenchmarkApplyEvents applies MODIFIED events in batches of 500, with
// fsync, to a store holding 10,000 pods in an unfiltered view, a view per
// node (field selector) and a label-selected view, as several node
// components would have recorded them. In "status" the events change what
// status updates change, in "moving" each event also moves its pod to
// another node and app, so that the selected views take it in and let it
// go.
func BenchmarkApplyEvents(b *testing.B) {
	const n, batch = 10_000, 500
	all := key("node", "", "", "")
	for _, moving := range []bool{false, true} {
		b.Run(map[bool]string{false: "status", true: "moving"}[moving], func(b *testing.B) {
			s := benchOpen(b, true)
			objs := benchObjects(n, 1)
			if err := s.ReplaceView(View{Key: all, ResourceVersion: "1"}, objs); err != nil {
				b.Fatal(err)
			}
			for node := range 8 {
				name := "edge-" + strconv.Itoa(node)
				var members []Object
				for _, o := range objs {
					if o.Fields["spec.nodeName"] == name {
						members = append(members, o)
					}
				}
				k := key("system:node:"+name, "", "", "spec.nodeName="+name)
				if err := s.ReplaceView(View{Key: k, ResourceVersion: "1"}, members); err != nil {
					b.Fatal(err)
				}
			}
			if err := s.ReplaceView(View{Key: key("kube-proxy", "", "app=app-7", ""), ResourceVersion: "1"}, nil); err != nil {
				b.Fatal(err)
			}
			// Each object's second state: on the next node, in the next app.
			moved := make([]Object, n)
			for i, o := range objs {
				o.Labels = maps.Clone(o.Labels)
				o.Fields = maps.Clone(o.Fields)
				if moving {
					o.Labels["app"] = fmt.Sprintf("app-%d", (i+1)%50)
					o.Fields["spec.nodeName"] = fmt.Sprintf("edge-%d", (i+1)%8)
				}
				o.Data = bytes.Replace(o.Data, []byte(`"Running"`), []byte(`"Succeeded"`), 1)
				moved[i] = o
			}
			flipped := make([]bool, n)
			events := make([]Event, batch)
			rv := 2
			b.ResetTimer()
			for done := 0; done < b.N; done += batch {
				events := events[:min(batch, b.N-done)]
				for j := range events {
					i := (done + j) * 7919 % n
					o := objs[i]
					if flipped[i] = !flipped[i]; flipped[i] {
						o = moved[i]
					}
					o.ResourceVersion = strconv.Itoa(rv)
					rv++
					events[j] = Event{Type: Modified, View: all, Object: o}
				}
				if err := s.Apply(events); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
			b.StopTimer()
			checkInvariants(b, s)
		})
	}
}

// BenchmarkList10k serves a 10,000-object view, whole and in pages of 500.
func BenchmarkList10k(b *testing.B) {
	const n = 10_000
	s := benchOpen(b, false)
	k := key("node", "", "", "")
	if err := s.ReplaceView(View{Key: k}, benchObjects(n, 1)); err != nil {
		b.Fatal(err)
	}
	b.Run("all", func(b *testing.B) {
		for b.Loop() {
			got := 0
			if err := s.List(k, "", 0, func(Object) error { got++; return nil }); err != nil || got != n {
				b.Fatal(got, err)
			}
		}
		b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "objects/s")
	})
	b.Run("pages500", func(b *testing.B) {
		for b.Loop() {
			after, got := "", 0
			for {
				page := 0
				err := s.List(k, after, 500, func(o Object) error {
					after = MemberKey(o.Namespace, o.Name)
					page++
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
				if got += page; page < 500 {
					break
				}
			}
			if got != n {
				b.Fatal(got)
			}
		}
		b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "objects/s")
	})
}

// BenchmarkDecodeObject compares the record format with encoding/json of
// the same Object, the obvious alternative.
func BenchmarkDecodeObject(b *testing.B) {
	o := benchObject("ns", 1, "12345")
	rec, _ := appendObject(nil, 1, &o, nil)
	js, _ := json.Marshal(o)
	b.Run("record", func(b *testing.B) {
		for b.Loop() {
			var got Object
			if _, err := decodeObject(rec, &got); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("json", func(b *testing.B) {
		for b.Loop() {
			var got Object
			if err := json.Unmarshal(js, &got); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkOpen100k opens a store of 100,000 objects, as outpost does at
// start-up, and reads one view's metadata.
func BenchmarkOpen100k(b *testing.B) {
	path := filepath.Join(b.TempDir(), "store.db")
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	k := key("node", "", "", "")
	if err := s.ReplaceView(View{Key: k, ResourceVersion: "1"}, benchObjects(100_000, 1)); err != nil {
		b.Fatal(err)
	}
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		s, err := Open(path, Options{})
		if err != nil {
			b.Fatal(err)
		}
		if _, ok, err := s.View(k); !ok || err != nil {
			b.Fatal(ok, err)
		}
		if err := s.Close(); err != nil {
			b.Fatal(err)
		}
	}
}
