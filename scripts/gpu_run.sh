#!/usr/bin/env bash
# Everything a GPU machine is for, in one call (about 5-8 minutes on an H100):
#   build the CUDA extension, run the whole test suite (CUDA-marked tests included, Triton on the GPU),
#   then the GPU benchmarks; logs and results go to $1 (default benchmarks/results/gpu).
#   bash scripts/gpu_run.sh "$OUT"            # all of it
#   STEPS="build test" bash scripts/gpu_run.sh "$OUT"   # a subset: build, test, bench
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
steps=${STEPS:-"build test bench"}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
} 2>&1 | tee "$out/env.log"

if [[ " $steps " == *" build "* ]]; then
  t0=$(date +%s)
  # Build in place (no network there): compile against the machine's CUDA torch, for sm_90.
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    "$PY" setup.py build_ext --inplace 2>&1 | tee "$out/build.log" | grep -E "error|warning: |registers|spill|sparsity_ext setup" | head -60
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "BUILD FAILED"; status=1; }
  echo "build: $(( $(date +%s) - t0 )) s"
  "$PY" -c "import sparsity_ext; print(sparsity_ext.info())" 2>&1 | tee -a "$out/build.log"
  # An argument error raised inside the extension must come back as a Python exception. The second
  # call's message formats a number: on 2026-11-23 such raises crashed the process when built with the
  # machine's /opt/gcc g++ (string-only messages were fine). When it crashes, the build is redone once
  # with /usr/bin/g++ (set CXX yourself to pick another compiler).
  raises_cleanly() {
    local call ok=0
    for call in "pack_mask(torch.zeros(3, device=d))" "unpack_mask(torch.zeros(3, dtype=torch.uint8, device=d), [8, 8])"; do
      PYTHONPATH=$PWD "$PY" -c "
import torch, sparsity_ext
for d in ('cpu', 'cuda'):
    try:
        torch.ops.sparsity_ext.$call
    except RuntimeError as exc:
        print(d, 'raised:', str(exc)[:70])
" 2>&1 | tee -a "$out/build.log" || { echo "EXTENSION CRASHED ON A RAISED ARGUMENT ERROR: $call" | tee -a "$out/build.log"; ok=1; }
    done
    return $ok
  }
  if ! raises_cleanly && [ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ]; then
    echo "rebuilding with CXX=/usr/bin/g++" | tee -a "$out/build.log"
    rm -rf build sparsity_ext/_C*.so
    CXX=/usr/bin/g++ MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
      "$PY" setup.py build_ext --inplace >> "$out/build.log" 2>&1 || { echo "BUILD FAILED"; status=1; }
    raises_cleanly || echo "still crashing with /usr/bin/g++" | tee -a "$out/build.log"
  fi
fi

if [[ " $steps " == *" test "* ]]; then
  t0=$(date +%s)
  # Several pytest workers when pytest-xdist is there: faster, and a crashing test (a kernel bug) takes
  # down one worker, which is replaced and the test reported, instead of the whole run.
  workers=()
  if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${TEST_WORKERS:-8}"); fi
  # SPARSITY_EXT_LARGE_TESTS=1: tests/test_large_tensors.py, a table past 2**31 elements on each backend.
  SPARSITY_EXT_LARGE_TESTS=1 PYTHONPATH=$PWD "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider "${workers[@]}" tests ${TEST_ARGS:-} \
    > "$out/tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -n 60
  tail -n 3 "$out/tests.log"
  echo "tests: rc=$rc, $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || status=1
fi

if [[ " $steps " == *" bench "* ]]; then
  t0=$(date +%s)
  # The op suite (`sparsity-ext bench`; every op x backend x size vs torch baselines, about 2-3 minutes): JSON,
  # markdown and plots in $out/bench. Run as a module: the console script is not installed by an in-place build.
  PYTHONPATH=$PWD "$PY" -m sparsity_ext.cli bench --device cuda --out "$out/bench" 2>&1 | tee -a "$out/bench.log" | grep -E "^\| [^ ]+ \| [0-9,]+ \| sparsity_ext"
  PYTHONPATH=$PWD "$PY" benchmarks/bench_sparsifiers.py --device cuda --out "$out" ${BENCH_ARGS:-} 2>&1 | tee -a "$out/bench.log" | grep -E "^\|"
  PYTHONPATH=$PWD "$PY" benchmarks/bench_semi_structured.py --device cuda --out "$out" 2>&1 | tee -a "$out/bench.log" | grep -E "^\|"
  echo "bench: $(( $(date +%s) - t0 )) s"
fi
exit $status
