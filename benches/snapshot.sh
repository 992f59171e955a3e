#!/usr/bin/env bash
# Snapshot benchmark: imgbuild vs restic (Debian package) vs rustic (crates.io rustic-rs)
# on the same data, in one run, against two S3 servers on 127.0.0.1 (Garage 2.5 single
# node, and moto), with a raw parallel ranged GET of imgbuild's packs as the ceiling.
# Requests are counted by imgbuild itself and by each server's request log. Writes the
# `## Snapshots` section of docs/benchmarks.md (other sections are left as they are).
#
#   bash benches/snapshot.sh            # measure and update docs/benchmarks.md
#   INSTALL=1 bash benches/snapshot.sh  # first install restic (apt) and rustic (cargo)
#   SAVE=file bash benches/snapshot.sh      # also keep the measured table in file
#   MEASURED=file bash benches/snapshot.sh  # only rewrite the section from a saved run
#
# Not a timed test: numbers depend on the machine; CI does not run this.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${INSTALL:-0}" = 1 ]; then
  bash .ci/deps.sh
  command -v restic >/dev/null || { apt-get update -q && apt-get install -y -q restic; }
  command -v rustic >/dev/null || [ -x "$HOME/.cargo/bin/rustic" ] || cargo install rustic-rs --locked
fi
if [ -n "${MEASURED:-}" ]; then
  out=$MEASURED
else
  command -v moto_server >/dev/null || { echo "moto_server missing: run bash .ci/deps.sh" >&2; exit 1; }
  command -v garage >/dev/null || [ -x "$HOME/.cargo/bin/garage" ] ||
    { echo "garage missing: run bash .ci/deps.sh --tests" >&2; exit 1; }
  out=$(mktemp)
  # The restores behind a VPS's link limit the loopback (tc tbf, root only); a run
  # killed in the middle would leave it limited.
  unlimit() { tc qdisc show dev lo 2>/dev/null | grep -q tbf && tc qdisc del dev lo root || true; }
  unlimit
  trap 'rm -f "$out"; unlimit' EXIT
  IMGBUILD_BENCH_OUT="$out" cargo test --release --test snapshot_bench -- --ignored --nocapture \
    bench_snapshots_vs_restic_rustic
  if [ -n "${SAVE:-}" ]; then cp "$out" "$SAVE"; fi
fi

doc=docs/benchmarks.md
python3 - "$doc" "$out" <<'PY'
import re, sys, datetime, pathlib
doc, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).read_text()
text = doc.read_text() if doc.exists() else "# Benchmarks\n"
notes = """

Reading the numbers. imgbuild packs chunks into 32 MiB pack objects with index objects
beside them (13 objects, 31 per GB of data here, against restic's 23-24 and 55-57 per GB
and rustic's 275 and 653 per GB), and restores with merged ranged GETs. Objects and bytes
are listed from the bucket after each tool's full backup; "stored by incremental" is
what the bucket grew by.

Requests come from two places: imgbuild's own count (`requests` in its backup and
restore reports, counted on the wire), and the server's request log, one line per
request, for every tool (Garage's log at its default level, moto's werkzeug log). The
two agree for imgbuild to within the one or two LIST/GET requests made before its
counter is read. The Garage installed here is built without its `metrics` feature, so
its admin API serves no Prometheus metrics (`/metrics` answers 400); the log is what
counts. moto's request recorder (`/moto-api/recorder/*`, present in 5.2) was not used:
it writes every request body to a file, which would slow the server during the
measurement.

What the numbers say (run of 2026-12-04, third; the machine was slower in this run
than in the one before: every tool's full backup took 10-35 % longer). imgbuild's
full backup is 1.5-1.9× as fast as restic's and 1.2-1.4× rustic's; its incremental is
2.7-5.1× restic's and 2.1-3.1× rustic's (unchanged files are not read at all). For the
1 % change it stores 1.04-1.11× restic's bytes and 1.00-1.07× rustic's (0.97-1.06× and
0.95-1.18× in the run before): a changed small file costs its own bytes, its group's
other files being kept as slices of the old chunk (manifest version 5); what remains
is the content-defined chunks around the 4 MiB rewritten inside one file, whose edges
fall by each repository's chunker seed, so each tool's figure moves by a few hundred
KiB from run to run and server to server.

Restore is the target not met: 1.44× restic's throughput on Garage and 1.09× on moto
(issue 13 asks 2×; 1.60× and 0.99× in the run before), 1.23× and 0.74× rustic's, and
0.40× (Garage) and 0.60× (moto) the raw parallel ranged GET of the same packs (issue
13 asks 0.8×). The restore writes files from four writer threads while one walks the
entries and creates the names, decrypts each chunk in the buffer it was fetched into,
and keeps up to 16 ranged GETs in flight within 64 MiB. Since the run before, a data
fetch opens to at most 8 MiB: a timeline of the fetches showed one range of the
compressed logs opening to 60 MiB, taking the whole 64 MiB on its own and
decompressing on one task, so the last 0.4 s of the restore ran one fetch at a time;
the restore's peak RSS fell from 168 to 110 MiB.

What is left is CPU on 2 cores that the server shares. Measured in process (repeated
restores of this set on Garage, none deleted in between): 1.0-1.3 s of imgbuild's CPU
per restore for a wall time of 1.2-1.4 s; of imgbuild's CPU, XChaCha20-Poly1305 takes
28 %, the kernel copying into the page cache 10 %, the keyed BLAKE3 check of every chunk
7 %, zstd 5 %, copying the response bodies 4 %. The raw GET does none of that. The
spread between runs is large on this machine: the same build's CPU per restore ranged
from 1.0 to 2.5 s within one process. The root filesystem here is ext4 without a
journal, and only then does ext4 check, for every inode it allocates, whether the inode
was freed in the last 5-30 s (`recently_deleted`): restores made right after deleting
earlier restores spent 26 % of their CPU there. moto, single-threaded Python, needs
1.4-1.6 s of one core to serve the raw GET alone. restic runs with its defaults (5
connections), rustic with its own. Peak RSS is GNU time's `%M` around each process,
imgbuild's included (its backups and restore run as child processes of the test).
rustic 0.11.4 was built from crates.io (`cargo install rustic-rs --locked`, 24 minutes
here).
"""
section = ("## Snapshots\n\n"
           f"Measured {datetime.date.today()} by `bash benches/snapshot.sh` "
           "(tests/snapshot_bench.rs).\n\n" + out.strip() + "\n" + notes)
# Replace only our own section: from '## Snapshots' to the next '## ' heading.
m = re.search(r"^## Snapshots\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
if m:
    text = text[:m.start()] + section + ("\n" if text[m.end():] else "") + text[m.end():]
else:
    text = text.rstrip("\n") + "\n\n" + section
doc.write_text(text)
print(f"updated {doc}")
PY
