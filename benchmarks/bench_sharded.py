"""Row-sharded DataNormSparsifier.step (sparsity_ext.distributed) over gloo on this machine: step time at
1, 2 and 4 processes for a few table sizes, and the bytes each rank sends per step.

Each world size is one launch of `world` processes (gloo, a FileStore in a temporary directory); rank r
holds an even share of the rows of a float32 table of `rows` x 64 (random data), sparsified at level 0.8
with (1, 4) blocks, L1, bool masks. A step is timed from a barrier to its return on every rank (the step
ends with the all-or-none vote, so the ranks finish together); the reported time is the median over runs
of the slowest rank. At 1 process the unsharded DataNormSparsifier.step on the same table is timed too.

Bytes per step are counted, not sampled: every all-reduce of the step (one per radix pass, one of the
per-rank tie counts, one vote) sends a fixed int64 buffer of 2^11 + world_size values, whatever the
table's size; the step also starts with one all_gather_object of each rank's shard description
("metadata", its pickled size is listed).

    python benchmarks/bench_sharded.py                                   # 1e5, 1e6, 4e6 rows; 1, 2, 4 processes
    python benchmarks/bench_sharded.py --rows 100000 --worlds 1 2 --out /tmp/bench   # a quick run

Writes sharded-cpu.json and sharded-cpu.md to --out (default benchmarks/results/cpu).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's sparsity_ext, when it is not installed

WIDTH = 64
LEVEL, BLOCK, NORM = 0.8, (1, 4), "L1"


def worker(rank: int, world: int, init_file: str, out_file: str, sizes: list[int], runs: int, threads: int) -> None:
    import torch
    import torch.distributed as dist

    from sparsity_ext.data_sparsifier import DataNormSparsifier
    from sparsity_ext.distributed import ShardedDataNormSparsifier
    from sparsity_ext.distributed.sharded import _describe

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = []
    for rows in sizes:
        local_rows = rows // world + (rank < rows % world)
        local = torch.randn(local_rows, WIDTH, generator=torch.Generator().manual_seed(1000 * rank + rows))
        sparsifier = ShardedDataNormSparsifier(sparsity_level=LEVEL, sparse_block_shape=BLOCK, norm=NORM,
                                               mask_dtype=torch.bool)
        sparsifier.add_data("table", local)
        sparsifier.step()  # warm-up
        times = []
        for _ in range(runs):
            dist.barrier()
            start = time.perf_counter()
            sparsifier.step()
            times.append(time.perf_counter() - start)
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        metadata = {"error": None, "names": ["table"], "shards": [_describe(local, LEVEL, BLOCK, 4, 1)]}
        row = dict(rows=rows, width=WIDTH, world=world, threads_per_process=torch.get_num_threads(),
                   ms=statistics.median(slowest.tolist()) * 1e3, runs=runs,
                   allreduce_bytes_per_rank=sparsifier.last_step_bytes,
                   allreduce_buffer_bytes=((1 << 11) + world) * 8,
                   metadata_bytes_per_rank=len(pickle.dumps(metadata)))
        row["collectives"] = row["allreduce_bytes_per_rank"] // row["allreduce_buffer_bytes"]
        if world == 1:  # the unsharded sparsifier on the same (whole) table
            plain = DataNormSparsifier(sparsity_level=LEVEL, sparse_block_shape=BLOCK, norm=NORM, mask_dtype=torch.bool)
            plain.add_data("table", local)
            plain.step()
            plain_times = []
            for _ in range(runs):
                start = time.perf_counter()
                plain.step()
                plain_times.append(time.perf_counter() - start)
            row["unsharded_ms"] = statistics.median(plain_times) * 1e3
            assert torch.equal(plain.get_mask("table"), sparsifier.get_mask("table"))
        results.append(row)
        del sparsifier, local
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


# glibc settings that keep freed memory for reuse instead of returning it to the kernel: every step allocates
# scores, keys and masks afresh, and on this VM faulting fresh pages in costs more than the step's arithmetic,
# and more still when processes fault at once.
MALLOC_REUSE = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
                "MALLOC_TOP_PAD_": str(1 << 30)}


def launch(world: int, sizes: list[int], runs: int, threads: int, malloc: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rank0.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), **(MALLOC_REUSE if malloc == "reuse" else {}))
        worker_args = [os.path.join(tmp, "store"), out_file, ",".join(map(str, sizes)), str(runs), str(threads)]
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(world), *worker_args], env=env)
                 for rank in range(world)]
        codes = [proc.wait() for proc in procs]
        if any(codes):
            raise RuntimeError(f"world {world}: exit codes {codes}")
        with open(out_file) as f:
            return [dict(row, malloc=malloc) for row in json.load(f)]


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# sharded DataNormSparsifier.step over gloo (cpu)", "",
        f"{meta['date']}, {meta['device']}, torch {meta['torch']}. Command: `{meta['command']}`.",
        "",
        f"Table: rows x {WIDTH} float32, random, level {LEVEL}, block {BLOCK}, {NORM}, bool masks; rows split evenly "
        "over the processes. ms: median over runs of the slowest rank's step. Each process runs "
        f"{meta['threads_per_process']} torch thread(s). This machine has {os.cpu_count()} cores, shared with other "
        "jobs while this ran: 1 and 2 processes fit on the cores, 4 processes oversubscribe them (two per core), "
        "so the times at 4 show the protocol's overhead, not a speed-up.",
        "",
        "Bytes: what each rank sends per step, counted: `collectives` all-reduces of a fixed int64 buffer "
        "(2^11 histogram bins + one failure flag per rank) -- 3 radix passes (11/11/10-bit digits), the per-rank "
        "tie counts, the all-or-none vote -- plus the pickled shard description of the metadata all_gather_object. "
        "They do not depend on the table's size.",
        "",
        "Unsharded: DataNormSparsifier.step on the same table in the 1-process run (the compiled one-shot CPU "
        "kernel: scoring, radix select and mask write fused in C++). The sharded step runs its selection as torch "
        "ops (order keys, histograms, compaction) and writes the mask with data_sparsifier._chunked.chunk_keep, "
        "so at 1 process it is slower than the unsharded step; the sharded path exists to spread a table over "
        "machines, its per-rank work shrinks with the shard.",
        "",
        f"Load average (1 min) when the run started / ended: {meta['load_average'][0]:.1f} / "
        f"{meta['load_average'][1]:.1f}. Other jobs shared the cores: repeated runs minutes apart differed by up to "
        "2x at 2 and 4 processes (the 2-process step on 4e6 rows took from 0.84 to 1.5 s), so read the times as rough; "
        "the bytes are exact.",
        "",
        "malloc: `reuse` runs the workers with glibc told to keep freed memory ("
        + ", ".join(f"{k}={v}" for k, v in MALLOC_REUSE.items()) + "); `default` with glibc's settings, under "
        "which every step's large temporaries are fresh pages, and page faults are costly on this VM (compare the "
        "1-process rows).",
        "",
        "| malloc | rows | processes | threads/process | step ms | unsharded step ms | all-reduces "
        "| all-reduce bytes/rank | metadata bytes/rank |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        unsharded = f"{r['unsharded_ms']:.1f}" if "unsharded_ms" in r else ""
        lines.append(f"| {r['malloc']} | {r['rows']:,} | {r['world']} | {r['threads_per_process']} | {r['ms']:.1f} "
                     f"| {unsharded} | {r['collectives']} | {r['allreduce_bytes_per_rank']:,} "
                     f"| {r['metadata_bytes_per_rank']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--malloc", nargs="+", choices=["reuse", "default"], default=["reuse", "default"],
                        help="glibc malloc settings of the workers: reuse freed memory (MALLOC_REUSE), or glibc's own")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "cpu"))
    args = parser.parse_args()
    import torch
    load_at_start = os.getloadavg()[0]
    rows = []
    for malloc in args.malloc:
        for world in args.worlds:
            rows += launch(world, args.rows, args.runs, args.threads, malloc)
    rows.sort(key=lambda r: (r["malloc"] != "reuse", r["rows"], r["world"]))
    for r in rows:
        print(f"{r['malloc']:>7} {r['rows']:>9} rows  {r['world']} proc  {r['ms']:9.1f} ms  "
              f"{r['allreduce_bytes_per_rank']:>7} B all-reduced/rank ({r['collectives']} all-reduces)"
              + (f"  unsharded {r['unsharded_ms']:.1f} ms" if "unsharded_ms" in r else ""))
    meta = dict(date=datetime.date.today().isoformat(), device=f"{platform.machine()}, {os.cpu_count()} cores",
                torch=torch.__version__, python=platform.python_version(), backend="gloo",
                threads_per_process=args.threads, load_average=[load_at_start, os.getloadavg()[0]],
                command="python benchmarks/bench_sharded.py " + " ".join(sys.argv[1:]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sharded-cpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "sharded-cpu.md"), "w") as f:
        f.write(_markdown(meta, rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, init_file, out_file, sizes, runs, threads = sys.argv[2:9]
        worker(int(rank), int(world), init_file, out_file, [int(s) for s in sizes.split(",")], int(runs), int(threads))
    else:
        main()
