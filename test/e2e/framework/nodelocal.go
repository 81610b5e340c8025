package framework

import (
	"context"
	"crypto/tls"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// AddNodeLocalAddress puts a link-local address of the test's own on lo,
// for outpost's --node-local-address (this kernel has no dummy link type),
// and removes it when t ends. It is picked in 169.254.first.0 to
// 169.254.(first+count-1).255, so that suites running at once choose from
// ranges of their own; 169.254.169.254, the cloud metadata address, is
// never picked.
func AddNodeLocalAddress(t *testing.T, first, count int) netip.Addr {
	t.Helper()
	taken := map[netip.Addr]bool{netip.MustParseAddr("169.254.169.254"): true}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil {
				taken[p.Addr()] = true
			}
		}
	}
	for range 20 {
		ip := netip.AddrFrom4([4]byte{169, 254, byte(first + rand.IntN(count)), byte(1 + rand.IntN(254))})
		if taken[ip] {
			continue
		}
		if out, err := exec.Command("ip", "addr", "add", ip.String()+"/32", "dev", "lo").CombinedOutput(); err != nil {
			t.Fatalf("adding %s to lo: %v: %s", ip, err, out)
		}
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "addr", "del", ip.String()+"/32", "dev", "lo").CombinedOutput(); err != nil {
				t.Errorf("removing %s from lo: %v: %s", ip, err, out)
			}
		})
		return ip
	}
	t.Fatal("no free link-local address")
	return netip.Addr{}
}

// TolerationsOf returns the NoExecute tolerationSeconds of a pod for the
// unreachable and not-ready taints as "unreachable,not-ready": "forever"
// for no limit, "none" for no toleration.
func TolerationsOf(pod *corev1.Pod) string {
	get := func(key string) string {
		for _, t := range pod.Spec.Tolerations {
			if t.Key == key && t.Effect == corev1.TaintEffectNoExecute {
				if t.TolerationSeconds == nil {
					return "forever"
				}
				return strconv.FormatInt(*t.TolerationSeconds, 10)
			}
		}
		return "none"
	}
	return get(corev1.TaintNodeUnreachable) + "," + get(corev1.TaintNodeNotReady)
}

// WaitServing waits up to a minute until addr serves a certificate of the
// cluster CA for every one of names, as in-cluster clients verify it (an
// outpost whose serving CSR was approved), and returns how long that took.
func (c *ControlPlane) WaitServing(t *testing.T, addr string, names ...string) time.Duration {
	t.Helper()
	roots := CertPool(t, c.CAFile)
	took, err := Poll(t.Context(), 200*time.Millisecond, time.Minute, func(context.Context) (bool, string) {
		for _, name := range names {
			conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, ServerName: name})
			if err != nil {
				return false, fmt.Sprintf("as %s: %v", name, err)
			}
			conn.Close()
		}
		return true, ""
	})
	if err != nil {
		t.Fatalf("outpost at %s: %v", addr, err)
	}
	return took
}
