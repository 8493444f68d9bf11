#!/usr/bin/env bash
# Builds the test bed: the vcsim launcher (Go, against Debian's
# golang-github-vmware-govmomi-dev in GOPATH mode, fully offline) and the
# stand-in VDDK in build/vddk/lib64, laid out like VMware's distribution
# (make -C standin, then make -C mntapi; see standin/README.md). With IVDFS_TEST_VDDK set
# (an unpacked VMware VDDK), also the real-VDDK tier's bridge and image tool (bridge/Makefile).
# Idempotent; a no-op when everything is up to date. Called by scripts/setup.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="$here/build"
mkdir -p "$build"

vcsim="$build/vcsim"
# Rebuild when any source of the launcher is newer than the binary.
stale=0
[[ -x "$vcsim" ]] || stale=1
for src in "$here"/vcsim/*.go; do
    [[ "$src" -nt "$vcsim" ]] && stale=1
done
if [[ $stale == 1 ]]; then
    govmomi=/usr/share/gocode/src/github.com/vmware/govmomi
    if [[ ! -d "$govmomi/simulator" ]]; then
        echo "build.sh: $govmomi/simulator missing; apt-get install golang-github-vmware-govmomi-dev" >&2
        exit 1
    fi
    # The go build cache makes rebuilds take ~1 s instead of ~30 s; keep the
    # user's if it is writable, else a private one under build/.
    cache="${GOCACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/go-build}"
    if ! mkdir -p "$cache" 2>/dev/null || [[ ! -w "$cache" ]]; then
        cache="$build/.gocache"
    fi
    echo "build.sh: building $vcsim (about 30 s the first time)" >&2
    (
        cd "$here/vcsim"
        # GOPATH mode: no go.mod, no module proxy, no network.
        GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= GOPROXY=off GOCACHE="$cache" \
            go build -o "$vcsim.tmp" .
    )
    mv -f "$vcsim.tmp" "$vcsim"
fi

if [[ -f "$here/standin/Makefile" ]]; then
    make -C "$here/standin"
fi
# The stand-in libvixMntapi links against the stand-in disk library built just above.
if [[ -f "$here/mntapi/Makefile" ]]; then
    make -C "$here/mntapi"
fi
# The real-VDDK tier: only against a VDDK the user unpacked (never part of this repository).
if [[ -n "${IVDFS_TEST_VDDK:-}" ]]; then
    make -C "$here/bridge" VDDK="$IVDFS_TEST_VDDK"
fi
