#!/usr/bin/env bash
# Build a separate venv with FusionBench for the side-by-side merging benchmark.
#
# Why separate: fusion-bench drags in lightning/transformers/hydra/datasets, which must not leak
# into mergeloom's own environment. Why pip (not uv): this machine's torch wheels come from local
# disk via pip's constraints in /etc/xdg/pip (torch<=2.14.1); torch is installed first so that
# fusion-bench does not resolve another torch. Idempotent: exits 0 at once if the venv works.
set -euo pipefail

FUSION_BENCH_VERSION=0.2.33
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.bench/fusionbench-venv"
PY="$VENV/bin/python"

check() {
    [ -x "$PY" ] && "$PY" - <<PYEOF 2>/dev/null
import importlib.metadata as md
import fusion_bench.method, safetensors.torch, psutil  # noqa: F401
assert md.version("fusion-bench") == "$FUSION_BENCH_VERSION"
PYEOF
}

if check; then
    echo "fusionbench venv OK: $VENV"
    exit 0
fi

mkdir -p "$ROOT/.bench"
[ -x "$PY" ] || python3.11 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
# seaborn/psutil/safetensors: imported by fusion_bench (or this benchmark) but not declared.
"$PY" -m pip install -q "fusion-bench==$FUSION_BENCH_VERSION" safetensors psutil seaborn

check || { echo "fusionbench venv is broken: $VENV" >&2; exit 1; }
echo "fusionbench venv ready: $VENV"
