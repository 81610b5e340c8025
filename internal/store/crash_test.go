package store

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// crashChildEnv, when set to a store path, makes TestCrash the writer that
// the parent kills.
const crashChildEnv = "OUTPOST_STORE_CRASH_CHILD"

const crashObjects = 10_000

var (
	crashMain = ViewKey{Identity: "node", Resource: pods}
	crashEven = ViewKey{Identity: "proxy", Resource: pods, LabelSelector: "parity=even"}
)

// crashObject is object i of generation gen (0 or 1). Generation g holds
// objects g*5000 to g*5000+9999, so a new generation changes half the
// membership and rewrites the other half.
func crashObject(gen, i, rv int) Object {
	n := gen*crashObjects/2 + i
	name := fmt.Sprintf("obj-%05d", n)
	parity := []string{"even", "odd"}[n%2]
	o := Object{
		Namespace:       "ns",
		Name:            name,
		ResourceVersion: strconv.Itoa(rv),
		Labels:          map[string]string{"gen": strconv.Itoa(gen), "parity": parity},
		Fields:          map[string]string{"metadata.name": name, "metadata.namespace": "ns"},
	}
	o.Data = []byte(`{"metadata":{"name":"` + name + `","namespace":"ns","resourceVersion":"` + o.ResourceVersion +
		`"},"gen":` + strconv.Itoa(gen) + `,"pad":"` + crashPad[n%len(crashPad)] + `"}`)
	return o
}

var crashPad = func() (pads [26]string) {
	for i := range pads {
		pads[i] = strings.Repeat(string(rune('a'+i)), 700)
	}
	return pads
}()

