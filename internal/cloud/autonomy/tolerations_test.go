package autonomy

import (
	"encoding/json"
	"errors"
	"strconv"
	"testing"
	"time"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/internal/cloud/autonomy/webhook"
)

const (
	unreachableKey = corev1.TaintNodeUnreachable
	notReadyKey    = corev1.TaintNodeNotReady
)

func str(p *int64) string {
	if p == nil {
		return "forever"
	}
	return strconv.FormatInt(*p, 10)
}

// noExecute is a toleration as DefaultTolerationSeconds adds it.
func noExecute(key string, seconds *int64) corev1.Toleration {
	return corev1.Toleration{Key: key, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute, TolerationSeconds: seconds}
}

// defaults are the tolerations the apiserver gives every pod.
func defaults() []corev1.Toleration {
	return []corev1.Toleration{noExecute(notReadyKey, new(int64(300))), noExecute(unreachableKey, new(int64(300)))}
}

func boundPod(tolerations ...corev1.Toleration) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "p", ResourceVersion: "7"},
		Spec: corev1.PodSpec{
			NodeName:    "edge-1",
			Containers:  []corev1.Container{{Name: "c", Image: "i"}},
			Tolerations: tolerations,
		},
		Status: corev1.PodStatus{Phase: corev1.PodRunning},
	}
}

// applyPatch applies ops to pod the way the apiserver does.
func applyPatch(t *testing.T, pod *corev1.Pod, ops []webhook.Op) *corev1.Pod {
	t.Helper()
	var got corev1.Pod
	applyJSON(t, pod, ops, &got)
	return &got
}

// applyRaw applies a JSON patch to a JSON document.
func applyRaw(t *testing.T, doc []byte, ops []webhook.Op) []byte {
	t.Helper()
	raw, err := json.Marshal(ops)
	if err != nil {
		t.Fatal(err)
	}
	patch, err := jsonpatch.DecodePatch(raw)
	if err != nil {
		t.Fatalf("decoding patch %s: %v", raw, err)
	}
	out, err := patch.Apply(doc)
	if err != nil {
		t.Fatalf("applying patch %s: %v", raw, err)
	}
	return out
}

