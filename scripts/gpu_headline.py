"""The headline rows of the GPU goals in one process: each op at its headline size on every backend that runs it
(and the torch baselines the goals name), the two sparsifier steps next to their op, all against the copy
bandwidth measured here first. Small budgets: the whole run takes about a minute on an H200.

    python scripts/gpu_headline.py --out DIR [--budget 0.05]
    python scripts/gpu_headline.py --device cpu --small --out DIR   # the same flow on the CPU at small sizes

Writes DIR/headline.json (meta + rows), DIR/headline.md and DIR/headline.txt (the compact table that
scripts/gpu_run.sh prints in its summary). x floor = ms / ((bytes read once + bytes written once) / bandwidth).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparsity_ext  # noqa: E402
from sparsity_ext.bench import cases as bench_cases  # noqa: E402
from sparsity_ext.bench.measure import copy_bandwidth, run_meta, time_call, write_results  # noqa: E402
from sparsity_ext.bench.suite import Impl, backends_for, measure  # noqa: E402

TABLE = 16_000_000 * 128     # the embedding table: 16M rows x 128 fp32
SQUARE = 16384 * 16384       # the 2:4 weight: 16384^2 fp16
VECTOR = 10 ** 8             # select_threshold's values
SMALL = {TABLE: 4096 * 128, SQUARE: 512 * 512, VECTOR: 10 ** 5}
# (bench case key, elements, goal: the most x over floor asked for)
OP_ROWS = (
    ("block_norm_mask", TABLE, 1.5),
    ("block_norm_mask.packed", TABLE, 1.5),
    ("block_norm_mask_apply_", TABLE, 1.8),
    ("select_threshold", VECTOR, 3.0),
    ("apply_mask_", TABLE, 1.3),
    ("apply_mask_.packed", TABLE, 1.3),
    ("nm_mask", SQUARE, 1.2),
    ("sparsify_24_pack", SQUARE, 1.2),
)
STEP_GOAL = 1.3  # a sparsifier step: at most this many times its op
TRITON_GOAL = 1.3  # triton: at most this many times cuda


def _cutlass_conversion(inputs: dict):
    """torch.sparse.to_sparse_semi_structured of the pre-masked input under _FORCE_CUTLASS: the layout
    sparsify_24_pack writes (torch's default on this GPU may be cuSPARSELt)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    def convert():
        saved = SparseSemiStructuredTensor._FORCE_CUTLASS
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
        try:
            return to_sparse_semi_structured(inputs["masked"])
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = saved
    return convert


def _impls(case: bench_cases.Case, device: str) -> list[Impl]:
    """The compiled backends (never the reference) and the case's baselines that are not slow by design."""
    usable, _ = backends_for(case, device)
    impls = [Impl(f"sparsity_ext[{b}]", b, None) for b in usable if b != "reference"]
    impls += [Impl(b.name, None, b) for b in case.baselines if not b.slow]
    if case.key == "sparsify_24_pack" and device == "cuda":
        impls.append(Impl("torch.sparse.to_sparse_semi_structured (_FORCE_CUTLASS, pre-masked)", None,
                          bench_cases.Baseline("cutlass", _cutlass_conversion, "cutlass")))
    return impls


def op_rows(device: str, small: bool, bandwidth: float, budget: float) -> list[dict]:
    every = {c.key: c for c in bench_cases.cases(device)}
    rows, measured = [], set()  # measured: (baseline key, shape) already timed for an earlier case
    for key, numel, goal in OP_ROWS:
        case = every[key]
        shape = bench_cases.shape_for(case.layout, SMALL[numel] if small else numel)
        actual = 1
        for s in shape:
            actual *= s
        inputs = case.make(shape, device, torch.Generator(device=device).manual_seed(0))
        floor_ms = case.floor_bytes(actual) / bandwidth * 1e3
        for impl in _impls(case, device):
            if impl.baseline is not None:
                if (impl.baseline.key, tuple(shape)) in measured:
                    continue
                measured.add((impl.baseline.key, tuple(shape)))
            result = measure(case, impl, inputs, device, budget)
            row = {"case": key, "title": case.title, "shape": list(shape), "numel": actual, "impl": impl.name,
                   "backend": impl.backend, "floor_ms": floor_ms, "goal_x_floor": None if impl.baseline else goal,
                   **result}
            if "ms" in row:
                row["x_over_floor"] = row["ms"] / floor_ms
            rows.append(row)
            print(f"{key} {'x'.join(map(str, shape))} {impl.name}: {_status(row)}", file=sys.stderr, flush=True)
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _data_norm_step(table: torch.Tensor, backend: str, mask_dtype):
    from sparsity_ext.data_sparsifier import DataNormSparsifier
    sparsifier = DataNormSparsifier(sparsity_level=bench_cases.LEVEL, sparse_block_shape=bench_cases.BLOCK,
                                    norm="L1", mask_dtype=mask_dtype)
    sparsifier.add_data("table", table)

    def step():
        with sparsity_ext.use_backend(backend):
            sparsifier.step()
    return step


def _weight_norm_24_step(weight: torch.Tensor, backend: str):
    model = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta"))
    model[0].weight = torch.nn.Parameter(weight, requires_grad=False)
    sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])

    def step():
        with sparsity_ext.use_backend(backend):
            sparsifier.step()
    return step


