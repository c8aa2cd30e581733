"""Sparsifying a multi-GB safetensors checkpoint: `sparsity-ext sparsify` (tensor by tensor) against loading it
whole with torch.load and sparsifying with torch.ao.pruning's DataNormSparsifier.

Generates a DLRM-like checkpoint of --size-gb GiB of fp32 embedding tables (--tables equal tables) (plus a small MLP) as safetensors and
as a torch.save copy, then runs each contender in its own process, measuring wall time and peak memory:
  sparsity-ext packed   sparsify model.safetensors -o model.sparse.safetensors
  sparsity-ext dense    sparsify model.safetensors -o out.safetensors
  torch.ao              torch.load(model.pt) whole, DataNormSparsifier add_data/step/squash_mask per table,
                        torch.save of the result (the same job, the way torch.ao.pruning users do it)
Peak memory: VmHWM (peak resident set) and the peak of anonymous memory (RssAnon, sampled every 20 ms), which
leaves out file pages that are mapped but reclaimable. The results are checked: same bytes as torch.ao.pruning
per table, and the packed file restores the dense output bit for bit. Writes JSON and markdown to --out;
the generated files are deleted at the end.

  python benchmarks/bench_checkpoint.py --size-gb 4 --out benchmarks/results/cpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

EMBEDDING_DIM = 16
SEED = 0


def _memory_sampler():
    """Starts a thread that records the peak RssAnon (bytes) of this process; returns a function reading it."""
    peak = [0]

    def anon_bytes() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def sample():
        while True:
            peak[0] = max(peak[0], anon_bytes())
            time.sleep(0.02)
    threading.Thread(target=sample, daemon=True).start()
    return lambda: max(peak[0], anon_bytes())


def _vm_hwm() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _table_rows(size_gb: float, tables: int) -> list[int]:
    """Rows per table: equal tables summing to about size_gb GiB (so torch.ao.pruning's float mask of the
    table being sparsified stays a small part of its peak, and the comparison is about loading whole)."""
    return [int(size_gb * 2**30 / (EMBEDDING_DIM * 4) / tables)] * tables


def _generate(path: Path, rows: list[int]) -> None:
    """Streams the tables into a safetensors file, one table in memory at a time."""
    from sparsity_ext import checkpoint as ckpt
    names = {f"model.emb_l.{i}.weight": (n, EMBEDDING_DIM) for i, n in enumerate(rows)}
    names.update({"model.top_l.0.weight": (64, 128), "model.top_l.0.bias": (64,)})
    plan = [(name, torch.float32, shape, 0) for name, shape in names.items()]
    generator = torch.Generator().manual_seed(SEED)
    with open(path, "w+b") as handle:
        writer = ckpt.SafetensorsWriter(handle, plan, {"source": "bench_checkpoint.py"})
        for name, shape in names.items():
            writer.write(name, [torch.randn(shape, generator=generator)])
        writer.finish()


# ------------------------------------------------------------------------------ child processes
def _child(kind: str, source: str, output: str, level: float) -> None:
    peak_anon = _memory_sampler()
    start = time.perf_counter()
    if kind == "torch.ao":
        from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier
        state = torch.load(source, map_location="cpu", weights_only=True)
        for name, tensor in state.items():
            if ".emb_l." in name:  # one sparsifier per table, dropped after its squash: masks of one table at a time
                sparsifier = DataNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 4), norm="L1")
                sparsifier.add_data("t", tensor)
                sparsifier.step()
                sparsifier.squash_mask()
                del sparsifier
        torch.save(state, output)
    else:
        from sparsity_ext import cli
        with open(os.devnull, "w") as devnull:
            sys.stdout, stdout = devnull, sys.stdout
            status = cli.main(["sparsify", source, "-o", output, "--tensors", r"\.emb_l\.", "--level", str(level),
                               "--device", "cpu"])
            sys.stdout = stdout
        if status != 0:
            raise SystemExit(status)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": _vm_hwm(), "peak_anon_bytes": peak_anon()}))


def _run_child(kind: str, source: Path, output: Path, level: float) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", kind, str(source), str(output), "--level", str(level)],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check(source: Path, dense: Path, packed: Path, theirs: Path, level: float) -> dict:
    """Per table: same bytes as torch.ao.pruning's and same zero positions; where zero positions differ, whether
    every block concerned has the score of the k-th smallest block (an exact tie at the threshold, which
    torch.topk breaks in an unspecified order and sparsity_ext by lower index); and that the packed file
    restores `dense` bit for bit."""
    import torch.nn.functional as F

    from sparsity_ext import checkpoint as ckpt
    from sparsity_ext.reference import num_selected_blocks
    theirs_state = torch.load(theirs, map_location="cpu", weights_only=True, mmap=True)
    checks = {"same_bytes_as_torch_ao": True, "same_bytes_outside_tied_blocks": True, "same_zeros_as_torch_ao": True,
              "differing_blocks": 0,
              "differing_blocks_all_tied_at_threshold": True, "packed_restores_dense": True}
    with ckpt.open_checkpoint(source) as original, ckpt.open_checkpoint(dense) as ours, \
            ckpt.open_checkpoint(packed) as packed_file:
        for name in ours.names:
            mine, other = ours.tensor(name), theirs_state[name]
            checks["same_bytes_as_torch_ao"] &= torch.equal(mine.view(torch.int32), other.view(torch.int32))
            checks["packed_restores_dense"] &= torch.equal(packed_file.tensor(name).view(torch.int32),
                                                           mine.view(torch.int32))
            if ".emb_l." not in name:
                continue
            differing = ((mine == 0) != (other == 0)).view(-1, 4).any(1)
            checks["same_bytes_outside_tied_blocks"] &= torch.equal(mine.view(-1, 4)[~differing].view(torch.int32),
                                                                    other.view(-1, 4)[~differing].view(torch.int32))
            if not differing.any():
                continue
            checks["same_zeros_as_torch_ao"] = False
            checks["differing_blocks"] += int(differing.sum())
            scores = F.avg_pool2d(original.tensor(name).abs()[None, None], (1, 4), ceil_mode=True).reshape(-1)
            threshold = scores.kthvalue(num_selected_blocks(level, scores.numel())).values
            checks["differing_blocks_all_tied_at_threshold"] &= bool((scores[differing] == threshold).all())
    return {key: bool(v) if isinstance(v, bool) else v for key, v in checks.items()}


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--tables", type=int, default=8)
    parser.add_argument("--level", type=float, default=0.8)
    parser.add_argument("--workdir", type=Path, default=None, help="where the generated files go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.level)
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench_checkpoint.", dir=args.workdir))
    try:
        rows = _table_rows(args.size_gb, args.tables)
        source, source_pt = workdir / "model.safetensors", workdir / "model.pt"
        start = time.perf_counter()
        _generate(source, rows)
        print(f"generated {source}: {_gib(source.stat().st_size)} GiB, tables of {rows} rows x {EMBEDDING_DIM} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        subprocess.run([sys.executable, "-c", "import sys, torch; from safetensors.torch import load_file; "
                        "torch.save(load_file(sys.argv[1]), sys.argv[2])", str(source), str(source_pt)], check=True)
        runs = {}
        outputs = {"sparsity-ext packed": (source, workdir / "model.sparse.safetensors"),
                   "sparsity-ext dense": (source, workdir / "out.safetensors"),
                   "torch.load + torch.ao.pruning": (source_pt, workdir / "torch_ao.pt")}
        for label, (inp, out) in outputs.items():
            kind = "torch.ao" if label.startswith("torch") else "sparsity-ext"
            runs[label] = _run_child(kind, inp, out, args.level)
            runs[label]["output_bytes"] = out.stat().st_size
            print(f"{label}: {runs[label]['seconds']:.1f} s, peak RSS {_gib(runs[label]['peak_rss_bytes'])} GiB, "
                  f"peak anonymous {_gib(runs[label]['peak_anon_bytes'])} GiB", flush=True)
        checks = _check(source, workdir / "out.safetensors", workdir / "model.sparse.safetensors",
                        workdir / "torch_ao.pt", args.level)
        print(checks)
    finally:
        shutil.rmtree(workdir)

    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__},
              "checkpoint": {"bytes": sum(rows) * EMBEDDING_DIM * 4,
                             "tables_rows": rows, "dim": EMBEDDING_DIM, "dtype": "float32", "level": args.level,
                             "block": [1, 4]},
              "runs": runs, "checks": checks}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_checkpoint.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Sparsifying a {_gib(result['checkpoint']['bytes'])} GiB safetensors checkpoint",
             "", f"{len(rows)} fp32 tables x {EMBEDDING_DIM} (largest {rows[0]:,} rows, "
             f"{_gib(rows[0] * EMBEDDING_DIM * 4)} GiB), level {args.level}, block 1x4, L1; "
             f"{result['machine']['cores']} CPU cores, torch {torch.__version__}. "
             "Command: `python benchmarks/bench_checkpoint.py --size-gb "
             f"{args.size_gb:g}`.", "",
             "| run | time s | peak RSS GiB | peak anonymous GiB | output GiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, run in runs.items():
        lines.append(f"| {label} | {run['seconds']:.1f} | {_gib(run['peak_rss_bytes'])} | "
                     f"{_gib(run['peak_anon_bytes'])} | {_gib(run['output_bytes'])} |")
    lines += ["", "Each run in its own process: read, sparsify every table, write. Peak RSS (VmHWM) counts mapped file "
              "pages too; peak anonymous memory (RssAnon, sampled every 20 ms) does not.", "",
              f"Checks: same bytes as torch.ao.pruning: {checks['same_bytes_as_torch_ao']} (outside the blocks "
              f"whose zero-ness differs: {checks['same_bytes_outside_tied_blocks']}); same zero positions: "
              f"{checks['same_zeros_as_torch_ao']} ({checks['differing_blocks']} blocks differ, all of them exact "
              f"ties at the threshold score: {checks['differing_blocks_all_tied_at_threshold']}); packed file "
              f"restores the dense output bit for bit: {checks['packed_restores_dense']}.", ""]
    (args.out / "bench_checkpoint.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