// seconds returns the tolerationSeconds of the NoExecute tolerations of key,
// in order, as strings.
func seconds(pod *corev1.Pod, key string) []string {
	var out []string
	for _, t := range pod.Spec.Tolerations {
		if t.Key == key && t.Effect == corev1.TaintEffectNoExecute {
			out = append(out, str(t.TolerationSeconds))
		}
	}
	return out
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

var (
	forever = Policy{Autonomous: true, Annotation: AnnotationAutonomyDuration}
	oneHour = Policy{Autonomous: true, Duration: time.Hour, Annotation: AnnotationAutonomyDuration}
	none    = Policy{}
)

func TestTolerationPatch(t *testing.T) {
	tests := []struct {
		name   string
		pod    *corev1.Pod
		policy Policy
		// want: tolerationSeconds of unreachable and not-ready after the
		// patch; nil want means no patch at all.
		wantUnreachable, wantNotReady []string
		wantRecord                    string // "" means no annotation after the patch
		noPatch                       bool
	}{
		{
			name: "defaults become forever", pod: boundPod(defaults()...), policy: forever,
			wantUnreachable: []string{"forever"}, wantNotReady: []string{"forever"},
			wantRecord: `[{"key":"node.kubernetes.io/not-ready","operator":"Exists","effect":"NoExecute","tolerationSeconds":300},{"key":"node.kubernetes.io/unreachable","operator":"Exists","effect":"NoExecute","tolerationSeconds":300}]`,
		},
		{
			name: "defaults become one hour", pod: boundPod(defaults()...), policy: oneHour,
			wantUnreachable: []string{"3600"}, wantNotReady: []string{"3600"}, wantRecord: "set",
		},
		{
			name: "a longer toleration of the pod is kept", policy: oneHour,
			pod:             boundPod(noExecute(unreachableKey, nil), noExecute(notReadyKey, new(int64(7200)))),
			wantUnreachable: []string{"forever"}, wantNotReady: []string{"7200"}, noPatch: true,
		},
		{
			name: "a shorter declared duration does not shorten", policy: Policy{Autonomous: true, Duration: time.Minute},
			pod: boundPod(defaults()...), noPatch: true,
		},
		{
			name: "no tolerations: both added", policy: forever, pod: boundPod(),
			wantUnreachable: []string{"forever"}, wantNotReady: []string{"forever"}, wantRecord: "[]",
		},
		{
			name: "other tolerations kept, missing one appended", policy: oneHour,
			pod: boundPod(
				corev1.Toleration{Key: "dedicated", Operator: corev1.TolerationOpEqual, Value: "edge", Effect: corev1.TaintEffectNoSchedule},
				noExecute(notReadyKey, new(int64(300))),
			),
			wantUnreachable: []string{"3600"}, wantNotReady: []string{"3600"}, wantRecord: "set",
		},
		{
			name: "wildcard toleration: nothing to add", policy: forever,
			pod: boundPod(corev1.Toleration{Operator: corev1.TolerationOpExists}), noPatch: true,
		},
		{
			name: "empty-effect toleration already tolerates forever", policy: forever,
			pod: boundPod(corev1.Toleration{Key: unreachableKey, Operator: corev1.TolerationOpExists}, noExecute(notReadyKey, new(int64(300)))),
			// not-ready changes; unreachable has no NoExecute-specific toleration and needs none
			wantUnreachable: nil, wantNotReady: []string{"forever"}, wantRecord: "set",
		},
		{
			name: "not autonomous, no record: untouched", policy: none, pod: boundPod(defaults()...), noPatch: true,
		},
		{
			name: "unbound pod", policy: forever, noPatch: true,
			pod: func() *corev1.Pod { p := boundPod(defaults()...); p.Spec.NodeName = ""; return p }(),
		},
		{
			name: "DaemonSet pod", policy: forever, noPatch: true,
			pod: func() *corev1.Pod {
				p := boundPod(defaults()...)
				p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "ds", UID: "u", Controller: new(true)}}
				return p
			}(),
		},
		{
			name: "ReplicaSet pod is managed", policy: forever, wantUnreachable: []string{"forever"}, wantNotReady: []string{"forever"}, wantRecord: "set",
			pod: func() *corev1.Pod {
				p := boundPod(defaults()...)
				p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "rs", UID: "u", Controller: new(true)}}
				return p
			}(),
		},
		{
			name: "mirror pod", policy: forever, noPatch: true,
			pod: func() *corev1.Pod {
				p := boundPod(defaults()...)
				p.Annotations = map[string]string{corev1.MirrorPodAnnotationKey: "abc"}
				return p
			}(),
		},
		{
			name: "terminating pod", policy: forever, noPatch: true,
			pod: func() *corev1.Pod { p := boundPod(defaults()...); p.DeletionTimestamp = &metav1.Time{}; return p }(),
		},
		{
			name: "finished pod", policy: forever, noPatch: true,
			pod: func() *corev1.Pod { p := boundPod(defaults()...); p.Status.Phase = corev1.PodSucceeded; return p }(),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ops, err := tolerationPatch(tt.pod, tt.policy)
			if err != nil {
				t.Fatal(err)
			}
			if tt.noPatch {
				if ops != nil {
					t.Fatalf("patch = %+v, want none", ops)
				}
				return
			}
			if len(ops) == 0 {
				t.Fatal("no patch")
			}
			got := applyPatch(t, tt.pod, ops)
			if s := seconds(got, unreachableKey); !equal(s, tt.wantUnreachable) {
				t.Errorf("unreachable tolerationSeconds = %v, want %v", s, tt.wantUnreachable)
			}
			if s := seconds(got, notReadyKey); !equal(s, tt.wantNotReady) {
				t.Errorf("not-ready tolerationSeconds = %v, want %v", s, tt.wantNotReady)
			}
			record, ok := got.Annotations[AnnotationOriginalTolerations]
			switch {
			case tt.wantRecord == "" && ok:
				t.Errorf("record = %s, want none", record)
			case tt.wantRecord == "set" && !ok, tt.wantRecord != "set" && tt.wantRecord != "" && record != tt.wantRecord:
				t.Errorf("record = %q, want %q", record, tt.wantRecord)
			}
			// Level-triggered: applying again changes nothing.
			if again, err := tolerationPatch(got, tt.policy); err != nil || again != nil {
				t.Errorf("second patch = %+v, %v; want none", again, err)
			}
		})
	}
}

