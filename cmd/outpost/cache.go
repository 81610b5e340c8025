package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/config"
	"github.com/outposthq/outpost/internal/drift"
	"github.com/outposthq/outpost/internal/hub"
	"github.com/outposthq/outpost/internal/local"
	"github.com/outposthq/outpost/internal/reader"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/seal"
	"github.com/outposthq/outpost/internal/store"
)

// Exit codes of `outpost cache`.
const (
	cacheOK         = 0
	cacheUnreadable = 1 // the file cannot be read: permissions, I/O, no way into a running outpost
	cacheUsage      = 2
	cacheDamaged    = 3 // verify found damage, or the file is not a store
	cacheMissing    = 4 // no cache file in the data dir
	cacheNotCached  = 5 // get: nothing cached that would answer it
	cacheDrifted    = 6 // diff: the cache differs from the apiserver
)

const cacheUsageText = `Usage:
  outpost cache ls [--identity USER] [--resource RESOURCE] [-o json]
  outpost cache get RESOURCE [NAME] [-n NAMESPACE] [--as USER] [-o json|yaml]
  outpost cache verify
  outpost cache diff [--identity USER] [--resource RESOURCE] [-o json]

Each reads the cache of --data-dir (default /var/lib/outpost), never changing it:
the file itself when outpost is stopped, a consistent copy through
<data-dir>/inspect.sock while it runs. With --encryption-key-file, sealed
Secrets and tokens are shown too.

  ls      the views: who read what, at which resourceVersion, how many objects
  get     exactly what outpost would answer offline to USER for that read
          (RESOURCE: pods, configmaps, deployments.apps, or group/version/resource)
  verify  the file's integrity: pages, references, counts, protobuf records

  diff    a running, online outpost compares its views with the apiserver now,
          listing each as its identity (metadata only): objects the cache lacks,
          holds at another resourceVersion, or holds though they are gone; it
          changes nothing (the next re-list does)

Exit codes: 0 ok, 1 cannot read the file (diff: outpost not running, or
offline), 2 bad usage, 3 damaged (verify) or not a store, 4 no cache file,
5 (get) nothing cached answers it, 6 (diff) the cache differs.

Flags:
`

