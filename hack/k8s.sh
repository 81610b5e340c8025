#!/usr/bin/env bash
# Builds the pinned Kubernetes toolchain into _output/k8s from the Go module
# proxy: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# kubelet, kube-proxy (v1.37.2), etcd (v3.7.0), kwok (v0.8.0), coredns,
# flanneld (v0.28.10) and flannel's CNI plugin (flannel-cni, from
# containernetworking/plugins v0.9.1).
#
# coredns is CoreDNS v1.15.0 with only the plugins a node needs, from our own
# main package in hack/tools/coredns.
#
# A binary is rebuilt only when its tools module (go.mod, go.sum and its Go
# files), the Go version or this script changed; otherwise the run takes well
# under a second.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/_output/k8s"
mkdir -p "$out"

# One fixed set of flags: changing them recompiles everything.
k8s_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v1.37.2 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37"

stamp_of() { # module dir -> fingerprint of what the binaries depend on
  # Every go.mod, go.sum and Go file of the module, its local replacements included.
  { find "$1" -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) -print0 | sort -z | xargs -0 cat; cat "$0"; go version; } | sha256sum | cut -c1-16
}

build() { # module dir, output name, package, ldflags
  local mod=$1 name=$2 pkg=$3 ldflags=$4
  local want; want=$(stamp_of "$mod")
  if [[ -x "$out/$name" && -f "$out/.$name.stamp" && "$(cat "$out/.$name.stamp")" == "$want" ]]; then
    return 0
  fi
  echo "k8s.sh: building $name ($pkg)" >&2
  local start=$SECONDS
  (cd "$mod" && CGO_ENABLED=${cgo:-0} go build ${tags:+-tags "$tags"} -ldflags "$ldflags" -o "$out/$name.tmp" "$pkg")
  mv "$out/$name.tmp" "$out/$name"
  echo "$want" > "$out/.$name.stamp"
  echo "k8s.sh: built $name in $((SECONDS - start))s" >&2
}

k8smod="$root/hack/tools/k8s"
kwokmod="$root/hack/tools/kwok"
corednsmod="$root/hack/tools/coredns"

want=${*:-"etcd kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet kube-proxy kwok coredns flanneld flannel-cni"}
for b in $want; do
  case $b in
    etcd) build "$k8smod" etcd go.etcd.io/etcd/server/v3 "-s -w" ;;
    kube-apiserver|kube-controller-manager|kube-scheduler|kubectl|kubelet|kube-proxy)
      build "$k8smod" "$b" "k8s.io/kubernetes/cmd/$b" "$k8s_ldflags" ;;
    kwok) build "$kwokmod" kwok sigs.k8s.io/kwok/cmd/kwok "-s -w" ;;
    coredns) build "$corednsmod" coredns . "-s -w" ;;
    # flanneld's UDP backend needs cgo on amd64: linked statically, with Go's own resolver and user lookup.
    flanneld) cgo=1 tags=netgo,osusergo build "$root/hack/tools/flannel" flanneld github.com/flannel-io/flannel "-s -w -linkmode=external -extldflags=-static" ;;
    flannel-cni) build "$root/hack/tools/flannel/cni" flannel-cni github.com/containernetworking/plugins/plugins/meta/flannel "-s -w" ;;
    *) echo "k8s.sh: unknown binary $b" >&2; exit 2 ;;
  esac
done
