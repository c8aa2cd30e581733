"""torch.ao.pruning's own sparsifiers, unpatched vs under sparsity_ext.accelerate_torch_ao().

One process times torch.ao.pruning's WeightNormSparsifier.step / DataNormSparsifier.step (and
NearlyDiagonalSparsifier.step) on each case,
then patches the classes with sparsity_ext.accelerate_torch_ao() and times the same sparsifier objects
again (restore_torch_ao() afterwards). It also checks that both give the same mask (values and dtype).

    python benchmarks/bench_accelerate.py --out benchmarks/results/cpu
    python benchmarks/bench_accelerate.py --quick     # small shapes, a smoke run

Prints a table (ms unpatched, ms patched, speedup) and writes accelerate-<device>.json / .md to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # the checkout's sparsity_ext, when it is not installed
import sparsity_ext  # noqa: E402
from sparsity_ext.bench.measure import copy_bandwidth, run_meta, time_call, write_results  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str                # "weight": WeightNormSparsifier on an nn.Linear weight; "data": DataNormSparsifier;
                             # "diagonal": NearlyDiagonalSparsifier on an nn.Linear weight (level = nearliness)
    shape: tuple[int, int]
    level: float
    block: tuple[int, int] = (1, 1)
    zeros: int = 1


CASES = [
    Case("WeightNorm 4096x4096 (1,4) 50%", "weight", (4096, 4096), 0.5, (1, 4), 4),
    Case("WeightNorm 4096x4096 2:4", "weight", (4096, 4096), 1.0, (1, 4), 2),
    Case("DataNorm 1000000x64 (1,4) 80%", "data", (1_000_000, 64), 0.8, (1, 4), 4),
    Case("NearlyDiagonal 4096x4096 nearliness 9", "diagonal", (4096, 4096), 9),
]
QUICK = [
    Case("WeightNorm 512x512 (1,4) 50%", "weight", (512, 512), 0.5, (1, 4), 4),
    Case("WeightNorm 512x512 2:4", "weight", (512, 512), 1.0, (1, 4), 2),
    Case("DataNorm 20000x64 (1,4) 80%", "data", (20_000, 64), 0.8, (1, 4), 4),
    Case("NearlyDiagonal 512x512 nearliness 9", "diagonal", (512, 512), 9),
]


def torch_ao_sparsifier(case: Case, device: str):
    """(torch.ao.pruning sparsifier ready to step, function returning its current mask)."""
    from torch.ao.pruning import NearlyDiagonalSparsifier, WeightNormSparsifier
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier

    data = torch.randn(case.shape, device=device)
    if case.kind in ("weight", "diagonal"):
        model = nn.Sequential(nn.Linear(case.shape[1], case.shape[0], bias=False, device=device))
        with torch.no_grad():
            model[0].weight.copy_(data)
        if case.kind == "weight":
            sparsifier = WeightNormSparsifier(sparsity_level=case.level, sparse_block_shape=case.block,
                                              zeros_per_block=case.zeros)
        else:
            sparsifier = NearlyDiagonalSparsifier(nearliness=int(case.level))
        sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
        return sparsifier, lambda: model[0].parametrizations.weight[0].mask
    sparsifier = DataNormSparsifier(sparsity_level=case.level, sparse_block_shape=case.block,
                                    zeros_per_block=case.zeros, norm="L1")
    sparsifier.add_data("table", data)
    return sparsifier, lambda: sparsifier.get_mask("table")


def measure(case: Case, device: str, budget: float) -> dict:
    sparsifier, current_mask = torch_ao_sparsifier(case, device)
    initial = current_mask().clone()

    def reset():  # every timed step is a first step: from the all-ones mask prepare made
        current_mask().data = initial.clone()

    unpatched = time_call(sparsifier.step, device, budget, setup=reset)
    expected = current_mask().clone()
    with sparsity_ext.accelerate_torch_ao():
        patched = time_call(sparsifier.step, device, budget, setup=reset)
        got = current_mask().clone()
    same = got.dtype == expected.dtype and torch.equal(got, expected)
    row = {"case": case.name, "shape": list(case.shape), "level": case.level, "block": list(case.block),
           "zeros_per_block": case.zeros, "unpatched_ms": unpatched.ms, "unpatched_runs": unpatched.runs,
           "patched_ms": patched.ms, "patched_runs": patched.runs, "speedup": unpatched.ms / patched.ms,
           "same_mask": same, "mask_dtype": str(got.dtype)}
    print(f"{case.name}: torch.ao {unpatched.ms:.2f} ms, patched {patched.ms:.2f} ms "
          f"({row['speedup']:.1f}x), same mask: {same}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed repeats per measurement")
    parser.add_argument("--note", default="", help="a line added under the table (e.g. how loaded the machine was)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()

    torch.manual_seed(0)
    meta = run_meta(args.device, copy_bandwidth(args.device), "not used (patched vs unpatched torch.ao.pruning)")
    meta["backend"] = sparsity_ext.current_backend()
    rows = [measure(case, args.device, args.budget) for case in (QUICK if args.quick else CASES)]
    table = "\n".join(["| case | torch.ao ms | patched ms | speedup | same mask (dtype) |",
                       "|---|---:|---:|---:|---|"]
                      + [f"| {r['case']} | {r['unpatched_ms']:.2f} | {r['patched_ms']:.2f} | {r['speedup']:.1f}x | "
                         f"{'yes' if r['same_mask'] else 'NO'} ({r['mask_dtype']}) |" for r in rows])
    table += ("\n\nBoth columns time the same torch.ao.pruning sparsifier object's step(): first as torch ships it,"
              " then under `sparsity_ext.accelerate_torch_ao()`. Median of repeated steps, each starting from "
              "the all-ones mask of a freshly prepared sparsifier.")
    if meta["load_average"] is not None:  # other work on the machine inflates CPU times
        table += f"\n\n1-minute load average at the start: {meta['load_average']:.1f} on {os.cpu_count()} cores."
    if args.note:
        table += f" {args.note}"
    meta["note"] = args.note
    suffix = "-quick" if args.quick else ""
    write_results(os.path.join(args.out, f"accelerate-{args.device}{suffix}"),
                  f"torch.ao.pruning sparsifier step, unpatched vs accelerate_torch_ao() ({args.device})",
                  meta, rows, table)


if __name__ == "__main__":
    main()