// cacheCmd runs `outpost cache`.
func cacheCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("outpost cache", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	dataDir := fs.String("data-dir", config.DefaultHub().DataDir, "outpost's state directory, as given to outpost run")
	keyFile := fs.String("encryption-key-file", "", "the key outpost seals Secrets and tokens with, to show them")
	identity := fs.String("identity", "", "ls: only the views of this user")
	resource := fs.String("resource", "", "ls: only the views of this resource (pods, deployments.apps, or group/version/resource)")
	as := fs.String("as", "", "get: the user to answer (default: the only one that read RESOURCE)")
	namespace := fs.String("n", "", "get: the namespace")
	output := fs.String("o", "", "output: json (ls: a table by default; get: json by default), or yaml for get")
	usage := func(err error) int {
		fmt.Fprintf(stderr, "outpost cache: %v\nSee 'outpost cache --help'.\n", err)
		return cacheUsage
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		if len(args) == 0 {
			return usage(errors.New("a subcommand is needed: ls, get, verify or diff"))
		}
		fmt.Fprint(stdout, cacheUsageText)
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		return cacheOK
	}
	sub := args[0]
	// Flags may come before or after the arguments, as with kubectl.
	var positional []string
	rest := args[1:]
	for {
		if err := fs.Parse(rest); err != nil {
			return usage(err)
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	switch {
	case sub != "ls" && sub != "get" && sub != "verify" && sub != "diff":
		return usage(fmt.Errorf("unknown subcommand %q", sub))
	case sub == "get" && (len(positional) < 1 || len(positional) > 2):
		return usage(errors.New("get takes RESOURCE and at most a NAME"))
	case sub != "get" && len(positional) > 0:
		return usage(fmt.Errorf("unexpected arguments %q", positional))
	case *output != "" && *output != "json" && !(sub == "get" && *output == "yaml"):
		return usage(fmt.Errorf("-o %s: %s takes json%s", *output, sub, map[bool]string{true: " or yaml"}[sub == "get"]))
	}

	if sub == "diff" {
		return cacheDiff(*dataDir, *identity, *resource, *output == "json", stdout, stderr)
	}
	st, code, err := openCache(*dataDir, *keyFile)
	if err != nil {
		fmt.Fprintf(stderr, "outpost cache: %v\n", err)
		return code
	}
	defer st.close()
	switch sub {
	case "ls":
		return cacheLs(st.Store, *identity, *resource, *output == "json", stdout, stderr)
	case "get":
		name := ""
		if len(positional) == 2 {
			name = positional[1]
		}
		return cacheGet(st.Store, positional[0], name, *namespace, *as, *output == "yaml", stdout, stderr)
	}
	return cacheVerify(st.Store, stdout, stderr)
}

// openedCache is a store opened read-only, and the snapshot file to remove
// after, if it is one.
type openedCache struct {
	*store.Store
	snapshot string
}

func (c openedCache) close() {
	_ = c.Store.Close()
	if c.snapshot != "" {
		_ = os.RemoveAll(filepath.Dir(c.snapshot))
	}
}

// openCache opens dataDir's cache read-only, or, when a running outpost
// holds it, a consistent copy fetched through its inspection socket.
func openCache(dataDir, keyFile string) (openedCache, int, error) {
	var opts store.Options
	if keyFile != "" {
		k, err := seal.LoadKey(keyFile)
		if err != nil {
			return openedCache{}, cacheUsage, err
		}
		opts.Sealer = k
	}
	path := filepath.Join(dataDir, "cache.db")
	st, err := store.OpenReadOnly(path, opts)
	if errors.Is(err, store.ErrLocked) {
		var snap string
		if snap, err = fetchSnapshot(dataDir); err != nil {
			return openedCache{}, cacheUnreadable, fmt.Errorf("%s is held by a running outpost, and its copy could not be read: %w", path, err)
		}
		if st, err = store.OpenReadOnly(snap, opts); err != nil {
			_ = os.RemoveAll(filepath.Dir(snap))
			return openedCache{}, cacheUnreadable, fmt.Errorf("the copy of %s from the running outpost: %w", path, err)
		}
		return openedCache{Store: st, snapshot: snap}, cacheOK, nil
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return openedCache{}, cacheMissing, fmt.Errorf("no cache at %s (is --data-dir outpost's?)", path)
	case errors.Is(err, store.ErrCorrupt):
		return openedCache{}, cacheDamaged, err
	case err != nil:
		return openedCache{}, cacheUnreadable, err
	}
	return openedCache{Store: st}, cacheOK, nil
}

// fetchSnapshot copies the running outpost's store into a private
// temporary file.
func fetchSnapshot(dataDir string) (string, error) {
	sock := filepath.Join(dataDir, hub.InspectSocket)
	resp, err := inspectClient(sock).Get("http://outpost/snapshot")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s answered %s", sock, resp.Status)
	}
	dir, err := os.MkdirTemp("", "outpost-cache-")
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "cache.db")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o600)
	if err == nil {
		_, err = io.Copy(f, resp.Body)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		_ = os.RemoveAll(dir)
		return "", fmt.Errorf("copying the store: %w", err)
	}
	return path, nil
}

// inspectClient talks to a running outpost through its inspection socket.
func inspectClient(sock string) *http.Client {
	return &http.Client{Timeout: 5 * time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}}}
}

