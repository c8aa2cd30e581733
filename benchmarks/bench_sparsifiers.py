"""torch.ao.pruning vs sparsity_ext: sparsifier step time, peak extra memory, and the memory floor.

One run times, for each case, torch.ao.pruning's WeightNormSparsifier.step / DataNormSparsifier.step
and the same configuration on sparsity_ext (its classes, and the bare op), each in a fresh
subprocess (so peak memory is its own), next to the memory-bandwidth floor:
    floor = (bytes of W read once + bytes of a bool mask written once) / measured copy bandwidth,
where copy bandwidth counts bytes read + written by a large device-to-device tensor copy.

    python benchmarks/bench_sparsifiers.py                 # CPU cases, cpu backend
    python benchmarks/bench_sparsifiers.py --device cuda   # GPU cases, cuda and triton backends
    python benchmarks/bench_sparsifiers.py --quick         # small shapes, a smoke run

Prints a table (ms, speedup over torch.ao, x over floor, peak extra MiB) and writes JSON and
markdown to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # the checkout's sparsity_ext, when it is not installed
from sparsity_ext.bench.measure import copy_bandwidth, peak_probe, sync, time_call, write_results  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str            # "weight": WeightNormSparsifier.step on an nn.Linear weight; "data": DataNormSparsifier.step;
                         # "data_squash": add_data + step + squash_mask on a fresh copy of the table each run
    shape: tuple[int, int]
    dtype: str
    level: float
    block: tuple[int, int]
    zeros: int
    norm: str            # "L1" or "L2"


CASES = {
    "cpu": [
        Case("WeightNorm 4096x4096 (1,4) 50%", "weight", (4096, 4096), "float32", 0.5, (1, 4), 4, "L2"),
        Case("WeightNorm 4096x4096 2:4", "weight", (4096, 4096), "float32", 1.0, (1, 4), 2, "L2"),
        Case("DataNorm 1000000x64 (1,4) 80%", "data", (1_000_000, 64), "float32", 0.8, (1, 4), 4, "L1"),
    ],
    "cuda": [
        Case("DataNorm 16000000x128 (1,4) 80%", "data", (16_000_000, 128), "float32", 0.8, (1, 4), 4, "L1"),
        Case("WeightNorm 16384x16384 fp16 2:4", "weight", (16384, 16384), "float16", 1.0, (1, 4), 2, "L2"),
        Case("WeightNorm 8192x8192 fp16 2:4", "weight", (8192, 8192), "float16", 1.0, (1, 4), 2, "L2"),
        Case("WeightNorm 4096x4096 (1,4) 50%", "weight", (4096, 4096), "float32", 0.5, (1, 4), 4, "L2"),
    ],
}
QUICK = {
    "cpu": [Case("WeightNorm 512x512 (1,4) 50%", "weight", (512, 512), "float32", 0.5, (1, 4), 4, "L2"),
            Case("DataNorm 20000x64 (1,4) 80%", "data", (20_000, 64), "float32", 0.8, (1, 4), 4, "L1")],
    "cuda": [Case("WeightNorm 2048x2048 fp16 2:4", "weight", (2048, 2048), "float16", 1.0, (1, 4), 2, "L2"),
             Case("DataNorm 1000000x64 (1,4) 80%", "data", (1_000_000, 64), "float32", 0.8, (1, 4), 4, "L1")],
}
# DataNormSparsifier over table sizes (issue: 10^5 to 4*10^6 rows x 64), with the lean masks.
DATA_SWEEP = [Case(f"DataNorm {rows}x64 (1,4) 80% +squash", "data_squash", (rows, 64), "float32", 0.8, (1, 4), 4, "L1")
              for rows in (100_000, 300_000, 1_000_000, 2_000_000, 4_000_000)]
DATA_SWEEP_QUICK = DATA_SWEEP[:1]
# impl name -> backend it pins (None: torch.ao.pruning itself); "[bool]"/"[packed]": the lean mask_dtype
IMPLS = {
    "cpu": {"torch.ao": None, "sparsity_ext": "cpu", "op[cpu]": "cpu"},
    "cuda": {"torch.ao": None, "sparsity_ext": "cuda", "op[cuda]": "cuda", "op[triton]": "triton"},
}


# ----------------------------------------------------------------------------- worker (subprocess)
def _build(case: Case, impl: str, backend: str | None, device: str):
    """Returns (setup, step): step() is one timed call, setup() runs untimed before each (inputs are
    allocated here or in setup, before the clock)."""
    import torch
    from torch import nn
    g = torch.Generator(device=device).manual_seed(0)  # generated where it lives: 8 GB tables take seconds on a CPU
    data = torch.randn(case.shape, generator=g, dtype=torch.float32, device=device).to(getattr(torch, case.dtype))
    norm_int = 1 if case.norm == "L1" else 2
    if impl.startswith("op"):
        import sparsity_ext
        from sparsity_ext import ops

        def step():
            with sparsity_ext.use_backend(backend):
                return ops.block_norm_mask(data, case.level, case.block, case.zeros, norm_int)
        return (lambda: None), step
    if backend is None:
        import torch.ao.pruning as ao
        from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as AoDataNorm
        weight_cls, data_cls, ctx = ao.WeightNormSparsifier, AoDataNorm, None
    else:
        import sparsity_ext
        from sparsity_ext.data_sparsifier import DataNormSparsifier as SxDataNorm
        weight_cls, data_cls, ctx = sparsity_ext.WeightNormSparsifier, SxDataNorm, backend
    lean = {"[bool]": {"mask_dtype": torch.bool}, "[packed]": {"mask_dtype": "packed"}}.get(impl[impl.find("["):], {})
    if case.kind == "data_squash":
        table = {}

        def setup():
            table["data"] = data.clone()

        def squash_step():
            sparsifier = data_cls(sparsity_level=case.level, sparse_block_shape=case.block, zeros_per_block=case.zeros,
                                  norm=case.norm, **lean)
            sparsifier.add_data("table", table.pop("data"))
            sparsifier.step()
            sparsifier.squash_mask()
        if ctx is None:
            return setup, squash_step

        def step_on_backend():
            with sparsity_ext.use_backend(ctx):
                squash_step()
        return setup, step_on_backend
    if case.kind == "weight":
        model = nn.Sequential(nn.Linear(case.shape[1], case.shape[0], bias=False, device="meta"))
        model[0].weight = nn.Parameter(data, requires_grad=False)
        sparsifier = weight_cls(sparsity_level=case.level, sparse_block_shape=case.block,
                                zeros_per_block=case.zeros, norm=norm_int)
        sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    else:
        sparsifier = data_cls(sparsity_level=case.level, sparse_block_shape=case.block,
                              zeros_per_block=case.zeros, norm=case.norm)
        sparsifier.add_data("table", data)
    if ctx is None:
        return (lambda: None), sparsifier.step

    def step():
        with sparsity_ext.use_backend(ctx):
            sparsifier.step()
    return (lambda: None), step


def worker(case: Case, impl: str, backend: str | None, device: str, budget_s: float) -> dict:
    import torch
    try:
        setup, step = _build(case, impl, backend, device)
        reset, peak = peak_probe(device)
        setup()
        if device == "cuda":  # warm-up first: triton autotuning allocates benchmark buffers of its own
            step()
            sync(device)
            setup()
        reset()
        step()  # on the CPU also the warm-up; its peak is the one reported
        sync(device)
        peak_bytes = peak()
        timing = time_call(step, device, budget_s, setup=setup, warmup=False, max_runs=50)
        return {"ms": timing.ms, "runs": timing.runs, "peak_extra_mib": peak_bytes / 2**20}
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0][:120]}"}
    except Exception as exc:  # reported in the table, never hidden
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}


# ------------------------------------------------------------------------------------- driver
def run_in_subprocess(case: Case, impl: str, backend: str | None, device: str, budget_s: float) -> dict:
    payload = json.dumps({"case": dataclasses.asdict(case), "impl": impl, "backend": backend,
                          "device": device, "budget_s": budget_s})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", payload],
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    parser.add_argument("--suite", choices=("steps", "data-sweep"), default="steps",
                        help="steps: WeightNorm/DataNorm step cases; data-sweep: DataNorm add_data+step+squash_mask "
                             "over table sizes with the lean masks")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed repeats per measurement")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        case = Case(**{**spec["case"], "shape": tuple(spec["case"]["shape"]), "block": tuple(spec["case"]["block"])})
        print(json.dumps(worker(case, spec["impl"], spec["backend"], spec["device"], spec["budget_s"])))
        return 0

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no GPU visible", file=sys.stderr)
        return 2
    import sparsity_ext
    bandwidth = copy_bandwidth(args.device)
    hw = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"device: {hw}; torch {torch.__version__}; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write)")
    rows = []
    if args.suite == "data-sweep":
        cases = DATA_SWEEP_QUICK if args.quick else DATA_SWEEP
        impls = {"torch.ao": None, **{f"sparsity_ext{v}": args.device for v in ("", "[bool]", "[packed]")}}
    else:
        cases, impls = (QUICK if args.quick else CASES)[args.device], IMPLS[args.device]
    for case in cases:
        elem = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
        numel = case.shape[0] * case.shape[1]
        floor_ms = (numel * elem + numel) / bandwidth * 1e3
        results = {}
        for impl, backend in impls.items():
            res = run_in_subprocess(case, impl, backend, args.device, args.budget)
            results[impl] = res
            status = f"{res['ms']:.2f} ms" if "ms" in res else res["error"]
            print(f"  {case.name:36s} {impl:14s} {status}", flush=True)
        base = results["torch.ao"].get("ms")
        for impl, res in results.items():
            row = {"case": case.name, "impl": impl, "floor_ms": floor_ms, **res}
            if "ms" in res:
                row["speedup_vs_torch_ao"] = base / res["ms"] if base else None
                row["x_over_floor"] = res["ms"] / floor_ms
            rows.append(row)

    header = "| case | impl | ms | speedup vs torch.ao | x over floor | peak extra MiB |\n|---|---|---:|---:|---:|---:|"
    lines = [header]
    for r in rows:
        if "ms" in r:
            sp = f"{r['speedup_vs_torch_ao']:.1f}x" if r.get("speedup_vs_torch_ao") else "-"
            lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.2f} | {sp} | {r['x_over_floor']:.2f} | "
                         f"{r['peak_extra_mib']:.1f} |")
        else:
            lines.append(f"| {r['case']} | {r['impl']} | {r['error']} | | | |")
    table = "\n".join(lines)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    meta = {"date": stamp, "device": hw, "torch": torch.__version__, "python": platform.python_version(),
            "copy_bandwidth_gbps": bandwidth / 1e9, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "floor": "(W bytes + bool mask bytes) / copy bandwidth", "backends": sparsity_ext.info(as_text=False)["backends"]}
    suffix = ("-data-sweep" if args.suite == "data-sweep" else "") + ("-quick" if args.quick else "")
    write_results(os.path.join(args.out, f"sparsifiers-{args.device}{suffix}"),
                  f"sparsifier step: torch.ao.pruning vs sparsity_ext ({args.device})", meta, rows, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
