#!/usr/bin/env bash
# Compile check of the CUDA kernels without a GPU: every csrc/cuda/*.cu is compiled for sm_90 with the
# extension's nvcc flags, and ptxas's register / spill counts are printed per kernel. Exits non-zero on
# any compile error. About 2-3 minutes on 2 cores.
#
#   bash scripts/check_cuda_compile.sh
#
# Needs nvcc ($NVCC, else $CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc). The launchers include torch's
# CUDA headers: those of the installed torch when it is a CUDA build, else the headers unpacked from the
# CUDA wheel of torch==$TORCH_WHEEL_VERSION (default 2.14.1; `pip download`, then only torch/include is
# unzipped). If neither can be had, only the torch-free kernel headers are compiled, and it says so.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}
PY=${PYTHON:-python3}
if [ ! -x "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found at $NVCC (set NVCC or CUDA_HOME)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- torch headers with the CUDA parts (c10/cuda) --------------------------------------------------
torch_inc=""
if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  torch_inc=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))")
  echo "torch headers: the installed CUDA build of torch"
elif "$PY" -m pip download --no-deps --only-binary=:all: -q -d "$tmp/wheel" "torch==${TORCH_WHEEL_VERSION:-2.14.1}" \
     >"$tmp/pip.log" 2>&1 && unzip -q "$tmp"/wheel/torch-*.whl 'torch/include/*' -d "$tmp/wheel"; then
  torch_inc="$tmp/wheel/torch/include $tmp/wheel/torch/include/torch/csrc/api/include"
  rm -f "$tmp"/wheel/torch-*.whl
  echo "torch headers: unpacked from the torch==${TORCH_WHEEL_VERSION:-2.14.1} wheel"
else
  echo "NOTICE: no torch CUDA headers (pip download failed: $(tail -n 1 "$tmp/pip.log")); compiling only the" \
       "torch-free kernel headers, not the launchers"
fi

# C++20, as torch's BuildExtension compiles extensions (torch >= 2.14's headers refuse anything older)
std=c++20
flags=(-std="$std" -O3 -fmad=false -lineinfo --expt-relaxed-constexpr
       -gencode arch=compute_90,code=sm_90 -Xptxas -v -D_GLIBCXX_USE_CXX11_ABI=1 -Icsrc)
for dir in $torch_inc; do flags+=(-I"$dir"); done

sources=()
if [ -n "$torch_inc" ]; then
  sources=(csrc/cuda/*.cu)
else
  for header in csrc/cuda/*.cuh; do echo "#include \"${header#csrc/}\""; done >"$tmp/kernels_only.cu"
  sources=("$tmp/kernels_only.cu")
fi

# --- compile, two at a time ------------------------------------------------------------------------
pids=()
for src in "${sources[@]}"; do
  log="$tmp/$(basename "$src").log"
  "$NVCC" "${flags[@]}" -c "$src" -o "$tmp/$(basename "$src").o" >"$log" 2>&1 &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then
    wait "${pids[0]}" || true
    pids=("${pids[@]:1}")
  fi
done
wait || true

status=0
for src in "${sources[@]}"; do
  log="$tmp/$(basename "$src").log"
  echo "=== $src"
  if [ ! -s "$tmp/$(basename "$src").o" ] || grep -q "error" "$log"; then
    grep -v "^ptxas info" "$log" | head -n 60
    status=1
    continue
  fi
  # one line per kernel: registers, spills, demangled name
  "$PY" - "$log" <<'EOF'
import re, subprocess, sys
text = open(sys.argv[1]).read()
rows = []
for m in re.finditer(r"Compiling entry function '(\w+)' for '(\w+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
                     r".*?Used (\d+) registers", text, re.S):
    name, arch, spill_st, spill_ld, regs = m.groups()
    rows.append((name, int(regs), int(spill_st), int(spill_ld)))
names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True, text=True).stdout.split("\n")
for (mangled, regs, st, ld), pretty in zip(rows, names):
    pretty = re.sub(r"sparsity_ext::(cuda::)?", "", pretty or mangled)
    print(f"  regs {regs:3d}  spill st/ld {st:3d}/{ld:3d}  {pretty[:150]}")
print(f"  {len(rows)} kernels, {sum(1 for r in rows if r[2] or r[3])} with spills")
EOF
  grep -i "warning" "$log" | grep -v "^ptxas info" | head -n 20 || true
done
[ $status -eq 0 ] && echo "check_cuda_compile: OK (${std}, sm_90)" || echo "check_cuda_compile: FAILED"
exit $status