// cacheDiff asks the running outpost of dataDir to compare its views with
// the apiserver, and prints what differs.
func cacheDiff(dataDir, identity, resource string, asJSON bool, stdout, stderr io.Writer) int {
	sock := filepath.Join(dataDir, hub.InspectSocket)
	q := url.Values{}
	if identity != "" {
		q.Set("identity", identity)
	}
	if resource != "" {
		q.Set("resource", resource)
	}
	resp, err := inspectClient(sock).Get("http://outpost/diff?" + q.Encode())
	if err != nil {
		fmt.Fprintf(stderr, "outpost cache diff: no running outpost answers on %s (diff needs one, online): %v\n", sock, err)
		return cacheUnreadable
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil || resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "outpost cache diff: %s %s\n", resp.Status, bytes.TrimSpace(body))
		return cacheUnreadable
	}
	var report drift.Report
	if err := json.Unmarshal(body, &report); err != nil {
		fmt.Fprintf(stderr, "outpost cache diff: reading outpost's answer: %v\n", err)
		return cacheUnreadable
	}
	if asJSON {
		_, _ = stdout.Write(body)
	} else {
		printDiff(report, stdout)
	}
	if report.Drifted() > 0 {
		return cacheDrifted
	}
	return cacheOK
}

// printDiff prints one line per view, then the objects that differ.
func printDiff(r drift.Report, out io.Writer) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IDENTITY\tRESOURCE\tNAMESPACE\tSELECTORS\tCACHED\tLIVE\tMISSING\tCHANGED\tGONE\t")
	for _, v := range r.Views {
		sel := strings.Trim(v.Key.LabelSelector+" "+v.Key.FieldSelector, " ")
		if v.Key.Name != "" {
			sel = "name=" + v.Key.Name
		}
		if v.Skipped != "" {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t-\t-\t-\t-\tnot compared: %s\n", v.Key.Identity, v.Key.Resource, dash(v.Key.Namespace), dash(sel), v.Cached, v.Skipped)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t\n", v.Key.Identity, v.Key.Resource, dash(v.Key.Namespace), dash(sel), v.Cached, v.Live, len(v.Missing), len(v.Changed), len(v.Gone))
	}
	_ = tw.Flush()
	for _, v := range r.Views {
		for _, d := range []struct {
			what  string
			names []string
		}{{"missing", v.Missing}, {"changed", v.Changed}, {"gone", v.Gone}} {
			for _, n := range d.names {
				fmt.Fprintf(out, "%s %s %s: %s\n", v.Key.Identity, v.Key.Resource, d.what, n)
			}
		}
	}
	fmt.Fprintf(out, "%d of %d views differ from the apiserver\n", r.Drifted(), len(r.Views))
}

