package local

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/strategicpatch"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/status"
	"github.com/outposthq/outpost/internal/store"
)

// Writer answers this node's kubelet's own writes while the cloud is
// unreachable. Set the fields, then call Load once before use.
type Writer struct {
	Store   *store.Store
	Log     *slog.Logger
	Metrics *metrics.Metrics // optional
	// Node is this node's name: its kubelet's writes are answered. Empty:
	// none are.
	Node string
	// MaxJournal bounds the event journal. Default 1000.
	MaxJournal int
	// Now is the clock; nil means time.Now.
	Now func() time.Time

	overlays overlays
	dropped  atomic.Int64 // journaled events dropped because it was full

	// followMu makes followEndpoints read and write the overlays of
	// EndpointSlices one pod at a time.
	followMu sync.Mutex
	// overlayMu orders saving an overlay and dropping them all.
	overlayMu sync.Mutex

	mu          sync.Mutex // guards the fields below
	lastLocalRV uint64
	journalSeq  uint64
}

// Load reads what was written locally before a restart: the overlays, and
// where the journal's numbering goes on.
func (l *Writer) Load() {
	if l.MaxJournal <= 0 {
		l.MaxJournal = 1000
	}
	if l.Now == nil {
		l.Now = time.Now
	}
	l.loadOverlays()
	l.loadJournalSeq()
}

// Store document prefixes for overlays and the event journal.
const (
	overlayPrefix = "overlay\x00"
	journalPrefix = "journal\x00"
)

// localKind names the kinds outpost writes locally.
var localKind = map[string][2]string{
	"coordination.k8s.io/v1/leases": {"Lease", "coordination.k8s.io/v1"},
	"/v1/nodes":                     {"Node", "v1"},
	"/v1/pods":                      {"Pod", "v1"},
}

// writePolicy says how outpost answers a write offline.
type writePolicy int

const (
	noPolicy writePolicy = iota
	overlayWrite
	journalWrite
	recordedToken
)

func (l *Writer) policy(info *request.Info) writePolicy {
	if !info.IsResourceRequest || l.Node == "" {
		return noPolicy
	}
	if !l.ownNode(info) {
		return noPolicy
	}
	if isTokenRequest(info) {
		return recordedToken
	}
	res := info.APIGroup + "/" + info.APIVersion + "/" + info.Resource
	switch {
	case res == "coordination.k8s.io/v1/leases" && info.Namespace == "kube-node-lease" && info.Name == l.Node && info.Subresource == "" &&
		(info.Verb == "update" || info.Verb == "patch"):
		return overlayWrite
	case res == "coordination.k8s.io/v1/leases" && info.Namespace == "kube-node-lease" && info.Verb == "create":
		return overlayWrite
	case res == "/v1/nodes" && info.Name == l.Node && (info.Subresource == "" || info.Subresource == "status") && (info.Verb == "update" || info.Verb == "patch"):
		return overlayWrite
	case res == "/v1/nodes" && info.Verb == "create":
		return overlayWrite // kubelet registering again after a restart: 409 when cached
	case res == "/v1/pods" && info.Subresource == "status" && (info.Verb == "update" || info.Verb == "patch"):
		return overlayWrite // the pod must be bound here: checked against the cached pod
	case (res == "/v1/events" || res == "events.k8s.io/v1/events") && info.Verb == "create":
		return journalWrite
	}
	return noPolicy
}

// Answers reports whether outpost answers this write itself offline.
func (l *Writer) Answers(r *http.Request, info *request.Info) bool {
	return r.Method != http.MethodGet && l.policy(info) != noPolicy
}

// Serve answers a write locally, or says why not.
func (l *Writer) Serve(w http.ResponseWriter, r *http.Request, info *request.Info) {
	var err error
	switch l.policy(info) {
	case overlayWrite:
		err = l.writeOverlay(w, r, info)
	case journalWrite:
		err = l.journal(w, r, info)
	case recordedToken:
		err = l.serveToken(w, r, info)
	default:
		err = status.Unavailable(fmt.Sprintf("outpost: the cloud is unreachable; %s %s cannot be done offline", info.Verb, info.Path), 5)
	}
	if err != nil {
		status.WriteError(w, err)
	}
}

const maxWriteBody = 3 << 20

