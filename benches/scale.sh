#!/usr/bin/env bash
# Snapshots at scale (issue 13): a volume of 2,000,000 small files on Garage 2.5
# (single node on 127.0.0.1). Full backup, incremental backup after a 1 % change, prune,
# check --read-data and restore, each a child process whose peak RSS GNU time reads;
# every peak must stay at or under 256 MiB and the restored tree must be identical.
# Then a volume of 100 sparse files of 1 GiB (100 GiB, 400 MiB of data) the same way.
# Writes the `## Snapshots at scale` section of docs/benchmarks.md.
#
# restic (Debian's) and rustic (crates.io rustic-rs) run the same steps on the same
# tree and Garage, for comparison.
#
#   bash benches/scale.sh                         # 2,000,000 files (about an hour,
#                                                 # about 30 GB of free disk)
#   INSTALL=1 bash benches/scale.sh               # first install restic and rustic
#   IMGBUILD_SCALE_FILES=500000 bash benches/scale.sh
#   IMGBUILD_SCALE_PEERS=0 bash benches/scale.sh  # imgbuild alone (still needs both installed)
#   IMGBUILD_SCALE_PEERS=restic bash benches/scale.sh  # imgbuild and one peer (or =rustic)
#   SAVE=dir bash benches/scale.sh       # also keep the measured tables in dir
#   MEASURED=dir bash benches/scale.sh   # only rewrite the section from a saved run
#
# Not a timed test: numbers depend on the machine; CI runs the 20k/200k growth test
# (tests/snapshot_scale.rs) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v garage >/dev/null || [ -x "$HOME/.cargo/bin/garage" ] ||
  { echo "garage missing: run bash .ci/deps.sh --tests" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "GNU time missing: apt-get install time" >&2; exit 1; }
if [ "${INSTALL:-0}" = 1 ]; then
  command -v restic >/dev/null || { apt-get update -q && apt-get install -y -q restic; }
  command -v rustic >/dev/null || [ -x "$HOME/.cargo/bin/rustic" ] || cargo install rustic-rs --locked
fi
command -v restic >/dev/null || { echo "restic missing: apt-get install restic" >&2; exit 1; }
command -v rustic >/dev/null || [ -x "$HOME/.cargo/bin/rustic" ] ||
  { echo "rustic missing: cargo install rustic-rs --locked" >&2; exit 1; }
if [ -n "${MEASURED:-}" ]; then
  out=$MEASURED/2m.md out2=$MEASURED/100g.md
else
  out=$(mktemp) out2=$(mktemp)
  trap 'rm -f "$out" "$out2"' EXIT
  IMGBUILD_SCALE_OUT_TABLE="$out" cargo test --release --test snapshot_scale -- --ignored \
    --nocapture --exact scale_2m_files
  IMGBUILD_SCALE_OUT_TABLE="$out2" cargo test --release --test snapshot_scale -- --ignored \
    --nocapture --exact scale_100g_sparse
  if [ -n "${SAVE:-}" ]; then mkdir -p "$SAVE" && cp "$out" "$SAVE/2m.md" && cp "$out2" "$SAVE/100g.md"; fi
fi

python3 - docs/benchmarks.md "$out" "$out2" <<'PY'
import re, sys, datetime, pathlib
doc = pathlib.Path(sys.argv[1])
table = "\n\n".join(pathlib.Path(p).read_text().strip() for p in sys.argv[2:])
text = doc.read_text()
notes = """

How memory stays bounded. The scan walks the tree lazily (only the open directories'
name lists are held), files are read and chunked a segment at a time, and each volume's
entry list is itself a chunked stream in packs of its own (manifest version 4), so no
operation holds the list: backup writes it as it goes, restore and check read it chunk
by chunk (twice for restore: checked in full before the first byte is written, then
applied; each fetch holds at most 4 MiB of entries), prune never reads it. What remains
is proportional to the data in flight (packs being filled and uploaded, ranged GETs
being written), not to the file count.

Why a spread change is cheap. Small files are grouped by entry count and a keyed path
anchor (never by size), entry-list chunks end after path-anchored lines, and a group
in which some files changed keeps the others as slices of its old chunk (manifest
version 5): the incremental backup after changing every hundredth file uploads the
changed files' bytes (0.3 MB), the entry chunks holding a changed line (377 MB of the
427 MB list, since every directory of a thousand files has ten changes, stored in about
23 MB) and the manifest (about 9 MB for 2 million files, as every backup).

What the run of 2026-12-05 (imgbuild and restic in the same run; rustic left out, an
hour less: its numbers from 2026-12-04 are below) shows against the targets of issue
13. Every tool's full backup now starts from a dropped page cache (`echo 3 >
/proc/sys/vm/drop_caches`), as the first backup of a data directory written long
before does: left to this machine's reclaim (a VM whose host takes back guest memory;
DAMON runs in the guest), the same imgbuild full backup had taken anything from 36 to
203 s depending on how much of the just-written tree was still cached.
- **Memory.** Every imgbuild peak is at most 196 MiB (target 256 MiB). restic needed
  up to 566 MiB to back up the 2M-file tree and 1616 MiB to restore it.
- **Incremental bytes: met.** 31.4 MiB stored for the spread 1 % change, against
  restic's 92.4 MiB (0.34×).
- **Incremental time: met.** 13.4 s, against restic's 59.1 s.
- **Restore: met.** 54.2 s, against restic's 127.0 s (2.34× its speed, target 2×).
  Every restored tree was identical.
- **Full backup from a cold cache:** 64.1 s, against restic's 302.2 s (4.7×). The
  backup now tells the kernel which files it will read next, up to 256 files or
  32 MiB ahead (`POSIX_FADV_WILLNEED` from a thread of its own,
  src/snapshot/fsio/readahead.rs), so a cold cache is read many files at a time rather
  than one: on 200,000 of these files a cold backup took 4.2 s with the hints and
  22.4 s without (warm: 3.4 s and 4.2 s). The run of 2026-12-05 before this change,
  from a partly warm cache, took 108.7 s.
- The 100 GiB sparse volume: full backup 3.7 s from a cold cache (134 MiB), the 1 %
  change stored 4.3 MiB, check 1.2 s, restore 1.1 s (108 MiB).
- The run needs about 30 GB free: the source tree, one restore and the repositories
  of 2 GB each; 2 million files take 8 GB of 4 KiB blocks per copy.

The run of 2026-12-04 with all three tools (before AES-256-GCM chunks, `O_DIRECT`
restores and the read-ahead; full backups from whatever the cache held): imgbuild full
backup 48.8 s, nothing changed 16.4 s, 1 % change 18.7 s storing 31.3 MiB, restore
62.7 s, every peak at most 197 MiB; restic 183.0 s, 66.9 s, 77.5 s storing 96.9 MiB,
restore 133.0 s (up to 1607 MiB); rustic 525.8 s, 75.5 s, 90.5 s storing 96.1 MiB,
restore 111.4 s (up to 1325 MiB).
"""
section = ("## Snapshots at scale\n\n"
           f"Measured {datetime.date.today()} by `bash benches/scale.sh` "
           "(tests/snapshot_scale.rs).\n\n" + table.strip() + "\n" + notes)
m = re.search(r"^## Snapshots at scale\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
if m:
    text = text[:m.start()] + section + ("\n" if text[m.end():] else "") + text[m.end():]
else:
    m = re.search(r"^## Crash-consistent", text, flags=re.M)
    at = m.start() if m else len(text)
    text = text[:at] + section + "\n" + text[at:]
doc.write_text(text)
print(f"updated {doc}")
PY
