#!/usr/bin/env bash
# Image build benchmark (not a timed test). Measures, on this machine, in one run:
#   - mmdebstrap alone with the base's package list (the floor of any cold build)
#   - imgbuild cold build (fresh base cache, --refresh-base) of profiles/services.toml
#   - imgbuild warm rebuild to a signed raw image after changing one quadlet
#   - qcow2 (zstd) build time and size
#   - mkosi (Debian package) cold and incremental builds of a comparable image, if it runs
# and rewrites the "## Image build" section of docs/benchmarks.md with the numbers.
#
# Usage: benches/image.sh            (needs root for mkosi; imgbuild itself does not)
# Env:   RUNS=3 (warm rebuilds, median reported), SKIP_COLD=1, SKIP_MKOSI=1
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=${RUNS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
W=$(mktemp -d /var/tmp/imgbuild-bench.XXXXXX)
trap 'rm -rf "$W"' EXIT

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.2f}')" "$1" "$2"; }
median() { python3 -c "import sys,statistics; print(f'{statistics.median(map(float, sys.argv[1:])):.2f}')" "$@"; }

echo "== building imgbuild (debug profile, helper stripped of debug info)"
cargo build -q --bin imgbuild
BIN=$CARGO_TARGET_DIR/debug/imgbuild
objcopy --strip-debug "$BIN" "$W/helper"
HELPER_MB=$(( $(stat -c %s "$W/helper") / 1048576 ))

# The services profile as written, secrets in the work dir, one overlay whose value we
# change between warm rebuilds (one quadlet's environment).
build() { # out [extra args]
  local out=$1; shift
  "$BIN" build services --secrets "$W/secrets" --helper "$W/helper" --out "$out" "$@" 2>"$W/last.log"
}
printf '[containers.hedgedoc.env]\nBENCH_MARK = "0"\n' > "$W/ov.toml"

packages=$(python3 - <<'PY'
import tomllib
d = tomllib.load(open("images/debian-trixie.toml", "rb"))
print(",".join([d["kernel"]] + d["packages"]))
PY
)

COLD="" ; MMDEB=""
if [ -z "${SKIP_COLD:-}" ]; then
  echo "== mmdebstrap alone (same packages, no hooks)"
  mode=(); [ "$(id -u)" = 0 ] || mode=(--mode=unshare)
  t0=$(now)
  mmdebstrap "${mode[@]}" --variant=minbase --include="$packages" trixie "$W/plain.tar" >/dev/null 2>&1
  MMDEB=$(secs "$t0" "$(now)")
  rm -f "$W/plain.tar"
  echo "   mmdebstrap: ${MMDEB}s"
  echo "== imgbuild cold (fresh cache, --refresh-base)"
  t0=$(now)
  IMGBUILD_CACHE_DIR="$W/cache" build "$W/cold.raw" --overlay "$W/ov.toml" --refresh-base
  COLD=$(secs "$t0" "$(now)")
  echo "   imgbuild cold: ${COLD}s"
  export IMGBUILD_CACHE_DIR="$W/cache"
fi

echo "== imgbuild warm rebuild after one quadlet change ($RUNS runs)"
build "$W/warm.raw" --overlay "$W/ov.toml"   # make sure base and page cache are warm
warm=()
for i in $(seq 1 "$RUNS"); do
  printf '[containers.hedgedoc.env]\nBENCH_MARK = "%s"\n' "$i" > "$W/ov.toml"
  t0=$(now)
  build "$W/warm.raw" --overlay "$W/ov.toml"
  warm+=("$(secs "$t0" "$(now)")")
  grep 'image timing' "$W/last.log" | sed 's/^/   /'
done
WARM=$(median "${warm[@]}")
echo "   warm: ${warm[*]} → median ${WARM}s"
"$BIN" verify "$W/warm.raw" --secrets "$W/secrets" >/dev/null
RAW_MB=$(( $(stat -c %s "$W/warm.raw") / 1048576 ))

echo "== qcow2 (zstd)"
t0=$(now)
build "$W/warm.qcow2" --overlay "$W/ov.toml"
QCOW_T=$(secs "$t0" "$(now)")
QCOW_CONV=$(grep -o 'qcow2 (zstd) [0-9.]*s' "$W/last.log" | grep -o '[0-9.]\+s$' | tr -d s)
QCOW_MB=$(( $(stat -c %s "$W/warm.qcow2") / 1048576 ))
echo "   qcow2 build ${QCOW_T}s (convert ${QCOW_CONV}s), ${QCOW_MB} MiB"

