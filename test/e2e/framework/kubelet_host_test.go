package framework

import "testing"

func TestUnescapeMountPath(t *testing.T) {
	for in, want := range map[string]string{
		"/tmp/plain":          "/tmp/plain",
		`/tmp/a\040b`:         "/tmp/a b",
		`/tmp/tab\011x\134y`:  "/tmp/tab\tx\\y",
		`/tmp/end\040`:        "/tmp/end ",
		`/tmp/not\09octal\04`: `/tmp/not\09octal\04`,
	} {
		if got := unescapeMountPath(in); got != want {
			t.Errorf("unescapeMountPath(%q) = %q, want %q", in, got, want)
		}
	}
}
