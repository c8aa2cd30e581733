"""Per-op kernel benchmark: every available backend, a torch baseline where one exists, and the floor.

    python benchmarks/bench_ops.py                   # CPU: cpu backend (+ reference on small cases)
    python benchmarks/bench_ops.py --device cuda     # GPU: cuda and triton backends
    python benchmarks/bench_ops.py --quick

floor = bytes each op must move at least (inputs read once, outputs written once) / measured copy
bandwidth (bytes read + written by a large tensor copy). Prints ms and x-over-floor per backend, and
writes JSON + markdown to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_sparsifiers import copy_bandwidth, write_results  # noqa: E402  (shared by both scripts)

import sparsity_ext  # noqa: E402
from sparsity_ext import ops  # noqa: E402


def _time(fn, device: str, budget_s: float) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 100):
        if device == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cases(device: str, quick: bool):
    """(name, op callable(tensors), make_inputs(), floor bytes, torch baseline or None)."""
    big = device == "cuda"
    rows, cols = ((2_000_000, 128) if quick else (16_000_000, 128)) if big else ((100_000, 64) if quick else (1_000_000, 64))
    nm_side = (4096 if quick else 16384) if big else (1024 if quick else 4096)
    n_select = (10**7 if quick else 10**8) if big else (10**6 if quick else 10**7)
    g = torch.Generator(device=device).manual_seed(0)

    def table():
        return {"x": torch.randn(rows, cols, generator=g, device=device)}

    def weight16():
        return {"x": torch.randn(nm_side, nm_side, generator=g, device=device).half()}

    def values():
        return {"v": torch.randn(n_select, generator=g, device=device)}

    def mask_inputs():
        x = torch.randn(rows, cols, generator=g, device=device)
        return {"x": x, "mask": x > 0, "packed": ops.pack_mask(x > 0)}

    t = rows * cols
    k = int(n_select * 0.8)
    return [
        (f"block_norm_mask {rows}x{cols} fp32 (1,4) 80% L1 -> bool", lambda a: ops.block_norm_mask(a["x"], 0.8, (1, 4), 4, 1),
         table, 4 * t + t, None),
        (f"block_norm_mask {rows}x{cols} fp32 (1,4) 80% L1 -> packed", lambda a: ops.block_norm_mask(a["x"], 0.8, (1, 4), 4, 1, packed=True),
         table, 4 * t + t / 8, None),
        (f"block_norm_mask_apply_ {rows}x{cols} fp32 (1,4) 80% -> packed", lambda a: ops.block_norm_mask_apply_(a["x"], 0.8, (1, 4), 4, 1, packed=True),
         table, 4 * t + 0.8 * 4 * t + t / 8, None),
        (f"nm_mask 2:4 {nm_side}x{nm_side} fp16", lambda a: ops.nm_mask(a["x"], 2, 4),
         weight16, 2 * nm_side**2 + nm_side**2, None),
        (f"select_threshold n={n_select:.0e} k=0.8n", lambda a: ops.select_threshold(a["v"], k),
         values, 4 * n_select, ("torch.kthvalue", lambda a: torch.kthvalue(a["v"], k))),
        (f"apply_mask_ {rows}x{cols} fp32 bool", lambda a: ops.apply_mask_(a["x"], a["mask"]),
         mask_inputs, 4 * t + t + 4 * t, ("masked_fill_", lambda a: a["x"].masked_fill_(~a["mask"], 0))),
        (f"pack_mask {rows}x{cols}", lambda a: ops.pack_mask(a["mask"]), mask_inputs, t + t / 8, None),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed repeats per measurement")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no GPU visible", file=sys.stderr)
        return 2
    bandwidth = copy_bandwidth(args.device)
    backends = ("cpu",) if args.device == "cpu" else ("cuda", "triton")
    hw = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"device: {hw}; torch {torch.__version__}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write)")
    rows = []
    for name, fn, make, floor_bytes, baseline in cases(args.device, args.quick):
        inputs = make()
        floor_ms = floor_bytes / bandwidth * 1e3
        impls = [(f"sparsity_ext[{b}]", b, fn) for b in backends]
        if baseline is not None:
            impls.append((baseline[0], None, baseline[1]))
        for impl, backend, call in impls:
            row = {"op": name, "impl": impl, "floor_ms": floor_ms}
            try:
                if backend is None:
                    row["ms"] = _time(lambda: call(inputs), args.device, args.budget)
                else:
                    with sparsity_ext.use_backend(backend):
                        row["ms"] = _time(lambda: call(inputs), args.device, args.budget)
                row["x_over_floor"] = row["ms"] / floor_ms
                print(f"  {name:58s} {impl:22s} {row['ms']:9.3f} ms  {row['x_over_floor']:6.2f}x floor", flush=True)
            except Exception as exc:  # an unavailable backend is reported, not hidden
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
                print(f"  {name:58s} {impl:22s} {row['error']}", flush=True)
            rows.append(row)
        del inputs
        if args.device == "cuda":
            torch.cuda.empty_cache()

    lines = ["| op | impl | ms | x over floor | floor ms |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "ms" in r:
            lines.append(f"| {r['op']} | {r['impl']} | {r['ms']:.3f} | {r['x_over_floor']:.2f} | {r['floor_ms']:.3f} |")
        else:
            lines.append(f"| {r['op']} | {r['impl']} | {r['error']} | | {r['floor_ms']:.3f} |")
    table = "\n".join(lines)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    meta = {"date": stamp, "device": hw, "torch": torch.__version__, "copy_bandwidth_gbps": bandwidth / 1e9,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "floor": "(bytes each op must read + write) / copy bandwidth"}
    write_results(os.path.join(args.out, f"ops-{args.device}{'-quick' if args.quick else ''}"),
                  f"sparsity_ext ops ({args.device})", meta, rows, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
