#!/usr/bin/env bash
# The whole GPU check in one call that ends within 8 minutes on the lent H200 (1 GPU, 16 cores, no network;
# torch 2.11.0+cu130, triton 3.6.0, Python 3.12): give the device call a timeout of at least 480 s.
#   bash scripts/gpu_run.sh OUT
#   STEPS="smoke headline" bash scripts/gpu_run.sh OUT     # only these steps (names below)
# Steps by priority, under one deadline (GPU_RUN_DEADLINE_S, default 450 s from the start), each under its
# own `timeout` so that its log always comes back:
#   env, compiler, build (once), smoke, tests-gpu (the cuda-marked tests and the Triton tests on the GPU; not
#   the CPU emulation, not the CPU 2^31 test), headline (scripts/gpu_headline.py: the issue's headline sizes,
#   small budgets, copy bandwidth), tests-headline (backends == reference at those sizes), then as time
#   allows: tests-large (2^31 elements on the GPU backends), bench-ops, bench-sparsifiers, bench-semi.
# OUT receives at most 8 files: summary.txt (printed last), env.log, build.log, tests-gpu.log, headline.md,
# headline.json and logs.tar.gz (every step's log and result files).
# Without a visible CUDA GPU, or with GPU_RUN_CPU=1 (how tests/test_gpu_cases.py checks this script on a CPU
# machine), the GPU steps are skipped with that reason, the build too (the checkout's extension is used as it
# is), and the headline step runs on the CPU at small sizes: the control flow, the compiler choice, the smoke
# test, the headline script and the packing still run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_run.sh OUT}
mkdir -p "$out"
start=$(date +%s)
deadline=$(( start + ${GPU_RUN_DEADLINE_S:-450} ))
reserve=15   # seconds kept back from the steps for packing and the summary
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
logs=$work/logs
mkdir -p "$logs"
steps=${STEPS:-"env compiler build smoke tests-gpu headline tests-headline tests-large bench-ops bench-sparsifiers bench-semi"}
PY=${PYTHON:-python3}
export PY PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
table=$work/steps.tsv   # name, status, seconds, note
: > "$table"

if [ "${GPU_RUN_CPU:-0}" = 1 ]; then
  gpu=0 no_gpu="GPU_RUN_CPU=1"
elif "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpu=1
else
  gpu=0 no_gpu="no CUDA GPU visible"
fi

record() {  # record NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$table"
  printf '[%4ds] %-18s %-8s %4ss  %s\n' "$(( $(date +%s) - start ))" "$1" "$2" "$3" "$4"
}

wanted() { [[ " $steps " == *" $1 "* ]]; }

# run_step NAME CAP MIN CMD...: CMD under `timeout` for min(CAP, seconds left before the deadline), output in
# $logs/NAME.log; skipped when fewer than MIN seconds are left. Returns CMD's status (1 when skipped).
run_step() {
  local name=$1 cap=$2 min=$3
  shift 3
  wanted "$name" || return 1
  local left=$(( deadline - reserve - $(date +%s) ))
  if (( left < min )); then
    record "$name" skipped 0 "no time left (${left}s < ${min}s)"
    return 1
  fi
  local limit=$(( cap < left ? cap : left )) t0=$(date +%s) rc
  # timeout signals the whole process group it starts: pytest-xdist workers and benchmark subprocesses too
  timeout --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 )) status note
  case $rc in
    0) status=ok note="" ;;
    124|137) status=timeout note="stopped at ${limit}s" ;;
    *) status=fail note="exit $rc" ;;
  esac
  record "$name" "$status" "$took" "$note$(step_note "$name")"
  return $rc
}

skip_step() {  # skip_step NAME REASON
  wanted "$1" && record "$1" skipped 0 "$2"
  return 0
}

step_note() {  # a few words from a finished step's log for the summary
  local log=$logs/$1.log
  case $1 in
    tests-*) grep -E "[0-9]+ (passed|failed|skipped|error)" "$log" | tail -n 1 | sed 's/^=* */; /; s/ *=*$//' ;;
    build) grep -m1 -E "error:|Error" "$log" | cut -c1-100 | sed 's/^/; /' ;;
    compiler) sed -n 's/^chosen: /; /p' "$log" ;;
    smoke) grep -m1 "^FAILED" "$log" | cut -c1-100 | sed 's/^/; /' ;;
  esac
}

