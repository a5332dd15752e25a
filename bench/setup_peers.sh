#!/usr/bin/env bash
# One command: a virtual environment per benchmark peer under bench/.venvs/ (git-ignored).
#
#   bash bench/setup_peers.sh            # all peers: torch, tf, jax
#   bash bench/setup_peers.sh jax        # only the named ones
#
#   torch  torch==2.13.0+cpu (the CPU wheel, never the CUDA build), numpy, threadpoolctl,
#          matplotlib (the runner draws its plot with this interpreter)
#   tf     tensorflow-cpu (tensorflow where no -cpu wheel exists), numpy, threadpoolctl
#   jax    jax[cpu], optax, numpy, threadpoolctl
#
# Kiln itself runs in the interpreter that runs bench/run.py (where kiln is installed, e.g. by
# `pip install -e .`); the peer venvs need only numpy besides their framework, because
# bench/workloads.py (the shared numpy init and data) is imported from the source tree.
# Each venv is checked with an import; versions, install time and size land in
# bench/.venvs/<peer>/versions.txt and are printed at the end.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENVS=${BENCH_VENVS:-$HERE/.venvs}  # override only to test this script elsewhere
PY=${PYTHON:-python3}
# The PyTorch CPU wheel: PyPI's linux torch==2.13.0 is the CUDA build (gigabytes of nvidia-*
# packages), so we pin the +cpu local version and look for it in a wheel directory
# (TORCH_WHEELS, default /opt/wheels) or at PyTorch's CPU index when that is reachable.
TORCH_PIN="torch==2.13.0+cpu"
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(torch tf jax)
mkdir -p "$VENVS"

install_peer() {
  local peer=$1 venv="$VENVS/$1" t0
  t0=$(date +%s)
  echo "== $peer: creating $venv"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  # (the grep drops pip's warnings about this machine's configured local indexes)
  pip_install() {
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  }
  pip_install --upgrade pip >/dev/null
  case $peer in
    torch)
      local src=()
      if compgen -G "$TORCH_WHEELS/torch-2.13.0+cpu-*.whl" >/dev/null; then
        src+=(--find-links "$TORCH_WHEELS")
      else
        src+=(--extra-index-url "$TORCH_INDEX")
      fi
      pip_install --only-binary=:all: "${src[@]}" "$TORCH_PIN"
      pip_install numpy threadpoolctl matplotlib
      check='import torch, numpy, threadpoolctl, matplotlib
assert "+cpu" in torch.__version__ and not torch.cuda.is_available(), torch.__version__
print("torch", torch.__version__, "numpy", numpy.__version__, "matplotlib", matplotlib.__version__)'
      ;;
    tf)
      # tensorflow-cpu has no wheel for some Python versions: then the plain (CPU-capable) one
      pip_install tensorflow-cpu numpy threadpoolctl || pip_install tensorflow numpy threadpoolctl
      check='import tensorflow as tf, numpy, threadpoolctl
print("tensorflow", tf.__version__, "keras", tf.keras.__version__, "numpy", numpy.__version__)'
      ;;
    jax)
      pip_install "jax[cpu]" optax numpy threadpoolctl
      check='import jax, jaxlib, optax, numpy, threadpoolctl
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "optax", optax.__version__,
      "numpy", numpy.__version__, "devices", jax.devices())'
      ;;
    *) echo "unknown peer $peer (expected torch, tf or jax)" >&2; return 2 ;;
  esac
  local got
  if ! got=$(TF_CPP_MIN_LOG_LEVEL=2 "$venv/bin/python" -c "$check" 2>&1); then
    echo "$got" >&2
    echo "== $peer: import check FAILED" >&2
    return 1
  fi
  got=$(tail -1 <<< "$got")
  local secs=$(( $(date +%s) - t0 )) size
  size=$(du -sh "$venv" | cut -f1)
  {
    echo "# $peer venv, $(date -u +%Y-%m-%dT%H:%M:%SZ), install ${secs}s, size $size"
    echo "# $got"
    "$venv/bin/python" -m pip freeze --disable-pip-version-check
  } > "$venv/versions.txt"
  echo "== $peer: $got (install ${secs}s, $size)"
}

for p in "${peers[@]}"; do install_peer "$p"; done
echo
for p in "${peers[@]}"; do head -2 "$VENVS/$p/versions.txt"; done
