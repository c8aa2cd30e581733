"""Compiles every Triton kernel of sparsity_ext for an H100 (sm_90) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, what the CPU tests run) accepts code that triton's compiler
rejects, and it never specializes arguments the way a GPU launch does (an integer equal to 1 becomes a
compile-time constant; pointers get 16-byte alignment hints). This check closes that gap:

1. A child process runs the triton backend's ops in the interpreter over the cases below and records
   every kernel launch: the kernel, its arguments (tensor dtype and 16-byte alignment, integer values)
   and its launch options.
2. This process compiles each distinct launch through triton's own launch path (JITFunction.warmup:
   the same argument specialization as a GPU launch) with a driver stub that names the sm_90 target,
   down to a cubin; the autotuned kernels in every config of their autotuner as well.

Prints registers, stack and shared memory per compiled variant (cuobjdump from triton's bundled CUDA
tools) and exits 1 when a variant does not compile.
    python scripts/check_triton_compile.py [--arch 90] [--jobs 2]

Another triton than the installed one (e.g. a GPU machine's older one) compiles the same launches: step 1
always runs here, with this interpreter's triton (the ops' launch arguments do not depend on its version);
step 2 runs in the interpreter given by --python (or SPARSITY_EXT_TRITON_COMPILE_PYTHON), or in a venv that
--triton VERSION makes once under the temporary folder (triton==VERSION and this torch, from the package index).
    python scripts/check_triton_compile.py --triton 3.6.0
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
from concurrent.futures import ProcessPoolExecutor
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------- 1. record (interpreter)
def _launch_cases():
    """Calls of the triton backend's ops covering its kernels' specializations: dtypes, whole and
    ranked blocks, bool and packed masks, fused apply, one row, one column, strided input, ties."""
    import torch
    from sparsity_ext import ops

    def data(shape, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=g).to(dtype)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # Every block kind in fp32; the 16-bit types share the integer code, so fewer blocks there.
        blocks = (((1, 4), 4), ((1, 4), 2), ((1, 8), 3), ((2, 2), 4), ((3, 5), 7), ((4, 1), 4), ((1, 1), 1))
        for shape in ((6, 16), (5, 13), (1, 24), (9, 1)):  # aligned rows, odd sizes, one row, one column
            for block, zeros in blocks if dtype == torch.float32 else blocks[:2] + blocks[4:5]:
                for norm in (1, 2):
                    yield partial(ops.block_norm_mask, data(shape, dtype), 0.5, block, zeros, norm)
                yield partial(ops.block_norm_mask, data(shape, dtype), 0.5, block, zeros, 2, packed=True)
                yield partial(ops.block_norm_mask_apply_, data(shape, dtype), 0.5, block, zeros, 2)
            yield partial(ops.block_norm_mask, data(shape, dtype), 0.0, (1, 4), 4, 2)
            yield partial(ops.block_norm_mask, data(shape, dtype), 1.0, (1, 4), 4, 2, packed=True)
        yield partial(ops.block_norm_mask, data((16, 9), dtype).t(), 0.5, (1, 4), 2, 2)  # strided rows
        yield partial(ops.block_norm_mask, torch.zeros(7, 12, dtype=dtype), 0.5, (1, 4), 4, 2)  # all tied
        for n, m in ((2, 4), (1, 4), (2, 8), (1, 2)):
            yield partial(ops.nm_mask, data((5, 16), dtype), n, m)
        yield partial(ops.select_threshold, data(1000, dtype), 300)
        yield partial(ops.select_threshold, torch.ones(50, dtype=dtype), 7)
        for shape in ((6, 16), (5, 13), (1, 1)):
            keep = data(shape) > 0
            yield partial(ops.apply_mask_, data(shape, dtype), keep)
            yield partial(ops.apply_mask_, data(shape, dtype), ops.pack_mask(keep))
        yield partial(ops.apply_mask_, data((16, 6), dtype).t(), data((6, 16)) > 0)
        if dtype != torch.float32:  # 2:4 packing takes fp16, bf16 and int8
            for shape in ((32, 64), (64, 128)):
                yield partial(ops.sparsify_24_pack, data(shape, dtype))
    yield partial(ops.sparsify_24_pack, torch.randint(-100, 100, (32, 128), dtype=torch.int8))
    for numel in (13, 64, 1):
        keep = data(numel) > 0
        yield partial(ops.unpack_mask, ops.pack_mask(keep), [numel])


def _describe(value):
    import torch
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"unrecorded launch argument type {type(value).__name__}")


def record() -> None:
    """Child process: run the cases in the interpreter, print one JSON line per distinct launch."""
    import sparsity_ext
    from sparsity_ext.triton import ops as triton_ops, register
    from triton.runtime.interpreter import InterpretedFunction

    register()
    # The GPU launches the scoring kernel with enable_fp_fusion=False (ops._EXACT); the interpreter
    # ignores launch options, so pass it here too and it is recorded like any launch option.
    triton_ops._EXACT = {"enable_fp_fusion": False}
    seen = set()
    original_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launch = json.dumps({"kernel": f"{self.fn.__module__}.{self.fn.__name__}",
                             "args": [_describe(a) for a in args],
                             "kwargs": {k: _describe(v) for k, v in sorted(kwargs.items())}})
        if launch not in seen:
            seen.add(launch)
            print(launch, flush=True)
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    with sparsity_ext.use_backend("triton"):
        for case in _launch_cases():
            case()


# ---------------------------------------------------------------------------- 2. compile (sm_90)
def _install_driver_stub(arch: int) -> None:
    """Triton asks its active driver for the device, stream and target; answer without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class NoGpuDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    driver.set_active(NoGpuDriver())


