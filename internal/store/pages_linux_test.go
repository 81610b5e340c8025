package store

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// mappedRSS is how many kB of s's memory map are resident in this
// process, from /proc/self/smaps.
func mappedRSS(t *testing.T, s *Store) int {
	t.Helper()
	start := fmt.Sprintf("%x-", s.db.Load().Info().Data)
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skip(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		line := sc.Text()
		if fields := strings.Fields(line); len(fields) > 0 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
			in = strings.HasPrefix(line, start)
			continue
		}
		if in && strings.HasPrefix(line, "Rss:") {
			kb, err := strconv.Atoi(strings.Fields(line)[1])
			if err != nil {
				t.Fatal(err)
			}
			return kb
		}
	}
	t.Fatalf("no mapping at %s in /proc/self/smaps", start)
	return 0
}

// TestScanLeavesNoResidentPages: the scan after Open reads every page of
// the file, but does not leave them in outpost's resident memory.
func TestScanLeavesNoResidentPages(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cache.db")
	filled(t, path, 4000) // about 4 MB
	s, err := Open(path, Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	before := mappedRSS(t, s)
	if err := s.scan(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	after := mappedRSS(t, s)
	t.Logf("resident pages of the store's map: %d kB after Open, %d kB after the scan", before, after)
	if after > 512 {
		t.Errorf("%d kB of the store file stay resident after the scan", after)
	}
}
