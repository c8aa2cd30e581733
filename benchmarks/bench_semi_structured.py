"""Benchmark of sparsify_24_pack (fused 2:4 prune + pack into torch's semi-structured CUTLASS layout):
every available backend against torch's own conversions, and against the memory floor.

    python benchmarks/bench_semi_structured.py                        # CUDA if present: 8192^2, 16384^2 fp16
    python benchmarks/bench_semi_structured.py --device cpu --sizes 512,1024,2048

Baselines (they get the input already 2:4-masked: they pack, they do not prune):
  CUDA: torch.sparse.to_sparse_semi_structured (torch's default, cuSPARSELt compression), the same with
        _FORCE_CUTLASS (torch's Python conversion on the GPU, the layout sparsify_24_pack produces), and
        torch._sparse_semi_structured_tile (prunes too, with its own 4x4-tile pattern, and packs both X and X^T).
  CPU:  torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass.
Floor: bytes(x read once) + bytes(values + metadata written once) over the measured copy bandwidth;
"x floor" = time / floor. Results: a table on stdout, semi_structured.json and semi_structured.md in --out
(default benchmarks/results/<device>/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's sparsity_ext, when it is not installed

import torch  # noqa: E402

import sparsity_ext  # noqa: E402
from sparsity_ext import ops  # noqa: E402
from sparsity_ext.bench.measure import copy_bandwidth, run_meta, time_call  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
BACKENDS = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def _backend_usable(name: str, device: str, dtype: torch.dtype) -> bool:
    try:
        with sparsity_ext.use_backend(name):
            sparsity_ext._backend.resolve("sparsify_24_pack", torch.device(device), dtype)
        return True
    except RuntimeError:
        return False


def _baselines(device: str):
    """(name, fn(x, masked) -> callable) of torch's conversions on this device."""
    if device == "cuda":
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        def cutlass(masked):
            SparseSemiStructuredTensor._FORCE_CUTLASS = True
            try:
                return to_sparse_semi_structured(masked)
            finally:
                SparseSemiStructuredTensor._FORCE_CUTLASS = False

        return [("torch.sparse.to_sparse_semi_structured (cuSPARSELt, pre-masked)",
                 lambda x, m: lambda: to_sparse_semi_structured(m)),
                ("torch.sparse.to_sparse_semi_structured (_FORCE_CUTLASS, pre-masked)", lambda x, m: lambda: cutlass(m)),
                ("torch._sparse_semi_structured_tile (own 4x4 pattern, X and X^T)",
                 lambda x, m: lambda: torch._sparse_semi_structured_tile(x))]
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass
    return [("torch sparse_semi_structured_from_dense_cutlass (CPU, pre-masked)",
             lambda x, m: lambda: sparse_semi_structured_from_dense_cutlass(m))]


def _data(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(n)
    if dtype == torch.int8:
        return torch.randint(-128, 128, (n, n), generator=g, device=device, dtype=torch.int8)
    return torch.randn(n, n, generator=g, device=device, dtype=torch.float32).to(dtype)


def run(device: str, sizes: list[int], dtype_name: str, budget_s: float, out: str) -> dict:
    dtype = DTYPES[dtype_name]
    bandwidth = copy_bandwidth(device)
    rows = []
    for n in sizes:
        x = _data(n, dtype, device)
        keep = ops.nm_mask(x.float() if dtype == torch.int8 else x, 2, 4)
        masked = x.masked_fill(~keep, 0)
        meta_bytes = (n * n // 16) * 2 if dtype != torch.int8 else (n * n // 32) * 4
        floor_bytes = x.numel() * x.element_size() + (x.numel() // 2) * x.element_size() + meta_bytes
        floor_ms = floor_bytes / bandwidth * 1e3
        calls = []
        for backend in BACKENDS[device]:
            if _backend_usable(backend, device, dtype):
                def call(backend=backend, x=x):
                    with sparsity_ext.use_backend(backend):
                        return ops.sparsify_24_pack(x)
                calls.append((f"sparsify_24_pack [{backend}]", call))
        calls += [(name, make(x, masked)) for name, make in _baselines(device)]
        for name, fn in calls:
            try:
                timing = time_call(fn, device, budget_s)
            except (RuntimeError, NotImplementedError) as exc:  # e.g. no cuSPARSELt in this torch build
                rows.append({"shape": [n, n], "dtype": dtype_name, "impl": name, "error": str(exc).splitlines()[0]})
                continue
            rows.append({"shape": [n, n], "dtype": dtype_name, "impl": name, "ms": timing.ms, "runs": timing.runs,
                         "floor_ms": floor_ms, "x_floor": timing.ms / floor_ms,
                         "gbps": floor_bytes / (timing.ms * 1e-3) / 1e9})
        del x, keep, masked
    result = {"meta": run_meta(device, bandwidth, "bytes(x) + bytes(values) + bytes(metadata), once each, "
                                                  "over the device's copy bandwidth"),
              "rows": rows}
    _write(result, out)
    return result


def _markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# sparsify_24_pack vs torch's 2:4 conversions ({meta['device']})", "",
             f"torch {meta['torch']}, commit {meta['commit']}, {meta['date']}, copy bandwidth "
             f"{meta['copy_bandwidth_gbps']:.1f} GB/s, load average {meta['load_average']}. Floor: {meta['floor']}.",
             "", "| shape | dtype | implementation | ms | x floor | effective GB/s |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for row in result["rows"]:
        shape = "x".join(map(str, row["shape"]))
        if "error" in row:
            lines.append(f"| {shape} | {row['dtype']} | {row['impl']} | error: {row['error']} | | |")
        else:
            lines.append(f"| {shape} | {row['dtype']} | {row['impl']} | {row['ms']:.3f} | {row['x_floor']:.1f} | "
                         f"{row['gbps']:.1f} |")
    return "\n".join(lines) + "\n"


def _write(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "semi_structured.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "semi_structured.md"), "w") as f:
        f.write(_markdown(result))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", help="comma-separated N of N x N inputs (default: CUDA 8192,16384; CPU 512,1024,2048)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per measurement")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<device>/)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [8192, 16384] if args.device == "cuda" else [512, 1024, 2048])
    out = args.out or os.path.join(HERE, "results", args.device)
    result = run(args.device, sizes, args.dtype, args.budget, out)
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
