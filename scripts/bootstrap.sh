#!/usr/bin/env bash
# Set up everything zq_plugin needs on a fresh Debian machine; safe to run again.
#   1. the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist) when missing;
#   2. a virtual environment in .venv with the project installed (editable; dev, plot, pt2e,
#      brevitas and onnx extras),
#      torch pinned to the CPU wheel through constraints.txt, and torchvision (tests only, --no-deps).
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
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,plot,pt2e,brevitas,onnx]'
  # torchvision: test dependency for the conformance matrix (its models are pure Python). PyPI's
  # wheel is a CUDA build: --no-deps keeps the pinned CPU torch; tests/conformance.py makes it import.
  .venv/bin/python -m pip install -q --no-deps 'torchvision==0.28.0'
  touch "$stamp"
fi
