#!/usr/bin/env bash
# Fill the wheel folder that benchmarks/gpu_check.py installs from on a GPU machine without network
# (docs/performance.md). Run from the repository root, where pip reaches PyPI:
#
#   benchmarks/fetch_gpu_wheels.sh [--python-version 3.12] [--dest .whl] [--max-mib 24]
#
# Every pin of benchmarks/gpu_wheels.txt is downloaded as a wheel for CPython --python-version on
# manylinux x86_64 (no dependencies: the list names each one). A package published only as a source
# archive (fvcore, iopath) is built into a wheel here, and accepted only if it is pure Python
# (py3-none-any), so it installs on any Python. The folder is git-ignored; it travels to the GPU
# machine as a `carry` path, and the working tree plus carried paths must stay under 64 MiB, hence
# --max-mib. PIP (default: "python3 -m pip") picks the pip to run.
set -euo pipefail

PYVER=3.12
DEST=.whl
MAX_MIB=24
PIP=${PIP:-python3 -m pip}
REQS="$(dirname "$0")/gpu_wheels.txt"

while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER="$2"; shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    --max-mib) MAX_MIB="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "fetch_gpu_wheels.sh: unknown argument '$1' (use --python-version X.Y, --dest DIR, --max-mib N)" >&2; exit 2 ;;
  esac
done
if ! [[ "$PYVER" =~ ^3\.[0-9]+$ ]]; then
  echo "fetch_gpu_wheels.sh: --python-version '$PYVER' is not X.Y (the GPU machine's python3, e.g. 3.12)" >&2; exit 2
fi
CP="cp${PYVER/./}"

rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done

grep -v '^\s*#' "$REQS" | grep -v '^\s*$' | while read -r req; do
  if ! $PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      "${PLATFORMS[@]}" -d "$DEST" "$req" 2>/dev/null; then
    # no wheel on PyPI: build one from the source archive (pure Python, checked below)
    $PIP wheel -q --no-deps --no-binary=:all: -w "$DEST" "$req"
  fi
done

status=0
for whl in "$DEST"/*.whl; do
  tag=$(basename "$whl" .whl | awk -F- '{print $(NF-2)"-"$(NF-1)"-"$NF}')
  case "$tag" in
    py3-none-any|py2.py3-none-any|"$CP"-*manylinux*x86_64*|"$CP"-abi3-*|cp3*-abi3-*manylinux*x86_64*) ;;
    *) echo "fetch_gpu_wheels.sh: $(basename "$whl") does not install on CPython $PYVER x86_64 (tag $tag)" >&2; status=1 ;;
  esac
done

# one version of each package, or pip refuses the whole install there
dups=$(ls "$DEST" | awk -F- '{print tolower($1)}' | sort | uniq -d)
if [ -n "$dups" ]; then echo "fetch_gpu_wheels.sh: several versions of: $dups" >&2; status=1; fi

echo "wheels for CPython $PYVER (x86_64) in $DEST:"
ls -l "$DEST" | awk 'NR > 1 {printf "  %8.1f KiB  %s\n", $5 / 1024, $9}'
total=$(du -sb "$DEST" | cut -f1)
awk -v t="$total" -v m="$MAX_MIB" 'BEGIN {printf "  total %.2f MiB (limit %s MiB)\n", t / 1048576, m}'
if [ "$total" -gt $((MAX_MIB * 1048576)) ]; then
  echo "fetch_gpu_wheels.sh: $DEST is over $MAX_MIB MiB: the working tree plus carried paths must stay under 64 MiB" >&2
  status=1
fi
exit $status