// requestJSON reads a request body as JSON (converting protobuf).
func requestJSON(r *http.Request) ([]byte, string, error) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxWriteBody+1))
	if err != nil {
		return nil, "", status.BadRequest("reading request body: " + err.Error())
	}
	if len(body) > maxWriteBody {
		return nil, "", apierrors.NewRequestEntityTooLargeError("request body over 3 MiB")
	}
	ct := codec.MediaType(r.Header.Get("Content-Type"))
	if ct == codec.MediaProtobuf {
		obj, err := codec.Decode(body, nil)
		if err != nil {
			return nil, ct, status.BadRequest("decoding protobuf body: " + err.Error())
		}
		body, err = json.Marshal(obj)
		if err != nil {
			return nil, ct, status.BadRequest(err.Error())
		}
		ct = codec.MediaJSON
	}
	return body, ct, nil
}

func (l *Writer) writeOverlay(w http.ResponseWriter, r *http.Request, info *request.Info) error {
	gen := l.overlays.generation()
	res := info.APIGroup + "/" + info.APIVersion + "/" + info.Resource
	kinds := localKind[res]
	body, ct, err := requestJSON(r)
	if err != nil {
		return err
	}
	name := info.Name
	var base []byte
	if info.Verb != "create" {
		if ov := l.overlays.get(res, info.Namespace, name); ov != nil {
			base = ov.data
		} else if o, ok, err := l.Store.Get(res, info.Namespace, name); err != nil {
			return fmt.Errorf("reading cache: %w", err)
		} else if ok {
			base = o.Data
		}
		if base == nil {
			return status.Unavailable(fmt.Sprintf("outpost: the cloud is unreachable and %s %s/%s is not cached", info.Resource, info.Namespace, name), 5)
		}
		if res == "/v1/pods" {
			var p struct {
				Spec struct {
					NodeName string `json:"nodeName"`
				} `json:"spec"`
			}
			if json.Unmarshal(base, &p) != nil || p.Spec.NodeName != l.Node {
				return status.Forbidden("outpost: offline, a node may only update the status of pods bound to it")
			}
		}
	}

	if info.Verb == "create" {
		// As the apiserver: creating what exists is a conflict. A restarted
		// kubelet (or kwok) then reads and updates the existing object
		// instead of taking it over.
		var meta struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		_ = json.Unmarshal(body, &meta)
		if meta.Metadata.Name == "" {
			return status.BadRequest("outpost: the object to create has no name")
		}
		if res == "/v1/nodes" && meta.Metadata.Name != l.Node {
			return status.Forbidden("outpost: offline, a node may only register itself")
		}
		if l.overlays.get(res, info.Namespace, meta.Metadata.Name) != nil {
			return apierrors.NewAlreadyExists(schema.GroupResource{Group: info.APIGroup, Resource: info.Resource}, meta.Metadata.Name)
		}
		if _, ok, err := l.Store.Get(res, info.Namespace, meta.Metadata.Name); err != nil {
			return fmt.Errorf("reading cache: %w", err)
		} else if ok {
			return apierrors.NewAlreadyExists(schema.GroupResource{Group: info.APIGroup, Resource: info.Resource}, meta.Metadata.Name)
		}
		if res == "/v1/nodes" {
			return status.Unavailable("outpost: the cloud is unreachable and this node was never seen online, so it cannot register", 5)
		}
	}

	var out []byte
	switch info.Verb {
	case "create", "update":
		out = body
		if info.Subresource == "status" && base != nil {
			out, err = replaceStatus(base, body)
		}
	case "patch":
		out, err = applyPatch(base, body, r.Header.Get("Content-Type"), res)
	}
	if err != nil {
		return err
	}
	if ct != codec.MediaJSON && info.Verb != "patch" {
		return unsupportedMedia(ct)
	}
	obj, err := codec.ObjectFromJSON(out, res)
	if err != nil {
		return status.BadRequest("outpost: the written object is not valid: " + err.Error())
	}
	if info.Verb == "create" {
		name = obj.Name
	}
	// Keep the cloud's resourceVersion: when the link returns, the client's
	// next optimistic update (kubelet's Lease renewal) must still match the
	// apiserver's copy. A locally created object gets one of our own.
	rv := obj.ResourceVersion
	if rv == "" || info.Verb == "create" {
		rv = l.localRV()
	}
	if base != nil {
		var b struct {
			Metadata struct {
				ResourceVersion string `json:"resourceVersion"`
			} `json:"metadata"`
		}
		if json.Unmarshal(base, &b) == nil && b.Metadata.ResourceVersion != "" {
			rv = b.Metadata.ResourceVersion
		}
	}
	out, err = setMeta(obj.Data, rv, info.Verb == "create")
	if err != nil {
		return apierrors.NewInternalError(err)
	}
	ov := &overlay{resource: res, namespace: info.Namespace, name: name, kind: kinds[0], apiVersion: kinds[1], data: out}
	if err := l.putOverlay(ov, gen); errors.Is(err, errDropped) {
		// The cloud returned meanwhile: the write goes there instead.
		return status.Unavailable("outpost: the cloud is reachable again; send the write again", 1)
	} else if err != nil {
		return apierrors.NewInternalError(err)
	}
	if res == "/v1/pods" && podMoved(base, out) {
		l.followEndpoints(info.Namespace, name, gen)
	}
	code := http.StatusOK
	if info.Verb == "create" {
		code = http.StatusCreated
	}
	return answer(w, code, "overlay", codec.WithTypeMeta(out, kinds[0], kinds[1]), info.Accept)
}

