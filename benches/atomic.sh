#!/usr/bin/env bash
# Crash-consistent snapshot benchmark (issue "data you can bet on"): on a real btrfs
# (loop device; needs root and btrfs-progs), ~1 GiB in four volumes, one written to
# during the backup. Prints the time the atomic snapshot takes, the backup's duration,
# and the downtime of a `stop` volume with the atomic snapshot against stopping it for
# the whole backup (the approach of the backup scripts imgbuild replaces). The downtime
# of `stop` units in a booted guest (real podman containers under TCG) is printed by
# the QEMU restore test (`cargo test --release --test qemu_restore -- --nocapture`).
#
#   sudo bash benches/atomic.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mkfs.btrfs >/dev/null || { echo "btrfs-progs missing: run bash .ci/deps.sh" >&2; exit 1; }
out=$(cargo test --release --test atomic_snapshot -- --ignored --nocapture bench_atomic_snapshot_downtime 2>&1) \
  || { echo "$out" >&2; exit 1; }
echo "$out" | grep '^BENCH'
