#!/usr/bin/env bash
# Installs what the real-kubelet e2e tests (test/e2e/kubeletsmoke and the
# offline suites) need on a Debian machine: containerd with its ctr client,
# runc, the CNI plugins (bridge, host-local, loopback in /usr/lib/cni),
# iproute2 (the framework deletes the test's bridge with `ip link`) and
# nftables (kube-proxy's nftables mode runs nft, and the framework deletes its
# tables with it). kube-proxy needs no conntrack binary: it clears conntrack
# entries over netlink. gcc and libc6-dev build flanneld (static, with cgo)
# in hack/k8s.sh, which is why `make test` runs this first.
#
# Idempotent: a machine that has everything is left alone, and apt-get update
# runs only when a package is missing. Run as root it installs what is
# missing; run as anyone else it prints what is missing and exits 1, since
# those tests need root anyway.
#
# It installs packages only: it never starts, enables or configures the
# system containerd. The tests start their own with fresh state directories.
set -euo pipefail

# package -> a file it provides, which is how we tell it is installed (a
# binary on PATH can come from somewhere else, such as a static tarball).
declare -A provides=(
  [containerd]=/usr/bin/containerd
  [runc]=/usr/sbin/runc
  [containernetworking-plugins]=/usr/lib/cni/bridge
  [iproute2]=/usr/sbin/ip
  [nftables]=/usr/sbin/nft
  # flanneld links statically with cgo (hack/k8s.sh): gcc and glibc's libc.a.
  [gcc]=/usr/bin/gcc
  [libc6-dev]=/usr/lib/x86_64-linux-gnu/libc.a
)

missing=()
for pkg in containerd runc containernetworking-plugins iproute2 nftables gcc libc6-dev; do
  # ctr ships in Debian's containerd package; check both.
  if [[ $pkg == containerd && ! -x /usr/bin/ctr ]] || [[ ! -e ${provides[$pkg]} ]]; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install-node-deps: containerd, runc, CNI plugins, iproute2, nftables, gcc and libc6-dev are installed"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "install-node-deps: missing packages: ${missing[*]}" >&2
  echo "install-node-deps: run as root (sudo $0), or: apt-get install ${missing[*]}" >&2
  exit 1
fi

if ! command -v apt-get >/dev/null; then
  echo "install-node-deps: missing packages: ${missing[*]}, and no apt-get to install them with" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Install from the current package lists; refresh them only when apt cannot
# find a candidate (a fresh image ships without lists).
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian's postinst may start the system containerd where an init system
# runs; the tests never use it (their own containerd has its own socket).

for pkg in "${missing[@]}"; do
  if [[ ! -e ${provides[$pkg]} ]]; then
    echo "install-node-deps: $pkg installed but ${provides[$pkg]} is missing" >&2
    exit 1
  fi
done
echo "install-node-deps: installed ${missing[*]}"