# ------------------------------------------------------------------------------------------------ steps
env_report() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
  echo "cores: $(nproc); CC=${CC:-unset} CXX=${CXX:-unset}; commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo '?')"
  for cxx in /usr/bin/g++ "${CXX:-}" g++; do
    [ -n "$cxx" ] && command -v "$cxx" > /dev/null && echo "$cxx: $("$cxx" --version | head -n 1)"
  done
  command -v nvcc > /dev/null && nvcc --version | tail -n 2
}

# The C++ compiler, chosen before the one build. The extension's C++ is compiled against its compiler's
# libstdc++ headers but runs with the libstdc++ that the Python process has already loaded for torch (the
# system one: nothing points the extension elsewhere). On the H100 (2026-11-23) the image's CXX=/opt/gcc/bin/g++
# built an extension whose TORCH_CHECKs crashed the process exactly when the message formatted a number
# (c10::str -> ostream << int -> the num_put facet of the stream's locale), while messages of strings only
# raised; locally (system g++, the libstdc++ torch loads) every one raises. Number formatting is the part of
# iostreams that goes through locale facets, which break when code built for one libstdc++ (newer headers, or
# a second, static copy) meets another at run time: the cause as far as those logs show (build.log records the
# libstdc++ of each compiler, the one loaded, and any copy inside _C, to confirm it). Choosing the first compiler
# whose own libstdc++ is the very file the process loads (normally the system g++, of the GCC family torch's
# wheel is built with) makes the mismatch impossible; failing that, one whose libstdc++ is newer, with that
# library preloaded into every later step (libstdc++ is backward compatible: torch runs on it). GPU_RUN_CXX names
# a compiler to try first. Writes $work/compiler.env (CC, CXX, and LD_PRELOAD when needed).
choose_compiler() {
  local loaded cxx path own chosen="" preload=""
  loaded=$("$PY" -c "import torch; print(next(l.split()[-1] for l in open('/proc/self/maps') if '/libstdc++' in l))")
  loaded=$(realpath "$loaded")
  echo "libstdc++ loaded by python + torch: $loaded"
  for cxx in "${GPU_RUN_CXX:-}" /usr/bin/g++ "${CXX:-}" g++; do
    [ -n "$cxx" ] && path=$(command -v "$cxx") || continue
    own=$("$path" -print-file-name=libstdc++.so)
    [ -e "$own" ] && own=$(realpath "$own") || own="(no shared libstdc++)"
    echo "$path: $("$path" -dumpfullversion 2>/dev/null), libstdc++ $own"
    if [ "$own" = "$loaded" ]; then chosen=$path; preload=""; break; fi
    # newer = a higher libstdc++.so.6.0.N
    if [ -z "$chosen" ] && [[ "$own" == *.so.6.0.* ]] && (( ${own##*.so.6.0.} > ${loaded##*.so.6.0.} )); then
      chosen=$path preload=$own
    fi
  done
  if [ -z "$chosen" ]; then
    chosen=$(command -v "${CXX:-g++}") || return 1
    echo "no compiler's libstdc++ matches or is newer than $loaded: building with $chosen, whose TORCH_CHECK" \
      "messages may crash (UNSAFE)"
  fi
  local cc
  case $chosen in
    *g++) cc=${chosen%g++}gcc ;;
    *clang++) cc=${chosen%++} ;;
    *) cc=$(command -v "${CC:-cc}") ;;
  esac
  { echo "export CXX=$chosen CC=$cc"; [ -n "$preload" ] && echo "export LD_PRELOAD=$preload"; } > "$work/compiler.env"
  echo "chosen: $chosen${preload:+ (preloading $preload)}"
}

