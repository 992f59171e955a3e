#!/usr/bin/env bash
# Installs every tool imgbuild and its tests use on a Debian 12 / Ubuntu machine.
# Idempotent; safe to run again. Uses sudo when not root.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive

. /etc/os-release
apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
backports=()
if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
  # qemu-utils may already come from bookworm-backports, so qemu-system-x86 must too.
  # The backports source is derived from the machine's own Debian source at run time.
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
      awk 'BEGIN{RS=""; ORS="\n\n"} /Suites:[^\n]*bookworm( |$|\n)/ && !done {sub(/Suites:[^\n]*/, "Suites: bookworm-backports"); print; done=1}' \
        /etc/apt/sources.list.d/debian.sources | $SUDO tee /etc/apt/sources.list.d/imgbuild-backports.sources >/dev/null
    else
      mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
      echo "deb ${mirror} bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/imgbuild-backports.list >/dev/null
    fi
  fi
  backports=(-t bookworm-backports)
fi

need=()
for pkg in nftables systemd e2fsprogs btrfs-progs libarchive13 dosfstools mtools busybox-static openssh-client \
           python3-pip python3-venv curl ca-certificates openssl zstd time; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
bp_need=()
for pkg in mmdebstrap qemu-system-x86 ovmf qemu-utils; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || bp_need+=("$pkg")
done
# Disk images: `mkfs.ext4 -d rootfs.tar` (populate from a tarball) needs e2fsprogs >= 1.47.1;
# Debian 12 has 1.47.0, bookworm-backports 1.47.2.
e2v=$(dpkg-query -W -f='${Version}' e2fsprogs 2>/dev/null || echo 0)
dpkg --compare-versions "$e2v" ge 1.47.1 || bp_need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ] || [ ${#bp_need[@]} -gt 0 ]; then
  $SUDO apt-get update -q
  [ ${#need[@]} -gt 0 ] && $SUDO apt-get install "${apt_opts[@]}" --no-install-recommends "${need[@]}"
  [ ${#bp_need[@]} -gt 0 ] && $SUDO apt-get install "${apt_opts[@]}" --no-install-recommends "${backports[@]}" "${bp_need[@]}"
fi

# promtool and amtool check rendered monitoring configs; the two-host QEMU test packs
# prometheus, alertmanager and node-exporter into OCI images (registries are out of
# reach). Only the binaries are unpacked from Debian's packages: installing them would
# start the daemons listening on every address.
tools=/usr/local/lib/imgbuild-tools
if ! command -v promtool >/dev/null 2>&1 || ! command -v amtool >/dev/null 2>&1 \
   || [ ! -x "$tools/usr/bin/prometheus-node-exporter" ]; then
  work=$(mktemp -d)
  (cd "$work" && apt-get download prometheus prometheus-alertmanager prometheus-node-exporter >/dev/null)
  $SUDO mkdir -p "$tools"
  for deb in "$work"/*.deb; do $SUDO dpkg-deb -x "$deb" "$tools"; done
  $SUDO ln -sf "$tools/usr/bin/promtool" /usr/local/bin/promtool
  $SUDO ln -sf "$tools/usr/bin/amtool" /usr/local/bin/amtool
  rm -rf "$work"
fi

# Python tools for tests: the Ignition JSON-schema validator and the moto S3 server.
if ! python3 -c 'import jsonschema, moto, flask, flask_cors' 2>/dev/null; then
  pip_flags=()
  python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages && pip_flags+=(--break-system-packages)
  python3 -m pip install -q "${pip_flags[@]}" 'jsonschema>=4' 'moto[s3]==5.2.5' flask flask-cors
fi
# The by-hand restore script of docs/snapshot-format.md, which tests/python_restore.rs
# runs against real buckets: its crypto, hashing and zstd libraries, and boto3.
if [ "${1:-}" = "--tests" ] && ! python3 -c 'import boto3, blake3, nacl, zstandard, cryptography' 2>/dev/null; then
  pip_flags=()
  python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages && pip_flags+=(--break-system-packages)
  python3 -m pip install -q "${pip_flags[@]}" 'pynacl==1.6.2' 'blake3==1.0.11' 'zstandard==0.25.0' 'cryptography==48.0.0' boto3
fi
# Garage 2.5, the S3 server self-hosters run, for the compatibility tests (round trip,
# Object Lock check, kill -9). Only the tests need it, and it takes ~15-20 min to
# build once, so only `deps.sh --tests` installs it; cargo keeps the binary after.
if [ "${1:-}" = "--tests" ] && ! garage --version 2>/dev/null | grep -q '2\.5\.'; then
  echo "imgbuild: building Garage 2.5 for the tests (once; ~15-20 min)"
  cargo install -q garage --version 2.5.0 --locked --no-default-features \
    --features bundled-libs,lmdb,sqlite
fi
echo "imgbuild: dependencies installed"
