#!/usr/bin/env bash
# GPU smoke test: the checks only a GPU can run (benchmarks/gpu_smoke.py), in <= 8 min on one
# H100/H200, without network or hub. Prints one line per check: PASS / FAIL / SKIP <reason>.
#
#   bash benchmarks/gpu_smoke.sh [--model DIR] [extra gpu_smoke.py options]
#
# Target machine: a stock CUDA image with torch, transformers and accelerate but not trl,
# datasets or math-verify (and maybe not vllm). Their wheels travel with the repository in
# benchmarks/gpu_wheels/ (prepared beforehand on a machine with network access:
# `bash benchmarks/prepare_gpu_wheels.sh --python 3.12`, matching the target's Python). This
# script installs, with --no-deps and into a private folder, only the wheels whose module the
# image lacks, so the image's torch / transformers are never replaced; the project itself runs
# from the source tree on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/gpu_wheels
SITE="${TMPDIR:-/tmp}/cppo_gpu_site"
mkdir -p "$SITE"

module_of() {  # wheel file -> importable top-level module
  local dist
  dist=$(basename "$1" | cut -d- -f1 | tr 'A-Z' 'a-z')
  case "$dist" in
    antlr4_python3_runtime) echo antlr4 ;;
    python_dateutil) echo dateutil ;;
    pyyaml) echo yaml ;;
    *) echo "$dist" ;;
  esac
}

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  missing=()
  for whl in "$WHEELS"/*.whl; do
    mod=$(module_of "$whl")
    python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" \
      || missing+=("$whl")
  done
  if ((${#missing[@]})); then
    echo "installing ${#missing[@]} wheel(s) into $SITE (--no-deps)"
    python -m pip install --quiet --no-deps --no-index --target "$SITE" "${missing[@]}"
  fi
else
  echo "no wheels in $WHEELS: checks needing trl / datasets will SKIP"
fi

export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
exec timeout 480 python benchmarks/gpu_smoke.py "$@"
