package framework

import (
	"context"
	"fmt"
	"strconv"
	"strings"
)

// Metric returns the sum of the samples of metric name on outpost's
// /metrics whose labels match every one of match (see SumMetric).
func (o *Outpost) Metric(name string, match ...string) (float64, error) {
	text, err := GetOK(context.Background(), nil, o.AdminURL+"/metrics")
	if err != nil {
		return 0, fmt.Errorf("reading outpost's metrics: %w", err)
	}
	return SumMetric(string(text), name, match...)
}

// SumMetric returns the sum of the samples of metric name in a Prometheus
// text exposition whose labels match every one of match: `label=value`
// (or `label="value"`) for equal, `label!=value` for different.
func SumMetric(text, name string, match ...string) (float64, error) {
	sum := 0.0
	for line := range strings.Lines(text) {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), name)
		if !ok || rest == "" || (rest[0] != '{' && rest[0] != ' ') {
			continue
		}
		labels, value := "", rest
		if rest[0] == '{' {
			end := strings.LastIndex(rest, "}")
			if end < 0 {
				return 0, fmt.Errorf("metric line %q: no closing brace", line)
			}
			labels, value = rest[1:end], rest[end+1:]
		}
		if !labelsMatch(labels, match) {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %w", line, err)
		}
		sum += v
	}
	return sum, nil
}

func labelsMatch(labels string, match []string) bool {
	have := map[string]string{}
	for _, kv := range strings.Split(labels, ",") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			have[k] = strings.Trim(v, `"`)
		}
	}
	for _, m := range match {
		if k, v, ok := strings.Cut(m, "!="); ok {
			if have[k] == strings.Trim(v, `"`) {
				return false
			}
			continue
		}
		k, v, _ := strings.Cut(m, "=")
		if have[k] != strings.Trim(v, `"`) {
			return false
		}
	}
	return true
}
