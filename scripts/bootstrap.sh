#!/usr/bin/env bash
# Set up everything zq_plugin needs on a fresh Debian machine; safe to run again.
#   1. the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist) when missing;
#   2. a virtual environment in .venv with the project installed (editable; dev, plot, pt2e,
#      brevitas and onnx extras),
#      torch kept when one in range is already installed, else pinned through constraints.txt,
#      and the matching torchvision (tests only, --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."

data_dir="${ZQ_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ ! -f "$data_dir/t10k-images-idx3-ubyte.gz" ]; then
  echo "bootstrap: installing Debian package dataset-fashion-mnist (files missing in $data_dir)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq dataset-fashion-mnist
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.zq-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  # torch: keep one already in .venv when pyproject's range admits it (a CPU build from
  # https://download.pytorch.org/whl/cpu, or the CUDA build you need); otherwise the pin of
  # constraints.txt. ZQ_TORCH_INDEX=URL installs that pin from another index first (README).
  have=$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
  if [ -z "$have" ] && [ -n "${ZQ_TORCH_INDEX:-}" ]; then
    .venv/bin/python -m pip install -q --index-url "$ZQ_TORCH_INDEX" "$(grep '^torch==' constraints.txt)"
    have=$(.venv/bin/python -c 'import torch; print(torch.__version__)')
  fi
  pins=$(.venv/bin/python scripts/torch_pin.py "$have")
  torch_pin=$(echo "$pins" | sed -n 1p)
  vision_pin=$(echo "$pins" | sed -n 2p)
  [ -n "$have" ] && echo "bootstrap: keeping the installed $torch_pin"
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "$torch_pin" >"$constraints"
  .venv/bin/python -m pip install -q -c "$constraints" -e '.[dev,plot,pt2e,brevitas,onnx]'
  # torchvision: test dependency for the conformance matrix (its models are pure Python). PyPI's
  # wheel is a CUDA build: --no-deps keeps the chosen torch; tests/conformance.py makes it import.
  if [ -n "$vision_pin" ]; then
    .venv/bin/python -m pip install -q --no-deps "$vision_pin"
  fi
  touch "$stamp"
fi