// answer writes a local write's answer: jsonBody in the encoding the
// client accepts, with code and X-Outpost-Local-Write saying which policy
// answered.
func answer(w http.ResponseWriter, code int, policy string, jsonBody []byte, a codec.Accept) error {
	contentType, body, err := codec.Encode(jsonBody, a)
	if err != nil {
		return err
	}
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("X-Outpost-Local-Write", policy)
	w.WriteHeader(code)
	_, _ = w.Write(body)
	return nil
}

// replaceStatus returns base with the status of body.
func replaceStatus(base, body []byte) ([]byte, error) {
	var b, n map[string]json.RawMessage
	if json.Unmarshal(base, &b) != nil || json.Unmarshal(body, &n) != nil {
		return nil, status.BadRequest("outpost: body is not a JSON object")
	}
	b["status"] = n["status"]
	return json.Marshal(b)
}

// applyPatch applies a patch of the given content type with the
// apimachinery patch libraries.
func applyPatch(base, patch []byte, contentType, res string) ([]byte, error) {
	mt, _, _ := mime.ParseMediaType(contentType)
	switch mt {
	case "application/strategic-merge-patch+json":
		var schema any
		switch res {
		case "/v1/pods":
			schema = corev1.Pod{}
		case "/v1/nodes":
			schema = corev1.Node{}
		default:
			schema = coordinationv1.Lease{}
		}
		out, err := strategicpatch.StrategicMergePatch(base, patch, schema)
		if err != nil {
			return nil, status.BadRequest("applying strategic merge patch: " + err.Error())
		}
		return out, nil
	case "application/merge-patch+json":
		out, err := jsonpatch.MergePatch(base, patch)
		if err != nil {
			return nil, status.BadRequest("applying merge patch: " + err.Error())
		}
		return out, nil
	case "application/json-patch+json":
		p, err := jsonpatch.DecodePatch(patch)
		if err != nil {
			return nil, status.BadRequest("decoding JSON patch: " + err.Error())
		}
		out, err := p.Apply(base)
		if err != nil {
			return nil, status.BadRequest("applying JSON patch: " + err.Error())
		}
		return out, nil
	default:
		return nil, unsupportedMedia(mt)
	}
}

// localRV returns a resourceVersion for a local write: above every one
// the cache holds, and increasing.
func (l *Writer) localRV() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := uint64(l.Now().UnixNano())
	if now <= l.lastLocalRV {
		now = l.lastLocalRV + 1
	}
	l.lastLocalRV = now
	return strconv.FormatUint(now, 10)
}

// setMeta sets metadata.resourceVersion (and for a new object its uid and
// creationTimestamp) of a JSON object.
func setMeta(data []byte, rv string, create bool) ([]byte, error) {
	var obj map[string]any
	if err := json.Unmarshal(data, &obj); err != nil {
		return nil, err
	}
	md, _ := obj["metadata"].(map[string]any)
	if md == nil {
		md = map[string]any{}
		obj["metadata"] = md
	}
	md["resourceVersion"] = rv
	if create {
		if _, ok := md["uid"]; !ok {
			md["uid"] = newUID()
		}
		if _, ok := md["creationTimestamp"]; !ok {
			md["creationTimestamp"] = time.Now().UTC().Format(time.RFC3339)
		}
	}
	delete(obj, "kind")
	delete(obj, "apiVersion")
	return json.Marshal(obj)
}

func newUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func unsupportedMedia(mt string) error {
	return status.UnsupportedMediaType("outpost cannot apply " + mt + " offline")
}
