#!/usr/bin/env bash
# The compatibility environment .venv-next: the newest torch release pyproject admits, from
# plain PyPI, with the project (editable; dev, pt2e, brevitas and onnx extras), the matching
# torchvision and pytest-xdist; safe to run again. CI's compatibility tier runs a few test files
# in it (.ci/run).
#   ZQ_TORCH_NEXT=X.Y.Z   the torch release (default below); torchvision from scripts/torch_pin.py
#   ZQ_NEXT_INDEX=URL     the package index (default PyPI)
# PyPI's torch is a CUDA build (about 3 GB with its nvidia-* dependencies); it runs on CPU too,
# and with it PyPI's torchvision (built against it) loads its compiled ops.
# The machine's pip configuration (a torch cap, local wheel directories) is bypassed: it is
# meant for .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

torch_next="${ZQ_TORCH_NEXT:-2.15.0}"
index="${ZQ_NEXT_INDEX:-https://pypi.org/simple}"
venv=.venv-next
python="${PYTHON:-python3}"

pins=$("$python" scripts/torch_pin.py "$torch_next")
torch_pin=$(echo "$pins" | sed -n 1p)
vision_pin=$(echo "$pins" | sed -n 2p)
if [ "$torch_pin" != "torch==$torch_next" ]; then
  echo "bootstrap_next: torch $torch_next is outside pyproject.toml's range" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.zq-installed"
want="$torch_pin $vision_pin pytest-xdist"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/bootstrap_next.sh -nt "$stamp" ] \
  || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap_next: installing $want into $venv from $index"
  PIP_CONFIG_FILE=/dev/null env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT \
    "$venv/bin/python" -m pip install -q --index-url "$index" \
    "$torch_pin" "$vision_pin" pytest-xdist -e '.[dev,pt2e,brevitas,onnx]'
  # torchvision's compiled ops (nms) must load against this torch, not only its Python models.
  "$venv/bin/python" -c 'import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)'
  echo "$want" >"$stamp"
fi