// TestCrash kills a process writing the store at random moments and checks
// that each time the store opens with every view whole: the main view is
// exactly one generation of 10,000 objects, never a mix.
func TestCrash(t *testing.T) {
	if path := os.Getenv(crashChildEnv); path != "" {
		crashChild(t, path)
		return
	}
	if testing.Short() {
		t.Skip("kills child processes for about 20 s")
	}
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	objs := make([]Object, crashObjects)
	for i := range objs {
		objs[i] = crashObject(0, i, 1)
	}
	if err := s.ReplaceView(View{Key: crashMain, ResourceVersion: "1"}, objs); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	const runs = 20
	lastRV, lastGen, flips := "1", 0, 0
	deadline := time.Now().Add(50 * time.Second)
	// The kill comes within maxDelay of the writer's start. On a loaded
	// machine the writer may commit nothing that soon: after such a run
	// the window doubles, so that kills still land between commits.
	maxDelay := 500 * time.Millisecond
	for run := 0; run < runs && time.Now().Before(deadline); run++ {
		// The writer says "ready" once it has opened the store; the kill
		// comes at a random moment after that.
		var out lockedBuffer // the child's stderr and stdout, written from two goroutines
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrash$", "-test.count=1")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
		cmd.Stderr = &out
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		ready := make(chan bool, 1)
		go func() {
			line, _ := bufio.NewReader(stdout).ReadString('\n')
			ready <- line == "ready\n"
			_, _ = io.Copy(&out, stdout)
		}()
		select {
		case ok := <-ready:
			if !ok {
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
				t.Fatalf("run %d: the writer did not start:\n%s", run, out.String())
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("run %d: the writer did not start in 20 s", run)
		}
		time.Sleep(50*time.Millisecond + rand.N(maxDelay-50*time.Millisecond))
		if err := cmd.Process.Kill(); err != nil {
			t.Fatalf("run %d: killing the writer: %v\n%s", run, err, out.String())
		}
		if err := cmd.Wait(); err == nil || cmd.ProcessState.Exited() {
			t.Fatalf("run %d: the writer stopped by itself: %v\n%s", run, err, out.String())
		}

		s, err := Open(path, Options{})
		if err != nil {
			t.Fatalf("run %d: %v", run, err)
		}
		gen, rv := checkCrashed(t, s, run)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if gen != lastGen {
			flips++
		}
		t.Logf("run %d: generation %d at resourceVersion %s (kill within %s)", run, gen, rv, maxDelay)
		if rv == lastRV {
			maxDelay = min(2*maxDelay, 4*time.Second)
		}
		lastRV, lastGen = rv, gen
	}
	if flips == 0 {
		t.Errorf("the writer never committed a new generation (last resourceVersion %s): nothing was tested", lastRV)
	}
}

// checkCrashed checks the store a killed writer left and returns the main
// view's generation and resourceVersion.
func checkCrashed(t *testing.T, s *Store, run int) (gen int, rv string) {
	t.Helper()
	checkInvariants(t, s)
	v, ok, err := s.View(crashMain)
	if err != nil || !ok {
		t.Fatalf("run %d: main view: %v %v", run, ok, err)
	}
	var got []Object
	if err := s.List(crashMain, "", 0, func(o Object) error { got = append(got, o); return nil }); err != nil {
		t.Fatalf("run %d: %v", run, err)
	}
	if len(got) != crashObjects {
		t.Fatalf("run %d: main view has %d objects, want %d", run, len(got), crashObjects)
	}
	gen, _ = strconv.Atoi(got[0].Labels["gen"])
	for i, o := range got {
		var body struct {
			Metadata struct{ Name, ResourceVersion string }
			Gen      int
		}
		if err := json.Unmarshal(o.Data, &body); err != nil {
			t.Fatalf("run %d: %s: half an object? %v", run, o.Name, err)
		}
		want := fmt.Sprintf("obj-%05d", gen*crashObjects/2+i)
		if o.Name != want || body.Gen != gen || o.Labels["gen"] != strconv.Itoa(gen) ||
			body.Metadata.Name != o.Name || body.Metadata.ResourceVersion != o.ResourceVersion {
			t.Fatalf("run %d: member %d is %s of generation %d (label %s), want %s of generation %d",
				run, i, o.Name, body.Gen, o.Labels["gen"], want, gen)
		}
	}
	// The selected view holds only what matches it, whatever it was cut at.
	err = s.List(crashEven, "", 0, func(o Object) error {
		if o.Labels["parity"] != "even" {
			return fmt.Errorf("%s is %s", o.Name, o.Labels["parity"])
		}
		return nil
	})
	if err != nil {
		t.Fatalf("run %d: even view: %v", run, err)
	}
	return gen, v.ResourceVersion
}

// crashChild writes until killed: alternately a whole new generation of the
// main view, a relist of the even view, and batches of watch events that
// modify, delete and re-create members without changing their generation.
func crashChild(t *testing.T, path string) {
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("ready")
	v, _, err := s.View(crashMain)
	if err != nil {
		t.Fatal(err)
	}
	rv, _ := strconv.Atoi(v.ResourceVersion)
	gen := 0
	if err := s.List(crashMain, "", 1, func(o Object) error {
		gen, _ = strconv.Atoi(o.Labels["gen"])
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	objs := make([]Object, crashObjects)
	for {
		gen = 1 - gen
		rv++
		for i := range objs {
			objs[i] = crashObject(gen, i, rv)
		}
		if err := s.ReplaceView(View{Key: crashMain, ResourceVersion: strconv.Itoa(rv), Kind: "PodList"}, objs); err != nil {
			t.Fatal(err)
		}
		var even []Object
		for _, o := range objs {
			if o.Labels["parity"] == "even" {
				even = append(even, o)
			}
		}
		if err := s.ReplaceView(View{Key: crashEven, ResourceVersion: strconv.Itoa(rv)}, even); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			var events []Event
			for range 100 {
				i := rand.IntN(crashObjects)
				rv++
				o := crashObject(gen, i, rv)
				if rand.IntN(4) == 0 {
					// Deleted and re-created in one batch: the count holds
					// at every commit.
					events = append(events, Event{Type: Deleted, View: crashMain, Object: o})
					rv++
					o = crashObject(gen, i, rv)
					events = append(events, Event{Type: Added, View: crashMain, Object: o})
					continue
				}
				events = append(events, Event{Type: Modified, View: crashMain, Object: o})
			}
			rv++
			events = append(events, Event{Type: Bookmark, View: crashMain, Object: Object{ResourceVersion: strconv.Itoa(rv)}})
			if err := s.Apply(events); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// lockedBuffer is a bytes.Buffer safe for concurrent writers.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
