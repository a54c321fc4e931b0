#!/usr/bin/env bash
# What the GPU machine needs to run the real tier (Ray) for bench/e2e.py, in the ignored folder .whl/
# (at most 64 MiB travels per call; measured total below ~40 MiB).
#
#   bash bench/gpu_bundle.sh            # here (needs the PyPI registry), once
#
# The GPU machine (H200: Python 3.12, torch, triton, transformers, pyarrow, xxhash, numpy; no ray,
# zstandard, nixl) then installs it offline into /tmp/kvtier-py with bench/gpu_bundle.sh --install.
# The lead's call there (carry .whl; TRITON_INTERPRET=0 overrides tests/conftest.py's CPU default):
#
#   bash bench/gpu_bundle.sh --install && export PYTHONPATH=$PWD:/tmp/kvtier-py RAY_AUTH_MODE=disabled \
#     TRITON_INTERPRET=0 && python -m pytest -q -rs tests/kvtier/test_device_rule.py \
#     tests/kvtier/test_pipeline.py tests/kvtier/test_hot.py && KVTIER_LOAD_SLICE_MIB=8 python bench/e2e.py \
#     --device cuda --lengths 4096,16384 --tiers hot,warm,cold --codecs none,rot4,kivi4,q1+zstd --reps 5 \
#     --long-from 16384 --long-reps 3 --warm-bytes 24GiB --out $OUT/e2e-h200.md
#
# Ray 2.60's cp312 wheel is 79 MB; without ray/jars (a 33 MB Java jar), rllib/tune/train/data and
# *.js.map it is 24 MB as tar.xz (ENVIRONMENT.md, "The GPU machine"). A tar keeps the exec bits of
# raylet and gcs_server, which unpacking the wheel with Python's zipfile would drop.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl
TARGET=${KVTIER_PY:-/tmp/kvtier-py}

if [[ "${1:-}" == "--install" ]]; then
    mkdir -p "$TARGET"
    python -m pip install --quiet --no-index --no-deps --target "$TARGET" "$OUT"/*.whl 2>/dev/null || \
        for w in "$OUT"/*.whl; do python -m zipfile -e "$w" "$TARGET"; done  # no pip there: a wheel is a zip
    tar -xJf "$OUT"/ray-2.60.0-cp312-trimmed.tar.xz -C "$TARGET"
    echo "installed into $TARGET: use PYTHONPATH=$PWD:$TARGET"
    exit 0
fi

PIP=${PIP:-.venv/bin/python -m pip}
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
FLAGS="--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64"
$PIP download --quiet $FLAGS -d "$tmp/ray" ray==2.60.0
# Ray core's own requirements that the GPU machine lacks (it has packaging, pyyaml, requests, filelock
# through torch/transformers), zstandard for the +zstd codecs, pytest for the CUDA tests, and xxhash 4.1 (it
# releases the GIL while hashing > 64 KiB, so the get's checksums run in parallel threads; the machine's own
# xxhash is of unknown version)
$PIP download --quiet $FLAGS -d "$OUT" jsonschema jsonschema-specifications referencing rpds-py attrs \
    msgpack protobuf click zstandard pytest pluggy iniconfig pygments xxhash==4.1.0
rm -f "$OUT"/ray-*.whl
(cd "$tmp/ray" && unzip -q ray-2.60.0-*.whl -d unpacked)
tar -C "$tmp/ray/unpacked" --exclude='ray/jars' --exclude='ray/rllib' --exclude='ray/tune' --exclude='ray/train' \
    --exclude='ray/data' --exclude='*.js.map' -cJf "$OUT"/ray-2.60.0-cp312-trimmed.tar.xz .
du -ch "$OUT"/* | tail -n 20
