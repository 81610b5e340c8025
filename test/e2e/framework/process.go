package framework

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// logTailLines is how much of a process log goes into a start error: enough
// to show the fatal line and what led to it.
const logTailLines = 30

// process is one child binary whose output goes to a log file in Dir.
type process struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed once the process has exited and been reaped
	err     error         // exit status; valid after done is closed
}

// startProcess starts bin with args, appending its stdout and stderr to
// logPath. Appending (not truncating) keeps the history of a restarted
// apiserver in one file.
func startProcess(name, logPath, bin string, args, env []string) (*process, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening log of %s: %w", name, err)
	}
	// The child holds its own copy of the descriptor.
	defer logFile.Close()
	fmt.Fprintf(logFile, "=== %s: %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))

	cmd := exec.Command(bin, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &process{name: name, logPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// childAttr puts a child in its own process group, so that a terminal's ^C
// reaches only the test binary (which then stops the children in order), and
// asks the kernel to SIGKILL it when the test binary dies for any reason,
// including a panic or `go test -timeout`. The kernel ties that signal to
// the OS thread that started the child (golang/go#27505); the Go runtime
// ends a thread only when a goroutine exits while locked to it, which
// nothing here does.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// exited reports whether the process has already exited.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, waits up to grace for the process to exit, then
// SIGKILLs its whole group and waits for it to be reaped. A zero grace kills
// at once. After stop returns the process holds no port.
func (p *process) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	pgid := p.cmd.Process.Pid // == pid, because of Setpgid
	if grace > 0 {
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-p.done:
			return
		case <-time.After(grace):
		}
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	<-p.done
}

// exitError describes an unexpected exit, with the end of the log.
func (p *process) exitError() error {
	return fmt.Errorf("%s exited (%v); last lines of %s:\n%s", p.name, p.err, p.logPath, p.tail(logTailLines))
}

// tail returns the last n lines of the process log.
func (p *process) tail(n int) string {
	return tailFile(p.logPath, n)
}

func tailFile(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(reading log: %v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// pollInterval is how often readiness is probed; processes here become
// ready within seconds, so a short interval keeps test startup tight.
const pollInterval = 100 * time.Millisecond

// waitFor calls probe until it returns nil. It gives up when ctx is done or
// when p (if not nil) exits, returning the last probe error or p's log tail.
func waitFor(ctx context.Context, p *process, what string, probe func(context.Context) error) error {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		err := probe(ctx)
		if err == nil {
			return nil
		}
		if p != nil && p.exited() {
			return fmt.Errorf("waiting for %s: %w", what, p.exitError())
		}
		select {
		case <-ctx.Done():
			msg := fmt.Sprintf("waiting for %s: %v (last probe: %v)", what, ctx.Err(), err)
			if p != nil {
				msg += fmt.Sprintf("; last lines of %s:\n%s", p.logPath, p.tail(logTailLines))
			}
			return errors.New(msg)
		case <-t.C:
		}
	}
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago. The
// small race with other programs is the accepted price of letting each binary
// bind the port itself.
func freePort() (int, error) {
	ports, err := freePorts(1)
	if err != nil {
		return 0, err
	}
	return ports[0], nil
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago, for
// what a test itself tells to listen there (a host-network pod, a flag of
// outpost), or as an address where nothing listens. It fails t if there is
// none.
func FreePort(t testing.TB) int {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// freePorts returns n distinct free ports: all listeners stay open until
// each port is chosen, so the kernel cannot hand out one port twice.
func freePorts(n int) ([]int, error) {
	ports := make([]int, n)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free port: %w", err)
		}
		defer l.Close()
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports, nil
}

// waitPortFree waits until port on 127.0.0.1 can be bound again, so that a
// restarted apiserver does not fail with "address already in use".
func waitPortFree(ctx context.Context, port int) error {
	return waitFor(ctx, nil, "port "+strconv.Itoa(port)+" to be free", func(context.Context) error {
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return l.Close()
	})
}

// StatusMB reads a memory figure of process pid from /proc/PID/status, in
// MB: "VmRSS:", "RssAnon:", "RssFile:", "VmHWM:".
func StatusMB(pid int, field string) (float64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(data)) {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == field {
			kb, err := strconv.Atoi(f[1])
			if err != nil {
				return 0, fmt.Errorf("%s of pid %d: %w", field, pid, err)
			}
			return float64(kb) / 1024, nil
		}
	}
	return 0, fmt.Errorf("no %s for pid %d", field, pid)
}
