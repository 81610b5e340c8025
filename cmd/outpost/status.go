package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/outposthq/outpost/internal/config"
	"github.com/outposthq/outpost/internal/report"
)

// status runs `outpost status`: it reads the admin endpoint of a running
// outpost, prints its state, and exits with report's codes (0 online, 3
// serving from the cache, 4 not ready, 1 unreadable, 2 bad usage).
func status(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("outpost status", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	addr := fs.String("admin-address", config.DefaultHub().AdminAddress, "admin address of the outpost to ask (its --admin-address)")
	output := fs.String("o", "", `output format: "" for a person, or "json"`)
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for the answer")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, "Usage: outpost status [flags]\n\nExit codes: 0 ready online, 3 ready offline (serving from the cache),\n4 not ready, 1 the admin endpoint cannot be read, 2 bad usage.\n\nFlags:\n")
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return 0
		}
		fmt.Fprintf(stderr, "outpost status: %v\nSee 'outpost status --help'.\n", err)
		return report.ExitUsage
	}
	if fs.NArg() > 0 || (*output != "" && *output != "json") {
		fmt.Fprintf(stderr, "outpost status: unexpected arguments %q (-o takes json or nothing)\nSee 'outpost status --help'.\n", strings.Join(fs.Args(), " ")+*output)
		return report.ExitUsage
	}
	r, raw, err := readStatus(*addr, *timeout)
	if err != nil {
		fmt.Fprintf(stderr, "outpost status: %v\n", err)
		return report.ExitUnreadable
	}
	if *output == "json" {
		_, _ = stdout.Write(raw)
	} else if err := r.Write(stdout, time.Now()); err != nil {
		fmt.Fprintf(stderr, "outpost status: %v\n", err)
		return report.ExitUnreadable
	}
	return r.ExitCode()
}

// readStatus GETs /status from the admin address.
func readStatus(addr string, timeout time.Duration) (*report.Report, []byte, error) {
	if addr == "" {
		return nil, nil, errors.New("no --admin-address: outpost's admin endpoint is off")
	}
	base := addr
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(base, "/")+"/status", nil)
	if err != nil {
		return nil, nil, fmt.Errorf("admin address %q: %w", addr, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("cannot reach outpost's admin endpoint at %s (is outpost running, with this --admin-address?): %w", addr, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s/status: %w", addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("%s/status answered %s: %s", addr, resp.Status, strings.TrimSpace(string(raw)))
	}
	var r report.Report
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, nil, fmt.Errorf("%s/status is not outpost's status: %w", addr, err)
	}
	return &r, raw, nil
}