// TestTolerationRoundTrip takes pods through autonomy, a change of
// duration and the end of autonomy, and checks the originals come back.
func TestTolerationRoundTrip(t *testing.T) {
	pods := map[string]*corev1.Pod{
		"defaults":       boundPod(defaults()...),
		"none":           boundPod(),
		"one of two":     boundPod(noExecute(unreachableKey, new(int64(30)))),
		"custom forever": boundPod(noExecute(notReadyKey, nil), noExecute(unreachableKey, new(int64(10)))),
		"duplicates": boundPod(
			noExecute(unreachableKey, new(int64(10))), noExecute(unreachableKey, new(int64(20))),
			noExecute(notReadyKey, new(int64(5)))),
		"nil annotations with others": func() *corev1.Pod {
			p := boundPod(defaults()...)
			p.Annotations = map[string]string{"keep": "me"}
			return p
		}(),
	}
	for name, orig := range pods {
		t.Run(name, func(t *testing.T) {
			pod := orig
			for _, p := range []Policy{forever, oneHour, {Autonomous: true, Duration: 2 * time.Hour}, forever} {
				ops, err := tolerationPatch(pod, p)
				if err != nil {
					t.Fatal(err)
				}
				if len(ops) > 0 {
					pod = applyPatch(t, pod, ops)
				}
				want := "forever"
				if p.Duration > 0 {
					want = strconv.FormatInt(int64(p.Duration/time.Second), 10)
				}
				for _, key := range taintKeys {
					for _, s := range seconds(pod, key) {
						// At least the declared duration: a pod's own
						// longer toleration stays.
						if s != want && s != "forever" {
							if n, _ := strconv.Atoi(s); n < int(p.Duration/time.Second) {
								t.Errorf("%s: %s tolerationSeconds %s, want >= %s", p, key, s, want)
							}
						}
					}
				}
			}
			ops, err := tolerationPatch(pod, none)
			if err != nil {
				t.Fatal(err)
			}
			pod = applyPatch(t, pod, ops)
			if _, ok := pod.Annotations[AnnotationOriginalTolerations]; ok {
				t.Error("record not removed on restore")
			}
			if pod.Annotations["keep"] != orig.Annotations["keep"] {
				t.Error("other annotations changed")
			}
			// The originals are back; a toleration we had to add remains
			// (the apiserver forbids removing one) with 0, "evict at once".
			for _, key := range taintKeys {
				want := seconds(orig, key)
				if len(want) == 0 {
					want = []string{"0"}
				}
				if got := seconds(pod, key); !equal(got, want) {
					t.Errorf("%s after restore = %v, want %v", key, got, want)
				}
			}
			if again, err := tolerationPatch(pod, none); err != nil || again != nil {
				t.Errorf("patch after restore = %+v, %v; want none", again, err)
			}
		})
	}
}

func TestTolerationPatchBadRecord(t *testing.T) {
	pod := boundPod(defaults()...)
	pod.Annotations = map[string]string{AnnotationOriginalTolerations: "{not json"}
	for _, p := range []Policy{forever, none} {
		if _, err := tolerationPatch(pod, p); !errors.Is(err, errBadRecord) {
			t.Errorf("%s: err = %v, want errBadRecord", p, err)
		}
	}
}

func TestAddedTolerationRestoredAsImmediate(t *testing.T) {
	// What the taint eviction controller will do with the restored pod:
	// the added toleration with 0 seconds means eviction at once, exactly
	// as without it.
	pod := applyPatch(t, boundPod(), must(tolerationPatch(boundPod(), forever)))
	pod = applyPatch(t, pod, must(tolerationPatch(pod, none)))
	for _, tol := range pod.Spec.Tolerations {
		if tol.TolerationSeconds == nil || *tol.TolerationSeconds != 0 {
			t.Errorf("toleration %+v: want tolerationSeconds 0", tol)
		}
	}
}

func must(ops []webhook.Op, err error) []webhook.Op {
	if err != nil {
		panic(err)
	}
	return ops
}