build() {
  . "$work/compiler.env"
  cat "$work/logs/compiler.log"
  # No pipe on the build's output: a reader that stops early (| head) would SIGPIPE the build.
  MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$PY" setup.py build_ext --inplace || return 1
  local so
  so=$(ls sparsity_ext/_C*.so) || return 1
  echo "built with $CXX ($("$CXX" -dumpfullversion)); $so links:"
  ldd "$so" | grep -E "libstdc|libgomp|libc10" || true
  # libstdc++'s stream and locale internals defined inside _C would be a second copy of the library
  if command -v nm > /dev/null; then
    echo "libstdc++ stream/locale symbols defined in _C (0 expected):" \
      "$(nm -D --defined-only "$so" | grep -c -E '_ZNSt6locale|_ZNSo9_M_insert|num_put')"
  fi
}

write_smoke() {
  cat > "$work/smoke.py" <<'EOF'
"""Smoke test: the extension loaded, argument errors that format numbers raise (each in a child process, so a
crash is a failure, not the end of the run), and each backend's block_norm_mask / nm_mask equal the reference."""
import subprocess
import sys

import torch

import sparsity_ext
from sparsity_ext import ops

info = sparsity_ext.info(as_text=False)
print(sparsity_ext.info())
failures = []
if info["extension"] != "loaded":
    failures.append(f"compiled extension: {info['extension']}")
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# an int and a float formatted into the message (the H100 crash); the ops are called below any Python check
RAISES = ("torch.ops.sparsity_ext.nm_mask(torch.ones(4, 8, device=d), 5, 4)",
          "torch.ops.sparsity_ext.block_norm_mask(torch.ones(4, 8, device=d), 1.5, [1, 4], 4, 1)")
for d in devices:
    for call in RAISES:
        code = (f"import torch, sparsity_ext\nd = {d!r}\ntry:\n    {call}\nexcept RuntimeError as exc:\n"
                f"    print(str(exc).splitlines()[0])\nelse:\n    raise SystemExit('no error raised')\n")
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if child.returncode != 0:
            failures.append(f"{d}: {call}: exit {child.returncode} {child.stderr.strip()[-300:]}")
        else:
            print(f"{d} raised: {child.stdout.strip()}")
for d in devices:
    g = torch.Generator(device=d).manual_seed(0)
    x = torch.randn(1000, 128, generator=g, device=d)
    with sparsity_ext.use_backend("reference"):
        want = (ops.block_norm_mask(x, 0.8, (1, 4), 4, 1), ops.nm_mask(x, 2, 4))
    backends = ("cuda", "triton") if d == "cuda" else ("cpu",)
    for backend in backends:
        try:
            with sparsity_ext.use_backend(backend):
                got = (ops.block_norm_mask(x, 0.8, (1, 4), 4, 1), ops.nm_mask(x, 2, 4))
        except Exception as exc:  # noqa: BLE001 - reported below, the other backends still run
            failures.append(f"{backend} on {d}: {type(exc).__name__}: {exc}")
            continue
        same = [torch.equal(a, b) for a, b in zip(got, want)]
        print(f"{backend} on {d}: block_norm_mask {'==' if same[0] else '!='} reference, "
              f"nm_mask {'==' if same[1] else '!='} reference")
        if not all(same):
            failures.append(f"{backend} on {d}: differs from the reference")
for failure in failures:
    print("FAILED", failure)
sys.exit(1 if failures else 0)
EOF
}

pytest_args=(-q -rfE --tb=short -p no:cacheprovider)
# a hung test (a kernel that never returns) is ended alone, so the step still reports every other test
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout=150 --timeout-method=thread)
workers=()
if "$PY" -c "import xdist" 2>/dev/null; then
  # a crashing test takes down one worker, which is replaced and the test reported, not the whole run
  workers=(-n "$(( $(nproc) < 12 ? $(nproc) : 12 ))")
fi

# ------------------------------------------------------------------------------------------------- run
echo "gpu_run: steps by priority until $(( deadline - start ))s; logs in $work"
run_step env 30 5 bash -c "$(declare -f env_report); env_report"

