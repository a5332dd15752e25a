#!/usr/bin/env bash
# README's test command: installs what the tests need on a fresh machine, then runs them all.
#   - Debian data packages: Fashion-MNIST (IDX files) and the King James Bible (text corpus)
#   - Kiln with its test extras: PyTorch 2.13 CPU (the oracle), onnx, onnxruntime and
#     onnxscript (ONNX export/import checks), llvmlite (kiln.jit's native kernels; the tests
#     also run the numpy paths they replace), and scikit-learn (digits)
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! dpkg -s dataset-fashion-mnist sword-text-kjv >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist sword-text-kjv >/dev/null
  fi
fi
python -m pip install --quiet -e ".[test,data]"
python -m pytest -p no:cacheprovider "$@"
