// Command outpost-controller is the cloud side of Outpost: it keeps the pods
// of autonomous nodes from being evicted, and behind their Services, while
// those nodes are cut off. See package internal/cloud/autonomy.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/outposthq/outpost/internal/cloud/autonomy"
	"github.com/outposthq/outpost/internal/version"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run returns the process exit code: 0 done, 1 failed while running,
// 2 bad command line or configuration.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch cmd := args[0]; {
	case cmd == "version" || cmd == "--version":
		fmt.Fprintf(stdout, "outpost-controller %s\n", version.Version)
		return 0
	case cmd == "help" || cmd == "-h" || cmd == "--help":
		fmt.Fprint(stdout, usage)
		return 0
	case cmd == "run" || cmd[0] == '-': // flags alone mean run, as Kubernetes controllers take them
		if cmd == "run" {
			args = args[1:]
		}
		opts, err := parseRun(args, stdout)
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		if err != nil {
			fmt.Fprintf(stderr, "outpost-controller: %v\nRun 'outpost-controller run --help' for the flags.\n", err)
			return 2
		}
		return serve(opts, stderr)
	default:
		fmt.Fprintf(stderr, "outpost-controller: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
}

// serve runs the controller until SIGINT or SIGTERM. A second signal, or a
// shutdown slower than the deadline, ends the process at once.
func serve(opts options, stderr io.Writer) int {
	log := newLogger(opts, stderr)
	klog.SetSlogLogger(log.With("source", "client-go"))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop) // restore default handling: a second signal kills

	log.Info("outpost-controller starting", "version", version.Version)
	errc := make(chan error, 1)
	go func() { errc <- autonomy.Run(ctx, opts.Config, log) }()
	var err error
	select {
	case err = <-errc:
	case <-ctx.Done():
		deadline := opts.Config.ShutdownTimeout + shutdownSlack
		select {
		case err = <-errc:
		case <-time.After(deadline):
			err = fmt.Errorf("shutdown took longer than %v; exiting anyway", deadline)
		}
	}
	if err != nil {
		log.Error("outpost-controller stopped", "err", err)
		return 1
	}
	log.Info("outpost-controller stopped")
	return 0
}

// shutdownSlack is added to the servers' shutdown timeout for the rest of
// the shutdown: releasing the Lease, stopping informers.
const shutdownSlack = 10 * time.Second

func newLogger(opts options, w io.Writer) *slog.Logger {
	ho := &slog.HandlerOptions{Level: opts.logLevel}
	if opts.logJSON {
		return slog.New(slog.NewJSONHandler(w, ho))
	}
	return slog.New(slog.NewTextHandler(w, ho))
}
