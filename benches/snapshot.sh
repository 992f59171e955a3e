#!/usr/bin/env bash
# Snapshot benchmark: imgbuild vs restic (Debian package) vs rustic (crates.io rustic-rs)
# against the same moto S3 server on 127.0.0.1, with raw parallel GetObject as the
# ceiling. Writes the `## Snapshots` section of docs/benchmarks.md (other sections are
# left as they are).
#
#   bash benches/snapshot.sh            # measure and update docs/benchmarks.md
#   INSTALL=1 bash benches/snapshot.sh  # first install restic (apt) and rustic (cargo)
#
# Not a timed test: numbers depend on the machine; CI does not run this.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${INSTALL:-0}" = 1 ]; then
  bash .ci/deps.sh
  command -v restic >/dev/null || { apt-get update -q && apt-get install -y -q restic; }
  command -v rustic >/dev/null || [ -x "$HOME/.cargo/bin/rustic" ] || cargo install rustic-rs --locked
fi
command -v moto_server >/dev/null || { echo "moto_server missing: run bash .ci/deps.sh" >&2; exit 1; }

out=$(mktemp)
trap 'rm -f "$out"' EXIT
IMGBUILD_BENCH_OUT="$out" cargo test --release --test snapshot_bench -- --ignored --nocapture \
  bench_snapshots_vs_restic_rustic

doc=docs/benchmarks.md
python3 - "$doc" "$out" <<'PY'
import re, sys, datetime, pathlib
doc, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).read_text()
text = doc.read_text() if doc.exists() else "# Benchmarks\n"
notes = """
Reading the numbers: moto spends most of its time per request, so restore time follows
the number of objects fetched. imgbuild stores one object per chunk (~650 objects
here); restic and rustic pack chunks into a few large pack files, which is why rustic
can restore faster than a raw GET of imgbuild's objects. Runs differ a lot on this
2-core machine (across the runs made while developing, restic's restore took 2.4-4.5 s
and imgbuild's 2.3-3.6 s, some with another build running; the chunker seed and the
small-file anchors also change with each run's fresh key). imgbuild's incremental backup is fast because unchanged files
(same path, size, mtime, ctime, inode) are not read at all; it stores about as much as
restic (1.0-1.2×) because small-file groups (~300 KB) are coarser than restic's
per-file chunks. Packing chunks into larger objects is the next step for restore
speed on request-bound servers. Peak RSS is measured with GNU time (`%M`) around
each restore process.
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