def _rebuild(value):
    import torch
    if isinstance(value, dict):
        dtype = getattr(torch, value["tensor"])
        buffer = torch.zeros(64, dtype=dtype)
        return buffer if value["aligned"] else buffer[1:]  # one element off: not 16-byte aligned
    return value


def _resource_usage(cubin: bytes) -> str:
    import triton.backends.nvidia as nvidia
    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "(no cuobjdump)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = next((line.strip() for line in out.splitlines() if line.strip().startswith("REG:")), "")
    return " ".join(field for field in usage.split() if field.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"))


def compile_one(job):
    """(label, error or None, resource usage) of one launch compiled for the target."""
    launch, arch = job
    _install_driver_stub(arch)
    import importlib
    module_name, kernel_name = launch["kernel"].rsplit(".", 1)
    kernel = getattr(importlib.import_module(module_name), kernel_name)
    args = [_rebuild(a) for a in launch["args"]]
    kwargs = {k: _rebuild(v) for k, v in launch["kwargs"].items()}
    label = kernel_name + "(" + ", ".join(
        f"{k}={v}" for k, v in launch["kwargs"].items() if k.isupper() or k == "num_warps") + ")"
    try:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    except Exception as exc:  # noqa: BLE001 - every compile failure is reported, then the check fails
        return label, f"{type(exc).__name__}: {str(exc)[-1500:]}", ""
    return label, None, _resource_usage(compiled.asm["cubin"])


def _specialization(launch) -> str:
    """What a GPU launch compiles a kernel for: integers matter only as 1, multiples of 16 or other
    (and as int32 or int64), tensors by dtype and 16-byte alignment."""
    def kind(value):
        if isinstance(value, bool) or not isinstance(value, int):
            return value
        return "1" if value == 1 else ("i32" if -2**31 <= value < 2**31 else "i64") + ("/16" if value % 16 == 0 else "")
    return json.dumps([launch["kernel"], [kind(a) for a in launch["args"]], launch["kwargs"]], sort_keys=True)


def _compile_jobs(launches):
    """The distinct specializations of the recorded launches, plus for each mode of a kernel (its
    constexprs other than the tile shape; first launch seen): the same launch with every size above 1
    moved past 2**31 (int64 arguments, as tensors that large pass), and an autotuned kernel's launch in
    every config of its autotuner (the interpreter runs only the default one)."""
    from sparsity_ext.triton import kernels
    from triton.runtime.autotuner import Autotuner
    configs = {f"{t.fn.__module__}.{t.fn.__name__}": t.configs
               for t in vars(kernels).values() if isinstance(t, Autotuner)}
    jobs, modes = {}, set()
    for launch in launches:
        jobs.setdefault(_specialization(launch), launch)
        tuned = configs.get(launch["kernel"], ())
        tile_keys = {key for config in tuned for key in config.all_kwargs()}
        mode = json.dumps([launch["kernel"], {k: v for k, v in launch["kwargs"].items() if k not in tile_keys}],
                          sort_keys=True)
        if mode in modes:
            continue
        modes.add(mode)
        large = [a + 2**31 if isinstance(a, int) and not isinstance(a, bool) and a > 1 else a for a in launch["args"]]
        variants = [{**launch, "args": large}]
        for config in tuned:
            kwargs = {**launch["kwargs"], **config.all_kwargs()}
            variants.append({**launch, "kwargs": {k: v for k, v in sorted(kwargs.items()) if v is not None}})
        for variant in variants:
            jobs.setdefault(_specialization(variant), variant)
    return list(jobs.values())


def compile_jobs(jobs, arch: int, workers: int):
    """Step 2 in this interpreter: [(label, error or None, resource usage)] of every job, in order."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_one, [(job, arch) for job in jobs]))


def _venv_with_triton(version: str) -> str:
    """The python of a venv holding triton==version, this interpreter's torch and numpy (which triton's
    interpreter module, imported by sparsity_ext.triton.kernels, needs); made on first use."""
    import torch
    home = os.path.join(tempfile.gettempdir(), f"sparsity-ext-triton-{version}")
    python = os.path.join(home, "bin", "python")
    probe = [python, "-c", "import numpy, triton, torch; print(triton.__version__, torch.__version__)"]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True, text=True).stdout.split() == [
            version, torch.__version__]:
        return python
    print(f"making {home}: triton=={version}, torch=={torch.__version__}", flush=True)
    venv.create(home, with_pip=True, clear=True)
    subprocess.run([python, "-m", "pip", "install", "-q", f"triton=={version}", f"torch=={torch.__version__}",
                    "numpy"], check=True)
    return python


def _compile_elsewhere(python: str, jobs, arch: int, workers: int):
    """Step 2 in another interpreter: (its triton version, results as compile_jobs gives them)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(jobs, f)
        f.flush()
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        child = subprocess.run([python, __file__, "--compile", f.name, "--arch", str(arch), "--jobs", str(workers)],
                               env=env, capture_output=True, text=True)
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith(("{", "["))]
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"compiling in {python} failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    return lines[0]["triton"], [tuple(result) for result in lines[1:]]