MK_COLD="" ; MK_INC="" ; MK_NOTE="" ; bootable=""
if [ -z "${SKIP_MKOSI:-}" ]; then
  if ! command -v mkosi >/dev/null; then
    MK_NOTE="mkosi not installed (sudo apt-get install mkosi debootstrap)"
  elif [ "$(id -u)" != 0 ]; then
    MK_NOTE="mkosi 14 needs root, loop devices and mounts; not run as non-root"
  else
    bootable=yes
    if ! grep -qw vfat /proc/filesystems && ! modprobe -q vfat 2>/dev/null; then
      # mkosi 14 mounts the ESP through a loop device; without vfat in the build
      # machine's kernel it can only build a non-bootable image (less work than ours).
      bootable=no
      MK_NOTE="build machine kernel has no vfat: mkosi ran with Bootable=no (no ESP, kernel or initrd)"
    fi
    echo "== mkosi $(mkosi --version | awk '{print $2}') (gpt_ext4, Bootable=$bootable, same packages, incremental cache)"
    M=$W/mkosi; mkdir -p "$M/mkosi.extra/etc/containers/systemd" "$M/mkosi.cache"
    cat > "$M/mkosi.conf" <<CONF
[Distribution]
Distribution=debian
Release=trixie

[Output]
Format=gpt_ext4
Bootable=$bootable
Output=image.raw

[Content]
Packages=${packages//,/ }
Cache=mkosi.cache
CONF
    q() { printf '[Container]\nImage=docker.io/library/busybox:1.36\nEnvironment=N=%s\n' "$1" > "$M/mkosi.extra/etc/containers/systemd/web.container"; }
    q 0
    t0=$(now)
    if (cd "$M" && mkosi -i -f build >"$W/mkosi.log" 2>&1); then
      MK_COLD=$(secs "$t0" "$(now)")
      q 1
      t0=$(now)
      (cd "$M" && mkosi -i -f build >>"$W/mkosi.log" 2>&1)
      MK_INC=$(secs "$t0" "$(now)")
      echo "   mkosi cold ${MK_COLD}s, incremental ${MK_INC}s"
    else
      MK_NOTE="${MK_NOTE:+$MK_NOTE; }mkosi failed: $(tail -n 3 "$W/mkosi.log" | tr '\n' ' ')"
    fi
  fi
fi
[ -n "$MK_NOTE" ] && echo "   $MK_NOTE"

ratio() { [ -n "$1" ] && [ -n "$2" ] && python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2" || echo "n/a"; }
cpu=$(nproc); load=$(cut -d' ' -f1-3 /proc/loadavg)
section=$(cat <<MD
## Image build

Measured by \`benches/image.sh\` on $(date -u +%Y-%m-%d) — $cpu cores, load average $load
at the end (other builds were running: treat small differences as noise). Profile
\`services\`, base \`images/debian-trixie.toml\`, helper binary ${HELPER_MB} MiB
(debug build, debug info stripped), raw disk ${RAW_MB} MiB (sparse).

| what | seconds | ratio |
|---|---|---|
| mmdebstrap alone (same package list, no hooks) | ${MMDEB:-not run} | |
| imgbuild cold build (fresh base cache) | ${COLD:-not run} | $(ratio "$COLD" "$MMDEB") × mmdebstrap |
| imgbuild warm rebuild after one quadlet change → signed raw (median of $RUNS) | $WARM | $(ratio "$WARM" "$MK_INC") × mkosi incremental |
| imgbuild → signed qcow2 (zstd), whole build | $QCOW_T | qcow2 step ${QCOW_CONV}s |
| mkosi cold (gpt_ext4, Bootable=${bootable:-n/a}, same packages) | ${MK_COLD:-did not run (see notes)} | $(ratio "$COLD" "$MK_COLD") (imgbuild cold / mkosi cold) |
| mkosi incremental after one quadlet change | ${MK_INC:-did not run} | |
| reference: mkosi 14 incremental as quoted in issue 3 (not measured here) | ${MKOSI_REF_INC:-6.5} | warm rebuild = $(ratio "$WARM" "${MKOSI_REF_INC:-6.5}") × that |

mkosi notes: ${MK_NOTE:-none}.

qcow2 size: ${QCOW_MB} MiB. imgbuild needs no root, loop devices or mounts (mkosi 14
needs all three). Where a warm rebuild goes (last run): $(grep -o 'image timing: .*' "$W/last.log" | sed 's/image timing: //; s/, qcow2.*//' || true).
MD
)
python3 - "$section" <<'PY'
import re, sys, pathlib
p = pathlib.Path("docs/benchmarks.md")
text = p.read_text() if p.exists() else "# Benchmarks\n"
sec = sys.argv[1].rstrip() + "\n"
pat = re.compile(r"^## Image build\n.*?(?=^## |\Z)", re.S | re.M)
text = pat.sub(lambda m: sec + "\n", text) if pat.search(text) else text.rstrip() + "\n\n" + sec
p.write_text(text)
PY
echo "== wrote the Image build section of docs/benchmarks.md"
