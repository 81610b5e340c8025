package fleet

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// raiseFileLimit lifts this process's limit of open files as far as the
// kernel allows (fs.nr_open), and returns the limit now in force. The
// harness holds three descriptors per connection of a direct client (the
// client's, and both ends of its FaultProxy), and a black-holed FaultProxy
// holds every connection the clients open while they retry, so a large
// fleet needs far more than a shell's default. Only root may raise the hard
// limit; otherwise the soft limit goes up to the hard one.
func raiseFileLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("reading the limit of open files: %w", err)
	}
	want := uint64(1 << 20)
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil {
			want = n
		}
	}
	if lim.Cur >= want {
		return lim.Cur, nil
	}
	raised := syscall.Rlimit{Cur: want, Max: max(want, lim.Max)}
	hardErr := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised)
	if hardErr == nil {
		return want, nil
	}
	raised = syscall.Rlimit{Cur: lim.Max, Max: lim.Max}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
		return lim.Cur, fmt.Errorf("raising the limit of open files: %w", err)
	}
	return lim.Max, fmt.Errorf("the limit of open files stays at its hard limit %d (raising it to %d: %w)", lim.Max, want, hardErr)
}
