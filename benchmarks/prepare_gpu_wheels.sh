#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_smoke.sh installs on a stock CUDA image lacking them
# (trl, datasets, math-verify and their dependencies) into benchmarks/gpu_wheels/ (git-ignored;
# copy the folder along with the repository).
# Run on any machine with network access; --python must match the GPU machine's Python.
#
#   bash benchmarks/prepare_gpu_wheels.sh --python 3.12
#
# pyarrow and pandas are the large ones (~40 and ~12 MiB): leave them out with --skip "pyarrow pandas" when the image already has them, to stay
# under a 64 MiB transfer limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=3.12
SKIP=""
while (($#)); do
  case "$1" in
    --python) PY=$2; shift 2 ;;
    --skip) SKIP=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
pin() {  # the exact pin of a package in pyproject.toml
  python - "$1" <<'PYEOF'
import re, sys, tomllib
name = sys.argv[1]
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for d in deps:
    if re.split(r"[\[=<>]", d)[0].lower() == name:
        print(name + d[d.index("=="):] if "==" in d else name)
        break
else:
    print(name)
PYEOF
}
# direct dependencies at the pins of pyproject.toml; their dependencies at the versions the CPU
# install resolves to (pip list of a fresh `pip install -e .`)
PKGS=("$(pin trl)" "$(pin datasets)" "$(pin math-verify)" latex2sympy2_extended==1.11.0
      sympy==1.14.0 mpmath==1.3.0 antlr4-python3-runtime==4.11.0 dill==0.4.1
      multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0 pyarrow==26.0.1 pandas==3.1.1
      python-dateutil==2.9.0.post0 pytz==2026.6)
OUT=benchmarks/gpu_wheels
mkdir -p "$OUT"
for pkg in "${PKGS[@]}"; do
  base=${pkg%%[=<>]*}
  if [[ " $SKIP " == *" $base "* ]]; then continue; fi
  python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d "$OUT" "$pkg"
done
du -sh "$OUT"
ls -1 "$OUT"
