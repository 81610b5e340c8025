package autonomy

import (
	"errors"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestParsePolicy(t *testing.T) {
	const (
		ours   = AnnotationAutonomyDuration
		yurt   = AnnotationOpenYurtAutonomyDuration
		legacy = AnnotationOpenYurtAutonomy
	)
	tests := []struct {
		name        string
		annotations map[string]string
		want        Policy
		wantErr     bool
	}{
		{name: "none", annotations: nil, want: Policy{}},
		{name: "unrelated", annotations: map[string]string{"a": "b"}, want: Policy{}},
		{name: "ours forever", annotations: map[string]string{ours: "0"}, want: Policy{Autonomous: true, Annotation: ours}},
		{name: "ours zero with unit", annotations: map[string]string{ours: "0s"}, want: Policy{Autonomous: true, Annotation: ours}},
		{name: "ours duration", annotations: map[string]string{ours: "72h"}, want: Policy{Autonomous: true, Duration: 72 * time.Hour, Annotation: ours}},
		{name: "openyurt duration", annotations: map[string]string{yurt: "90m"}, want: Policy{Autonomous: true, Duration: 90 * time.Minute, Annotation: yurt}},
		{name: "legacy true", annotations: map[string]string{legacy: "true"}, want: Policy{Autonomous: true, Annotation: legacy}},
		{name: "legacy false", annotations: map[string]string{legacy: "false"}, want: Policy{}},
		{name: "ours beats openyurt", annotations: map[string]string{ours: "1h", yurt: "0", legacy: "true"}, want: Policy{Autonomous: true, Duration: time.Hour, Annotation: ours}},
		{name: "openyurt beats legacy", annotations: map[string]string{yurt: "2h", legacy: "true"}, want: Policy{Autonomous: true, Duration: 2 * time.Hour, Annotation: yurt}},
		{name: "openyurt beats legacy false", annotations: map[string]string{yurt: "2h", legacy: "false"}, want: Policy{Autonomous: true, Duration: 2 * time.Hour, Annotation: yurt}},
		{name: "ours invalid is not papered over", annotations: map[string]string{ours: "3 days", yurt: "1h"}, wantErr: true},
		{name: "missing unit", annotations: map[string]string{ours: "300"}, wantErr: true},
		{name: "negative", annotations: map[string]string{ours: "-1h"}, wantErr: true},
		{name: "empty", annotations: map[string]string{ours: ""}, wantErr: true},
		{name: "openyurt invalid", annotations: map[string]string{yurt: "forever"}, wantErr: true},
		{name: "legacy invalid", annotations: map[string]string{legacy: "yes please"}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parsePolicy(tt.annotations)
			if tt.wantErr {
				if !errors.Is(err, ErrInvalidAnnotation) {
					t.Fatalf("err = %v, want ErrInvalidAnnotation", err)
				}
				if got != (Policy{}) {
					t.Errorf("policy = %+v, want not autonomous", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			if got != tt.want {
				t.Errorf("policy = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestTolerationSeconds(t *testing.T) {
	tests := []struct {
		d    time.Duration
		want *int64 // nil: forever
	}{
		{0, nil},
		{time.Second, new(int64(1))},
		{300 * time.Second, new(int64(300))},
		{1500 * time.Millisecond, new(int64(2))}, // rounded up: never less than declared
		{time.Millisecond, new(int64(1))},
		{72 * time.Hour, new(int64(259200))},
	}
	for _, tt := range tests {
		got := Policy{Autonomous: true, Duration: tt.d}.tolerationSeconds()
		if (got == nil) != (tt.want == nil) || (got != nil && *got != *tt.want) {
			t.Errorf("tolerationSeconds(%v) = %v, want %v", tt.d, str(got), str(tt.want))
		}
	}
}

func TestLonger(t *testing.T) {
	tests := []struct{ a, b, want *int64 }{
		{nil, nil, nil},
		{nil, new(int64(5)), nil},
		{new(int64(5)), nil, nil},
		{new(int64(5)), new(int64(7)), new(int64(7))},
		{new(int64(300)), new(int64(60)), new(int64(300))},
		{new(int64(0)), new(int64(60)), new(int64(60))},
	}
	for _, tt := range tests {
		if got := longer(tt.a, tt.b); str(got) != str(tt.want) {
			t.Errorf("longer(%s, %s) = %s, want %s", str(tt.a), str(tt.b), str(got), str(tt.want))
		}
	}
}

// withdrawnSet is a PeerVerdicts: the nodes whose autonomy peers withdrew.
type withdrawnSet map[string]bool

func (w withdrawnSet) Withdrawn(node string) bool { return w[node] }

func TestEffectivePolicy(t *testing.T) {
	node := func(name, duration string) *corev1.Node {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
		if duration != "" {
			n.Annotations = map[string]string{AnnotationAutonomyDuration: duration}
		}
		return n
	}
	peers := withdrawnSet{"dead": true, "plain": true}
	tests := []struct {
		node          *corev1.Node
		peers         PeerVerdicts
		autonomous    bool
		wantWithdrawn bool
	}{
		{node("alive", "0"), peers, true, false},
		{node("dead", "0"), peers, false, true},
		{node("dead", "0"), nil, true, false}, // peer verdicts off
		{node("plain", ""), peers, false, false},
	}
	for _, tt := range tests {
		p, withdrawn := effectivePolicy(tt.node, tt.peers)
		if p.Autonomous != tt.autonomous || withdrawn != tt.wantWithdrawn {
			t.Errorf("%s (peers %v): autonomous %v withdrawn %v, want %v %v", tt.node.Name, tt.peers != nil, p.Autonomous, withdrawn, tt.autonomous, tt.wantWithdrawn)
		}
	}
}