export work
if run_step compiler 60 5 bash -c "$(declare -f choose_compiler); choose_compiler"; then
  . "$work/compiler.env"
  echo "compiler: CXX=$CXX CC=$CC${LD_PRELOAD:+ LD_PRELOAD=$LD_PRELOAD}"
  # torch's extension builder passes CC on to nvcc as its host compiler (-ccbin)
fi

if (( gpu )); then
  if [ -f "$work/compiler.env" ]; then
    run_step build 240 60 bash -c "$(declare -f build); build"
  else
    skip_step build "no C++ compiler found (compiler.log)"
  fi
else
  skip_step build "$no_gpu: the CUDA build needs the GPU machine's torch; the checkout's extension is used as built"
fi

write_smoke
run_step smoke 90 20 "$PY" "$work/smoke.py"

if (( gpu )); then
  # The GPU's tests by name: cuda/gpu in the test or its module, and the Triton tests (on the GPU there);
  # the CPU emulation of the CUDA kernels and the opt-in 2^31-element test are left to CI and tests-large.
  run_step tests-gpu 180 30 "$PY" -m pytest "${pytest_args[@]}" "${workers[@]}" tests \
    -k "(cuda or gpu or test_triton_ops) and not emulat and not test_large_tensors and not headline and not dry_run"
  run_step headline 180 40 "$PY" scripts/gpu_headline.py --out "$work/headline"
  run_step tests-headline 120 30 "$PY" -m pytest "${pytest_args[@]}" tests/test_gpu_cases.py -k headline
  run_step tests-large 120 40 env SPARSITY_EXT_LARGE_TESTS=1 "$PY" -m pytest "${pytest_args[@]}" \
    tests/test_large_tensors.py -k "not cpu-cpu"
  run_step bench-ops 150 40 "$PY" -m sparsity_ext.cli bench --device cuda --budget 0.05 --out "$work/bench-ops"
  run_step bench-sparsifiers 150 40 "$PY" benchmarks/bench_sparsifiers.py --device cuda --budget 0.2 \
    --out "$work/bench-sparsifiers"
  run_step bench-semi 90 30 "$PY" benchmarks/bench_semi_structured.py --device cuda --budget 0.2 \
    --out "$work/bench-semi"
else
  skip_step tests-gpu "$no_gpu"
  # the headline script's own flow, on the CPU at small sizes
  run_step headline 180 20 "$PY" scripts/gpu_headline.py --device cpu --small --out "$work/headline"
  for name in tests-headline tests-large bench-ops bench-sparsifiers bench-semi; do skip_step "$name" "$no_gpu"; done
fi

# ------------------------------------------------------------------------------------- summary and files
{
  echo "== gpu_run on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || echo 'no GPU'):" \
    "$(grep -m1 '^python' "$logs/env.log" 2>/dev/null), $(grep -m1 '^triton' "$logs/env.log" 2>/dev/null)"
  echo "== commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo '?'); $(( $(date +%s) - start ))s of" \
    "${GPU_RUN_DEADLINE_S:-450}s; $( [ -f "$work/compiler.env" ] && sed -n 's/^export //p' "$work/compiler.env" | tr '\n' ' ')"
  printf '%-18s %-8s %5s  %s\n' step status s note
  while IFS=$'\t' read -r name status secs note; do
    printf '%-18s %-8s %5s  %s\n' "$name" "$status" "$secs" "$note"
  done < "$table"
  if [ -f "$work/headline/headline.txt" ]; then
    echo
    cat "$work/headline/headline.txt"
  fi
} > "$work/summary.txt"

cp "$work/summary.txt" "$out/"
for f in env build tests-gpu; do [ -f "$logs/$f.log" ] && cp "$logs/$f.log" "$out/"; done
for f in headline.md headline.json; do [ -f "$work/headline/$f" ] && cp "$work/headline/$f" "$out/"; done
tar -czf "$out/logs.tar.gz" -C "$work" .

echo
cat "$work/summary.txt"
# exit 1 when a step failed or timed out (skipped steps are in the summary)
awk -F'\t' '$2 == "fail" || $2 == "timeout" { bad = 1 } END { exit bad }' "$table"
