#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels a lent GPU machine lacks (tools/gpu_wheels.txt)
# into .whl/ for CPython 3.12 on x86-64 Linux, the GPU image's Python. Then carry `.whl`
# with the device call and start it with tools/gpu_session.sh, which installs them.
#
#   tools/gpu_wheels.sh            (or: make gpu-wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${DEST:-.whl}"
PY="${PYTHON:-python3}"
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' tools/gpu_wheels.txt | grep -v '^$')
mkdir -p "$DEST"
# pip matches manylinux tags exactly, so name each glibc level a wheel may be built for.
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform any -d "$DEST" "${wanted[@]}"
count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#wanted[@]}" ]; then
  echo "error: $DEST holds $count wheels for ${#wanted[@]} packages in tools/gpu_wheels.txt;" \
       "empty $DEST and run this again (two versions of one package stop the install)" >&2
  exit 2
fi
echo "$count wheels in $DEST ($(du -sh "$DEST" | cut -f1)); carry \".whl\" with the device call"
