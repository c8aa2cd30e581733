"""The `bench` subcommand of the sparsity-ext CLI (also what benchmarks/bench_ops.py runs)."""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .suite import FLOOR


def _sizes(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(float(p)) if "e" in p.lower() else int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated element counts, e.g. 4096,65536, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"element counts must be positive, got {text!r}")
    return values


def _ops(text: str) -> list[str]:
    from .suite import case_names
    names = [p.strip() for p in text.split(",") if p.strip()]
    known = case_names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown op {', '.join(unknown) or repr(text)}; choose from {', '.join(known)}")
    return names


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmark every op on every backend against torch baselines and the memory floor",
        description="Time every sparsity_ext op on every backend available for the device, at several sizes, next "
                    "to the torch baselines that do the same job (torch.ao.pruning's mask update, torch.kthvalue / "
                    "torch.topk, masked_fill_ / mul_, torch's 2:4 conversion) and the copy-bandwidth floor. Writes "
                    "bench.json, bench.md and PNG plots (with matplotlib installed) into --out.")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to benchmark (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes: a run of a minute or two")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory, created if needed (default: ./sparsity-ext-bench-DEVICE[-quick])")
    p.add_argument("--ops", type=_ops, default=None, metavar="OP[,OP...]",
                   help="only these ops or cases (e.g. nm_mask,select_threshold; default: all)")
    p.add_argument("--sizes", type=_sizes, default=None, metavar="N[,N...]",
                   help="element counts to run every op at, instead of the default size ladder")
    p.add_argument("--budget", type=_budget, default=None, metavar="SECONDS",
                   help="seconds of timed repeats per measurement after the warm-up (default: 0.1-0.5 by device "
                        "and --quick; at least 3 runs are always made)")


class BenchError(Exception):
    """A bad argument found after parsing (no GPU, an unusable --out): reported in one line, exit status 2."""


def run(args) -> int:
    try:
        return _run(args)
    except BenchError as exc:
        print(f"sparsity-ext bench: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from . import plots, suite
    from .measure import copy_bandwidth, run_meta, write_results

    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or f"sparsity-ext-bench-{device}{'-quick' if args.quick else ''}"
    if os.path.exists(out) and not os.path.isdir(out):
        raise BenchError(f"--out {out!r} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create --out {out!r}: {exc.strerror or exc}") from exc
    plot_notice = plots.matplotlib_missing()
    if plot_notice:
        print(f"sparsity-ext bench: {plot_notice}", file=sys.stderr)

    start = time.perf_counter()
    bandwidth = copy_bandwidth(device)
    meta = run_meta(device, bandwidth, FLOOR)
    print(f"device: {meta['device']}; torch {meta['torch']}; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(read+write); commit {meta['commit']}", file=sys.stderr)
    rows, unavailable = suite.run_suite(device, args.quick, bandwidth, sizes=args.sizes, only=args.ops,
                                        budget_s=args.budget)
    title = f"sparsity_ext ops ({device}{', quick' if args.quick else ''})"
    written = [] if plot_notice else plots.write_plots(rows, out, f"{title}: {meta['device']}")
    meta.update({"quick": args.quick, "sizes": list(args.sizes) if args.sizes else None, "ops": args.ops,
                 "unavailable": unavailable, "ops_not_covered": suite.ops_not_covered(device), "plots": written, "wall_s": time.perf_counter() - start})
    from .._info import info
    meta["backends"] = info(as_text=False)["backends"]
    load = f"; 1-minute load average {meta['load_average']:.1f} at the start ({os.cpu_count()} CPUs)" \
        if meta["load_average"] is not None else ""
    report = (f"Commit {meta['commit']}; whole run {meta['wall_s']:.0f} s{load}.\n\n"
              + suite.markdown(rows, unavailable, device, written, plot_notice))
    write_results(os.path.join(out, "bench"), title, meta, rows, report)
    if written:
        print(f"plots: {', '.join(os.path.join(out, w) for w in written)}")
    print(f"bench: {meta['wall_s']:.0f} s", file=sys.stderr)
    return 0
