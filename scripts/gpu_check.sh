#!/usr/bin/env bash
# The GPU checks in one short run (issue 11): the gpu-marked tests, then the GPU rows of the benchmarks that
# RESULTS.md lists as "not measured". Each step has its own time limit so the whole run fits about 10 minutes of
# device time; every output goes to ${OUT:-gpu_check_out}/ (one log per step, the figures to copy into RESULTS.md).
#   bash scripts/gpu_check.sh            # needs CUDA; exits 2 with a message without it
#   PY=python3 bash scripts/gpu_check.sh # a machine whose python already has torch, lightning and this package
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing run" >&2
  exit 2
fi
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
status=0
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc"
  [ $rc -eq 0 ] || status=1
}
step tests_gpu 150 "$PY" -m pytest -q -p no:cacheprovider --runslow -m gpu tests
step bench_core 150 "$PY" benchmarks/bench_core.py --device cuda --dtype bf16
step bench_sandwich 150 "$PY" benchmarks/bench_sandwich.py --device cuda --shape vit-b --precision bf16-mixed --quick
step bench_compile 120 "$PY" benchmarks/bench_compile.py --device cuda --quick
exit $status