func cacheLs(st *store.Store, identity, resource string, asJSON bool, stdout, stderr io.Writer) int {
	views, err := st.AllViews()
	if err != nil {
		fmt.Fprintf(stderr, "outpost cache: reading views: %v\n", err)
		return cacheDamaged
	}
	views = slices.DeleteFunc(views, func(v store.View) bool {
		return (identity != "" && v.Key.Identity != identity) || (resource != "" && !request.MatchesResource(v.Key.Resource, resource))
	})
	type row struct {
		store.View
		Objects int `json:"objects"`
	}
	rows := make([]row, len(views))
	for i, v := range views {
		rows[i].View = v
		_ = st.Read(func(tx *store.Tx) error {
			return tx.ListData(v.Key, "", 0, false, func(string, []byte, []byte) error { rows[i].Objects++; return nil })
		})
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(rows)
		return cacheOK
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IDENTITY\tRESOURCE\tNAMESPACE\tNAME\tSELECTORS\tRV\tOBJECTS\tUPDATED\tSTALE")
	for _, r := range rows {
		k := r.Key
		sel := strings.Trim(k.LabelSelector+" "+k.FieldSelector, " ")
		updated := "-"
		if !r.Updated.IsZero() {
			updated = r.Updated.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%v\n", k.Identity, k.Resource, dash(k.Namespace), dash(k.Name), dash(sel),
			r.ResourceVersion, r.Objects, updated, r.Stale)
	}
	_ = tw.Flush()
	return cacheOK
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// cacheGet answers as outpost's offline reader would: the request a client
// of identity as would send, served by reader.Reader from the store.
func cacheGet(st *store.Store, resource, name, namespace, as string, asYAML bool, stdout, stderr io.Writer) int {
	views, err := st.AllViews()
	if err != nil {
		fmt.Fprintf(stderr, "outpost cache: reading views: %v\n", err)
		return cacheDamaged
	}
	key, identities := "", map[string]bool{}
	for _, v := range views {
		if request.MatchesResource(v.Key.Resource, resource) && !strings.HasSuffix(v.Key.Resource, "#meta") {
			key = v.Key.Resource
			identities[v.Key.Identity] = true
		}
	}
	if key == "" {
		fmt.Fprintf(stderr, "outpost cache: nothing of %s is cached (see outpost cache ls)\n", resource)
		return cacheNotCached
	}
	if as == "" {
		if len(identities) != 1 {
			var ids []string
			for id := range identities {
				ids = append(ids, id)
			}
			sort.Strings(ids)
			fmt.Fprintf(stderr, "outpost cache: %s was read by %d users; answer which with --as: %s\n", resource, len(ids), strings.Join(ids, ", "))
			return cacheUsage
		}
		for id := range identities {
			as = id
		}
	}
	parts := strings.SplitN(key, "/", 3)
	path := "/apis/" + parts[0] + "/" + parts[1]
	if parts[0] == "" {
		path = "/api/" + parts[1]
	}
	if namespace != "" {
		path += "/namespaces/" + url.PathEscape(namespace)
	}
	path += "/" + parts[2]
	if name != "" {
		path += "/" + url.PathEscape(name)
	}
	id := request.Identity{Kind: request.BearerToken, User: as}
	if strings.HasPrefix(as, "system:node:") {
		id.Kind = request.NodeCert
	} else if hash, ok := strings.CutPrefix(as, "token:"); ok {
		id = request.Identity{Kind: request.BearerToken, TokenHash: hash}
	}
	r := httptest.NewRequest(http.MethodGet, path, nil)
	r.Header.Set("Accept", "application/json")
	info, err := request.Parse(r, id)
	if err != nil {
		return usageErr(stderr, err)
	}
	writes := &local.Writer{Store: st, Log: slog.New(slog.DiscardHandler)}
	writes.Load()
	w := httptest.NewRecorder()
	(&reader.Reader{Store: st, Local: writes}).Serve(w, r, info)
	body := w.Body.Bytes()
	if w.Code != http.StatusOK {
		var status struct{ Message string }
		_ = json.Unmarshal(body, &status)
		if w.Code >= 500 && w.Code != http.StatusServiceUnavailable {
			// The store could not be read (a sealed Secret without its key,
			// a damaged record), which is not "not cached".
			fmt.Fprintf(stderr, "outpost cache: reading %s for %s: %s\n", path, as, status.Message)
			return cacheUnreadable
		}
		fmt.Fprintf(stderr, "outpost cache: offline, outpost would answer %s to %s with %d: %s\n", path, as, w.Code, status.Message)
		return cacheNotCached
	}
	if asYAML {
		if body, err = yaml.JSONToYAML(body); err != nil {
			fmt.Fprintf(stderr, "outpost cache: %v\n", err)
			return cacheUnreadable
		}
		_, _ = stdout.Write(body)
		return cacheOK
	}
	var out bytes.Buffer
	if json.Indent(&out, body, "", "  ") != nil {
		out.Reset()
		out.Write(body)
	}
	out.WriteByte('\n')
	_, _ = stdout.Write(out.Bytes())
	return cacheOK
}

func usageErr(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "outpost cache: %v\n", err)
	return cacheUsage
}

func cacheVerify(st *store.Store, stdout, stderr io.Writer) int {
	problems, err := st.Verify(0, codec.ProtobufAgrees)
	if err != nil {
		fmt.Fprintf(stderr, "outpost cache: verify: %v\n", err)
		return cacheDamaged
	}
	objects, views, _ := st.Stats()
	if len(problems) == 0 {
		fmt.Fprintf(stdout, "ok: %d objects in %d views, every reference and count sound\n", objects, views)
		return cacheOK
	}
	for _, p := range problems {
		fmt.Fprintf(stdout, "%s: %s\n", p.Where, p.What)
	}
	fmt.Fprintf(stderr, "outpost cache: %d problems found\n", len(problems))
	return cacheDamaged
}