def step_rows(device: str, small: bool, budget: float, ops: list[dict]) -> list[dict]:
    """DataNormSparsifier.step with the lean masks (bool, packed) on the table and WeightNormSparsifier.step 2:4
    on the square, per backend, each next to the op row doing the same mask: x op = step ms / op ms."""
    op_ms = {(r["case"], r["backend"]): r["ms"] for r in ops if "ms" in r and r["backend"]}
    backends = sorted({r["backend"] for r in ops if r["backend"]})
    generator = torch.Generator(device=device).manual_seed(1)
    table_shape = bench_cases.shape_for("table", SMALL[TABLE] if small else TABLE)
    square_shape = bench_cases.shape_for("square", SMALL[SQUARE] if small else SQUARE)
    rows = []
    specs = [("DataNormSparsifier.step, bool masks", "block_norm_mask", table_shape, torch.float32,
              lambda x, b: _data_norm_step(x, b, torch.bool)),
             ("DataNormSparsifier.step, packed masks", "block_norm_mask.packed", table_shape, torch.float32,
              lambda x, b: _data_norm_step(x, b, "packed")),
             ("WeightNormSparsifier.step 2:4", "nm_mask", square_shape, torch.float16, _weight_norm_24_step)]
    for title, op_case, shape, dtype, make_step in specs:
        data = torch.randn(shape, generator=generator, device=device).to(dtype)
        for backend in backends:
            row = {"case": title, "shape": list(shape), "impl": f"sparsity_ext[{backend}]", "backend": backend,
                   "op_case": op_case, "goal_x_op": STEP_GOAL}
            try:
                row["ms"] = time_call(make_step(data, backend), device, budget, max_runs=30).ms
            except Exception as exc:  # noqa: BLE001 - reported in the table, the other rows still run
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            if "ms" in row and (op_case, backend) in op_ms:
                row["x_op"] = row["ms"] / op_ms[(op_case, backend)]
            rows.append(row)
            print(f"{title} {backend}: {_status(row)}", file=sys.stderr, flush=True)
        del data
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _status(row: dict) -> str:
    return f"{row['ms']:.3f} ms" if "ms" in row else row["error"]


def _cell(row: dict | None, key: str) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "error"
    return f"{row[key]:.3f}" if key == "ms" else f"{row[key]:.2f}"


def compact_table(ops: list[dict], steps: list[dict], bandwidth: float, device: str) -> str:
    """One line per headline case: each compiled backend's ms and x floor, triton / fastest other backend, goal;
    then the baselines and the sparsifier steps."""
    lines = [f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write, a large fp32 copy on {device})", "",
             f"{'case':24s} {'elements':>13s} {'backend':>8s} {'ms':>9s} {'x floor':>7s} {'goal':>5s}  "
             f"{'triton/cuda':>11s}"]
    for key, _, goal in OP_ROWS:
        ours = [r for r in ops if r["case"] == key and r["goal_x_floor"] is not None]
        by_backend = {r["backend"]: r for r in ours}
        ratio = ""
        if "ms" in by_backend.get("triton", {}) and "ms" in by_backend.get("cuda", {}):
            value = by_backend["triton"]["ms"] / by_backend["cuda"]["ms"]
            ratio = f"{value:.2f}{' ' if value <= TRITON_GOAL else '!'}"
        for i, row in enumerate(ours or [None]):
            missed = row is not None and row.get("x_over_floor", 0) > goal
            elements = f"{row['numel']:,}" if row and i == 0 else ""
            backend = row["backend"] if row else "-"
            lines.append(f"{key if i == 0 else '':24s} {elements:>13s} {backend:>8s} {_cell(row, 'ms'):>9s} "
                         f"{_cell(row, 'x_over_floor'):>7s}{'!' if missed else ' '}{goal:>4.1f}x  "
                         f"{ratio if i == 0 else '':>11s}")
    baselines = [r for r in ops if r["goal_x_floor"] is None]
    if baselines:
        lines += ["", "baselines:"]
        lines += [f"  {r['case']:22s} {r['impl'][:52]:52s} {_cell(r, 'ms'):>9s} ms {_cell(r, 'x_over_floor'):>6s}x floor"
                  for r in baselines]
    if steps:
        lines += ["", f"sparsifier steps (goal: <= {STEP_GOAL}x their op):"]
        for r in steps:
            x_op = f"{r['x_op']:.2f}x {r['op_case']}{'' if r['x_op'] <= STEP_GOAL else ' !'}" if "x_op" in r else ""
            lines.append(f"  {r['case']:38s} {r['backend']:>7s} {_cell(r, 'ms'):>9s} ms  {x_op}")
    lines.append("(! = goal missed)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--small", action="store_true", help="small sizes (a check of this script's flow)")
    parser.add_argument("--budget", type=float, default=0.05, help="seconds of timed repeats per measurement")
    parser.add_argument("--out", required=True, help="folder for headline.json, headline.md, headline.txt")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    bandwidth = copy_bandwidth(args.device)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", file=sys.stderr, flush=True)
    ops = op_rows(args.device, args.small, bandwidth, args.budget)
    steps = step_rows(args.device, args.small, args.budget, ops)
    meta = run_meta(args.device, bandwidth, "(bytes the op must read once + write once) / measured copy bandwidth")
    meta.update({"small": args.small, "budget_s": args.budget, "step_goal_x_op": STEP_GOAL,
                 "triton_goal_x_cuda": TRITON_GOAL})
    table = compact_table(ops, steps, bandwidth, meta["device"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "headline.txt"), "w") as f:
        f.write(table + "\n")
    write_results(os.path.join(args.out, "headline"), f"headline rows ({meta['device']})", meta, ops + steps,
                  "```\n" + table + "\n```")
    failed = [r for r in ops + steps if "error" in r and r.get("backend")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