def _compile_child(jobs_file: str, arch: int, workers: int) -> None:
    """Step 2 for _compile_elsewhere: this triton's version, then one JSON line per result."""
    import triton
    with open(jobs_file) as f:
        jobs = json.load(f)
    sys.path.insert(0, ROOT)
    print(json.dumps({"triton": triton.__version__}))
    for result in compile_jobs(jobs, arch, workers):
        print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: H100)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    compiler = parser.add_mutually_exclusive_group()
    compiler.add_argument("--python", default=os.environ.get("SPARSITY_EXT_TRITON_COMPILE_PYTHON"),
                          help="interpreter whose triton compiles (default: this one)")
    compiler.add_argument("--triton", metavar="VERSION", help="compile with this triton version (a venv of its own)")
    parser.add_argument("--compile", metavar="JOBS_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile:
        _compile_child(args.compile, args.arch, args.jobs)
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this check compiles the kernels", file=sys.stderr)
        return 2
    t0 = time.time()
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.run([sys.executable, __file__, "--record"], env=env, capture_output=True, text=True)
    if child.returncode != 0:
        print(child.stderr[-3000:])
        print("FAILED: recording the launches in the interpreter")
        return 1
    sys.path.insert(0, ROOT)
    launches = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    jobs = _compile_jobs(launches)
    print(f"{len(launches)} distinct launches recorded, {len(jobs)} variants to compile for sm_{args.arch} "
          f"({time.time() - t0:.0f} s)")
    python = _venv_with_triton(args.triton) if args.triton else args.python
    if python:
        version, results = _compile_elsewhere(python, jobs, args.arch, args.jobs)
    else:
        import triton
        version, results = triton.__version__, compile_jobs(jobs, args.arch, args.jobs)
    failures, usage = 0, {}
    for label, error, resources in results:
        if error:
            failures += 1
            print(f"FAILED {label}\n  {error}")
        else:
            usage.setdefault(label.split("(")[0], []).append((resources, label))
    print("| kernel | variants | registers | most stack bytes | most shared bytes | variant with most registers |")
    print("|---|---:|---:|---:|---:|---|")
    for kernel, variants in sorted(usage.items()):
        fields = [dict(field.split(":") for field in resources.split()) for resources, _ in variants]
        regs = [int(f.get("REG", 0)) for f in fields]
        heaviest = variants[regs.index(max(regs))][1]
        print(f"| {kernel} | {len(variants)} | {min(regs)}-{max(regs)} | {max(int(f.get('STACK', 0)) for f in fields)} "
              f"| {max(int(f.get('SHARED', 0)) for f in fields)} | {heaviest.split('(', 1)[1][:-1]} |")
    print(f"{len(jobs) - failures} of {len(jobs)} variants compiled for sm_{args.arch} with triton {version} "
          f"in {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        record()
    else:
        sys.exit(main())
