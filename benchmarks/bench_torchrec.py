"""TorchRecSparsifier.step on a DLRM model sharded by DistributedModelParallel over gloo (cpu), against what users
write today: gather every table to rank 0, run torch.ao.pruning's DataNormSparsifier there, scatter the masks back.

Each world size is one launch of `world` processes on localhost (gloo, a FileStore in a temporary directory, one
torch thread each). Every rank builds the same torchrec DLRM (an EmbeddingBagCollection of one table per --sizes
entry, all --dim wide, fp32, plus the dense and over arches) and shards it with DistributedModelParallel, once per
sharding type (row-wise, table-wise: every table gets that type; row-wise plans on the cpu through a sharder whose
sharding_types() returns the cuda list, as in tests/test_torchrec_distributed.py). Each rank writes tie-free values
into its shards (see tie_free_values) and keeps a copy, restored before every run.

Per sharding type and world size, on every rank:
  ours      TorchRecSparsifier(model, ...).step(): the distributed engine (sparsity_ext.distributed), masks and
            the in-place zeroing of the shards;
  baseline  ShardedTensor.gather of every table to rank 0; there torch.ao.pruning's DataNormSparsifier
            (torch.ao.pruning._experimental.data_sparsifier) add_data + step on the whole tables; then one
            dist.scatter per table of its int8 mask (torch.ao's mask dtype) to the ranks holding its shards, which
            multiply their shards by it (what torch.ao's squash_mask writes).
Both produce each shard's part of the same masks; the run checks they are equal bit for bit and prints it.

Measured per method:
  time      from a barrier to the step's return, the slowest rank; median over --runs (baseline: --baseline-runs);
  bytes     counted, not sampled: every torch.distributed collective the step calls is wrapped while it runs
            (all_reduce: the buffer, sent and received; gather/scatter: the tensors each rank hands in or gets,
            padding included; all_gather_object: the pickled objects). Reported: the sum over ranks of the bytes
            sent, and the most one rank received. The engine's own counter (last_step_bytes, its all-reduces) is
            recorded beside it as a check;
  memory    per rank, the peak resident set during the step above the resident set before it: VmHWM is reset
            through /proc/self/clear_refs before the step and read after it (exact, no sampling). The workers run
            with MALLOC_MMAP_THRESHOLD_=131072 so that freed temporaries go back to the kernel and earlier steps'
            freed memory does not hide a step's peak.

    python benchmarks/bench_torchrec.py                       # 1e5, 3e5, 1e6-row tables x 32; 1, 2, 4 processes
    python benchmarks/bench_torchrec.py --quick               # small tables, a smoke run (under a minute)
    python benchmarks/bench_torchrec.py --sizes 100000 10000000 --dim 16 --worlds 2 --shardings row_wise --append

Writes torchrec.json and torchrec.md to --out (default benchmarks/results/cpu); --append adds the run to those
already there (e.g. a run with a 10^7-row table beside the default one).
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

LEVEL, BLOCK, NORM = 0.8, (1, 4), "L1"
SHARDINGS = ("row_wise", "table_wise")
DEFAULT_SIZES = [100_000, 300_000, 1_000_000]
QUICK_SIZES = [20_000, 50_000]
# Freed allocations of 128 KiB and more go back to the kernel at once (see "memory" above).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
BLOCK_INDEX_BITS = 26  # the tie-free generator's distinct block magnitudes: at most 2^26 blocks per table


# --------------------------------------------------------------------------------------------- data
def tie_free_values(table: int, rows: slice, cols: slice, dim: int):
    """The (rows, cols) part of tie-free table number `table` (fp32, `dim` wide, for (1, 4) blocks, L1).

    Every element of block b has the magnitude m_b (random signs), and the m_b are distinct floats whose two
    lowest mantissa bits are 0: sums of up to 4 of them are exact, so every implementation scores block b as
    exactly m_b, and no two blocks of a table tie. m_b's bits are an affine bijection of b modulo 2^26 (so
    magnitudes spread log-uniformly over about 1e-7 .. 5e2), computed from the element's global position: a
    shard gets its part of the table without the table being built anywhere."""
    import torch
    r = torch.arange(rows.start, rows.stop, dtype=torch.int64)
    c = torch.arange(cols.start, cols.stop, dtype=torch.int64)
    blocks = r[:, None] * (dim // 4) + (c // 4)[None, :]
    spread = (blocks * 0x2545F491 + table * 0x9E3779B) & ((1 << BLOCK_INDEX_BITS) - 1)
    bits = 0x34000000 + (spread << 2)
    element = r[:, None] * dim + c[None, :]
    negative = ((element * 0x9E3779B1 + table) >> 17) & 1
    bits = bits - (negative << 32) + (negative << 31)  # the sign bit set, as an int32 value
    return bits.to(torch.int32).view(torch.float32)


def fill_shards(model, sizes: list[int], dim: int) -> dict:
    """Writes the tie-free tables into this rank's shards; returns {key: {offset: copy}} to restore them."""
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    copies = {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not key.endswith(".weight") or ".embedding_bags." not in key:
                continue
            table = int(key.split(".")[-2][1:])
            copies[key] = {}
            for shard in value.local_shards() if isinstance(value, ShardedTensor) else []:
                (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                for start in range(0, rows, 1 << 16):  # row chunks: the int64 temporaries stay small
                    stop = min(rows, start + (1 << 16))
                    shard.tensor[start:stop] = tie_free_values(table, slice(row + start, row + stop),
                                                               slice(col, col + cols), dim)
                copies[key][(row, col)] = shard.tensor.clone()
    return copies


def restore(model, copies: dict) -> None:
    import torch
    with torch.no_grad():
        state = model.state_dict()
        for key, by_offset in copies.items():
            for shard in state[key].local_shards():
                shard.tensor.copy_(by_offset[tuple(shard.metadata.shard_offsets)])


# --------------------------------------------------------------------------------------------- model
def build_model(sizes: list[int], dim: int, sharding: str, world: int):
    import torch
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.models.dlrm import DLRM

    class CudaShardingTypes(EmbeddingBagCollectionSharder):
        """The stock sharder offers row-wise only for cuda; its cuda list plans on the cpu too."""

        def sharding_types(self, compute_device_type: str) -> list[str]:
            return super().sharding_types("cuda")

    configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"f{i}"])
               for i, rows in enumerate(sizes)]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[64, dim],
                 over_arch_layer_sizes=[64, 1], dense_device=torch.device("cpu"))
    constraints = {c.name: ParameterConstraints(sharding_types=[sharding]) for c in configs}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu",
                                                         local_world_size=world), constraints=constraints)
    sharders = [CudaShardingTypes()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)


# ------------------------------------------------------------------------------------ measurements
class CollectiveBytes:
    """Counts the bytes this rank hands to / gets from torch.distributed collectives while `counting`.
    Wraps the module attributes callers use (torch.distributed.X); calls inside torch.distributed itself
    (all_gather_object's own all_gather) are not seen twice."""

    WRAPPED = ("all_reduce", "all_gather", "all_gather_object", "gather", "scatter", "broadcast", "send", "recv")

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        self.counting = False
        self.sent = self.received = 0
        self.calls: dict[str, int] = {}
        for name in self.WRAPPED:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def reset(self) -> None:
        self.sent = self.received = 0
        self.calls = {}

    def _count(self, name: str, args, kwargs) -> None:
        dist = self.dist
        rank, world = dist.get_rank(), dist.get_world_size()
        arg = dict(zip(("a", "b", "c"), args))

        def nbytes(t):
            return t.numel() * t.element_size()

        if name == "all_reduce" or name == "broadcast":
            tensor = arg.get("a", kwargs.get("tensor"))
            root = arg.get("b", kwargs.get("src"))
            self.sent += nbytes(tensor) if name == "all_reduce" or root == rank else 0
            self.received += nbytes(tensor) if name == "all_reduce" or root != rank else 0
        elif name == "all_gather":
            tensor = arg.get("b", kwargs.get("tensor"))
            self.sent += nbytes(tensor)
            self.received += nbytes(tensor) * (world - 1)
        elif name == "all_gather_object":
            objects = arg.get("a", kwargs.get("object_list"))
            sizes = [len(pickle.dumps(o)) for o in objects]
            self.sent += sizes[rank]
            self.received += sum(sizes) - sizes[rank]
        elif name == "gather":
            tensor = arg.get("a", kwargs.get("tensor"))
            dst = kwargs.get("dst", arg.get("c", 0))
            if rank == dst:
                self.received += nbytes(tensor) * (world - 1)
            else:
                self.sent += nbytes(tensor)
        elif name == "scatter":
            tensor = arg.get("a", kwargs.get("tensor"))
            src = kwargs.get("src", arg.get("c", 0))
            if rank == src:
                self.sent += nbytes(tensor) * (world - 1)
            else:
                self.received += nbytes(tensor)
        elif name in ("send", "recv"):
            tensor = arg.get("a", kwargs.get("tensor"))
            if name == "send":
                self.sent += nbytes(tensor)
            else:
                self.received += nbytes(tensor)
        self.calls[name] = self.calls.get(name, 0) + 1

    def _wrap(self, name: str, original):
        def counted(*args, **kwargs):
            result = original(*args, **kwargs)
            if self.counting:
                self._count(name, args, kwargs)
            return result
        return counted


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measured(call, counter: CollectiveBytes) -> dict:
    """Runs call() after a barrier; its wall time, this rank's peak RSS above the start, bytes through the group."""
    import torch.distributed as dist
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rss_before = _status_kb("VmRSS")
    counter.reset()
    counter.counting = True
    start = time.perf_counter()
    extra = call()
    seconds = time.perf_counter() - start
    counter.counting = False
    return dict(seconds=seconds, peak_kb=_status_kb("VmHWM") - rss_before, sent=counter.sent,
                received=counter.received, calls=dict(counter.calls), **(extra or {}))


# ----------------------------------------------------------------------------------------- baseline
class GatherToRankZero:
    """What users write today: ShardedTensor.gather of every table to rank 0, torch.ao.pruning's
    DataNormSparsifier there, one dist.scatter of each table's int8 mask (padded to the largest rank's share)
    to the ranks holding its shards, which multiply their shards by it."""

    def __init__(self, model, tables):
        self.model = model
        self.tables = tables  # sparsity_ext.torchrec._tables.Table: key, shape, pieces (rank, rect), local shards
        self.masks: dict[str, list] = {}  # per table, this rank's pieces' masks (the last step's)

    def step(self) -> dict:
        import torch
        import torch.distributed as dist
        from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as TorchAoDataNormSparsifier
        rank, world = dist.get_rank(), dist.get_world_size()
        state = self.model.state_dict()
        marks = [time.perf_counter()]
        full = {}
        for table in self.tables:
            out = torch.empty(table.shape, dtype=table.dtype) if rank == 0 else None
            state[table.key].gather(dst=0, out=out)
            full[table.name] = out
        marks.append(time.perf_counter())
        if rank == 0:
            sparsifier = TorchAoDataNormSparsifier(sparsity_level=LEVEL, sparse_block_shape=BLOCK,
                                                   zeros_per_block=BLOCK[0] * BLOCK[1], norm=NORM)
            for name, data in full.items():
                sparsifier.add_data(name, data)
            sparsifier.step()
            whole_masks = {name: sparsifier.get_mask(name) for name in full}
            del sparsifier
        del full
        marks.append(time.perf_counter())
        for table in self.tables:
            shares = [[p.rect for p in table.pieces if p.rank == r] for r in range(world)]
            share_len = [sum(rect.rows * rect.cols for rect in rects) for rects in shares]
            length = max(share_len)
            received = torch.empty(length, dtype=torch.int8)
            buffers = None
            if rank == 0:
                mask = whole_masks.pop(table.name)
                buffers = []
                for rects in shares:
                    buffer = torch.zeros(length, dtype=torch.int8)
                    at = 0
                    for rect in rects:
                        buffer[at:at + rect.rows * rect.cols] = mask[rect.row:rect.row + rect.rows,
                                                                     rect.col:rect.col + rect.cols].reshape(-1)
                        at += rect.rows * rect.cols
                    buffers.append(buffer)
                del mask
            dist.scatter(received, buffers, src=0)
            del buffers
            self.masks[table.name] = []
            at = 0
            for rect, shard in zip(shares[rank], table.local):
                piece_mask = received[at:at + rect.rows * rect.cols].view(rect.rows, rect.cols)
                at += rect.rows * rect.cols
                shard.mul_(piece_mask)  # torch.ao's squash_mask: data * mask
                self.masks[table.name].append(piece_mask.bool())
        marks.append(time.perf_counter())
        return {"phases": {"gather": marks[1] - marks[0], "torch_ao_step": marks[2] - marks[1],
                           "scatter_apply": marks[3] - marks[2]}}


# ------------------------------------------------------------------------------------------- worker
def _slowest(value: float) -> float:
    import torch
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _every_rank(values: list) -> list:
    import torch.distributed as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


def worker(rank: int, world: int, init_file: str, out_file: str, config: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from sparsity_ext.torchrec import TorchRecSparsifier
    counter = CollectiveBytes()
    sizes, dim = config["sizes"], config["dim"]
    results = []
    for sharding in config["shardings"]:
        model = build_model(sizes, dim, sharding, world)
        copies = fill_shards(model, sizes, dim)
        ours = TorchRecSparsifier(model, sparsity_level=LEVEL, sparse_block_shape=BLOCK, norm=NORM, hold_masks=False)
        tables = list(ours.tables.values())
        baseline = GatherToRankZero(model, tables)

        def ours_step() -> dict:
            ours.step()
            return {"engine_counter": ours.last_step_bytes}

        runs = {"ours": [], "baseline": []}
        ours_step()  # warm-up (not measured): first-call costs of the kernels and of gloo
        restore(model, copies)
        for name, step, count in (("ours", ours_step, config["runs"]),
                                  ("baseline", baseline.step, config["baseline_runs"])):
            for _ in range(count):
                runs[name].append(measured(step, counter))
                restore(model, copies)
        equal = all(torch.equal(a, b) for table in tables
                    for a, b in zip(ours.get_mask(table.name), baseline.masks[table.name]))
        zeroed = sum(int((~m).sum()) for table in tables for m in ours.get_mask(table.name))
        off_rank0 = sum(p.rect.rows * p.rect.cols for t in tables for p in t.pieces if p.rank != 0)
        row = dict(sharding=sharding, world=world, sizes=sizes, dim=dim,
                   table_bytes=sum(r * dim * 4 for r in sizes),
                   baseline_unpadded_bytes=off_rank0 * (4 + 1),  # fp32 shards in, int8 masks out, no padding
                   layout={t.name: [(p.rank, p.rect.row, p.rect.col, p.rect.rows, p.rect.cols) for p in t.pieces]
                           for t in tables},
                   masks_equal=all(_every_rank(equal)), zeroed_fraction=sum(_every_rank(zeroed)) /
                   sum(r * dim for r in sizes))
        for name, measurements in runs.items():
            per_rank = _every_rank(measurements)  # [rank][run]
            row[name] = {
                "ms": statistics.median(_slowest(m["seconds"]) for m in measurements) * 1e3,
                "runs": len(measurements),
                "sent_bytes_total": sum(r[-1]["sent"] for r in per_rank),
                "received_bytes_max": max(r[-1]["received"] for r in per_rank),
                "sent_bytes_by_rank": [r[-1]["sent"] for r in per_rank],
                "received_bytes_by_rank": [r[-1]["received"] for r in per_rank],
                "calls_by_rank": [r[-1]["calls"] for r in per_rank],
                "peak_mb_by_rank": [max(m["peak_kb"] for m in r) / 1024 for r in per_rank],
            }
            if name == "ours":
                row[name]["engine_counter_bytes_by_rank"] = [r[-1]["engine_counter"] for r in per_rank]
            else:
                row[name]["rank0_phases_ms"] = {k: statistics.median(m["phases"][k] for m in per_rank[0]) * 1e3
                                                for k in per_rank[0][0]["phases"]}
        results.append(row)
        del ours, baseline, tables, model, copies
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- launch
def launch(world: int, config: dict, timeout: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rank0.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **MALLOC_ENV)
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(world),
                                   os.path.join(tmp, "store"), out_file, json.dumps(config)], env=env)
                 for rank in range(world)]
        try:
            codes = [proc.wait(timeout=timeout) for proc in procs]
        except subprocess.TimeoutExpired:
            for proc in procs:
                proc.kill()
            raise RuntimeError(f"world {world}: did not finish in {timeout:.0f} s")
        if any(codes):
            raise RuntimeError(f"world {world}: exit codes {codes}")
        with open(out_file) as f:
            return json.load(f)


def _ratios(row: dict) -> dict:
    ours, base = row["ours"], row["baseline"]

    def ratio(a, b):
        return a / b if b else None

    return {"time": ratio(base["ms"], ours["ms"]),
            "bytes_sent": ratio(base["sent_bytes_total"], ours["sent_bytes_total"]),
            "rank0_peak": ratio(base["peak_mb_by_rank"][0], ours["peak_mb_by_rank"][0])}


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.1f}x"


def _table_lines(rows: list[dict]) -> list[str]:
    lines = ["| sharding | procs | ours ms | baseline ms (gather / torch.ao / scatter+apply) | time ratio "
             "| ours sent (all ranks) | baseline sent (all ranks) | ours max recv | baseline max recv "
             "| baseline unpadded | ours peak MB by rank | baseline peak MB by rank | rank-0 peak ratio | masks equal |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|"]
    for r in rows:
        o, b, q = r["ours"], r["baseline"], r["ratios"]
        phases = " / ".join(f"{v:.0f}" for v in b["rank0_phases_ms"].values())
        lines.append(
            f"| {r['sharding']} | {r['world']} | {o['ms']:.0f} | {b['ms']:.0f} ({phases}) | {_fmt_ratio(q['time'])} "
            f"| {_fmt_bytes(o['sent_bytes_total'])} | {_fmt_bytes(b['sent_bytes_total'])} "
            f"| {_fmt_bytes(o['received_bytes_max'])} | {_fmt_bytes(b['received_bytes_max'])} "
            f"| {_fmt_bytes(r['baseline_unpadded_bytes'])} "
            f"| {', '.join(f'{m:.0f}' for m in o['peak_mb_by_rank'])} "
            f"| {', '.join(f'{m:.0f}' for m in b['peak_mb_by_rank'])} | {_fmt_ratio(q['rank0_peak'])} "
            f"| {'yes' if r['masks_equal'] else 'NO'} |")
    return lines


def _run_section(meta: dict, rows: list[dict]) -> list[str]:
    sizes = ", ".join(f"{s:,}" for s in meta["sizes"])
    return [
        f"## {len(meta['sizes'])} tables of {sizes} rows x {meta['dim']} ({_fmt_bytes(rows[0]['table_bytes'])})", "",
        f"{meta['date']}, {meta['device']}, torch {meta['torch']}, torchrec {meta['torchrec']}, fbgemm-gpu-cpu "
        f"{meta['fbgemm_gpu']}. Command: `{meta['command']}` ({meta['wall_s']:.0f} s in all; 1-minute load average "
        f"{meta['load_average'][0]:.1f} at the start, {meta['load_average'][1]:.1f} at the end). Runs: "
        f"{meta['runs']} of ours after a warm-up, {meta['baseline_runs']} of the baseline.", "",
        *_table_lines(rows), "",
    ]


def _markdown(runs: list[dict]) -> str:
    lines = [
        "# TorchRecSparsifier.step on a DMP-sharded DLRM over gloo (cpu), against gather + torch.ao.pruning", "",
        "Model: torchrec DLRM, an EmbeddingBagCollection of fp32 tables (sizes per section), sharded by "
        "DistributedModelParallel with every table row-wise or every table table-wise. Sparsity level "
        f"{LEVEL}, block {BLOCK}, {NORM}, whole blocks zeroed. Tables: tie-free values written into each rank's "
        "shards (block magnitudes distinct and exactly representable as block means; see tie_free_values), "
        "restored before every run.", "",
        "- ours: `TorchRecSparsifier(model, ...).step()` (computes the masks with the distributed engine and zeroes "
        "the shards in place).",
        "- baseline: `ShardedTensor.gather` of every table to rank 0, torch.ao.pruning's DataNormSparsifier "
        "(`torch.ao.pruning._experimental.data_sparsifier`) add_data + step there, then per table one `dist.scatter` "
        "of its int8 mask (torch.ao's mask dtype) to the shard owners, who multiply their shards by it.",
        "- masks equal: every rank's masks from both, compared bit for bit.", "",
        "ms: median over runs of the slowest rank, from a barrier to the return; the baseline's phases are rank 0's. "
        "Sent: bytes every rank handed to torch.distributed collectives during the step, summed over ranks "
        "(all_reduce counts its buffer once per rank, though gloo's ring moves about twice that); max recv: the "
        "most bytes one rank got. Counted by wrapping the collectives; the engine's own counter (its all-reduces) "
        "is in the JSON. Baseline unpadded: the bytes the baseline must move at least (the fp32 shards not on "
        "rank 0 in, their int8 masks out); ShardedTensor.gather and dist.scatter pad every rank's share to the "
        "largest, so table-wise tables cost up to (processes - 1) times that. Peak MB: the resident set's "
        "high-water mark during the step above the resident set before it, per rank (/proc/self/clear_refs "
        "then VmHWM; workers run with " + ", ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
        + " so freed memory leaves the process). Ratios: baseline / ours.", "",
    ]
    for run in runs:
        lines += _run_section(run["meta"], run["rows"])
    lines += [
        "## Caveats", "",
        "- The machine: 2 cores, shared with other jobs while this ran (load averages above). One torch thread "
        "per process: 1 and 2 processes fit on the cores, 4 oversubscribe them (two per core), so times at 4 show "
        "the protocol's overhead more than any speed-up. Read times as rough (runs minutes apart can differ by "
        "2x); bytes and masks are exact, peaks are exact per run.",
        "- The baseline's time is dominated by torch.ao.pruning's step on rank 0, which does not shrink with more "
        "ranks; only the gather and scatter grow. Ours splits the scoring and the mask writing over the ranks; "
        "its exchange is a fixed number of 16 KiB all-reduces (radix-select histograms, tie counts, the "
        "all-or-none vote) plus a small all_gather_object of table descriptions, whatever the table size.",
        "- Table-wise: each table lies whole on one rank, so the tables' sizes decide the balance (the largest "
        "table bounds the step). Row-wise at 1 process is one shard per table.",
        "- Ours at 1 process still runs the distributed engine (the tables are ShardedTensors); an unsharded "
        "collection goes through the one-shot kernel instead (see sharded-cpu.md for that difference).",
        "- Peak memory is per rank and excludes the model itself; the baseline's rank 0 holds every table "
        "gathered plus torch.ao's float temporaries and int8 masks.",
        "- Sizes are chosen so that a run finishes in about 10 minutes on this machine: torch.ao.pruning's step "
        "alone takes tens of seconds on a million-row table here.", "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help=f"rows of each table (default {DEFAULT_SIZES}; --quick: {QUICK_SIZES})")
    parser.add_argument("--dim", type=int, default=32, help="embedding dim of every table (a multiple of 4)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shardings", nargs="+", choices=SHARDINGS, default=list(SHARDINGS))
    parser.add_argument("--runs", type=int, default=3, help="measured steps of ours (median)")
    parser.add_argument("--baseline-runs", type=int, default=1, help="measured steps of the baseline (median)")
    parser.add_argument("--quick", action="store_true", help="small tables, 1 and 2 processes: a smoke run")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per world size")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "cpu"))
    parser.add_argument("--append", action="store_true",
                        help="add this run to the runs already in OUT/torchrec.json instead of replacing them")
    args = parser.parse_args()
    if args.dim % 4:
        parser.error("--dim must be a multiple of 4 (the tie-free tables are made for (1, 4) blocks)")
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    worlds = [1, 2] if args.quick and args.worlds == [1, 2, 4] else args.worlds
    for rows in sizes:
        if rows * args.dim // 4 > 1 << BLOCK_INDEX_BITS:
            parser.error(f"a table of {rows} x {args.dim} has more than 2^{BLOCK_INDEX_BITS} blocks (tie-free limit)")
    import fbgemm_gpu
    import torch
    import torchrec
    config = dict(sizes=sizes, dim=args.dim, shardings=args.shardings, runs=args.runs,
                  baseline_runs=args.baseline_runs)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for world in worlds:
        rows += launch(world, config, args.timeout)
    for row in rows:
        row["ratios"] = _ratios(row)
    rows.sort(key=lambda r: (r["sharding"], r["world"]))
    print("\n".join(_table_lines(rows)))
    for row in rows:
        print(f"{row['sharding']} at {row['world']} process(es): masks of ours and of gather + torch.ao.pruning "
              f"{'equal bit for bit' if row['masks_equal'] else 'DIFFER'} "
              f"({row['zeroed_fraction']:.3f} of the elements zeroed)")
    meta = dict(date=datetime.date.today().isoformat(), device=f"{platform.machine()}, {os.cpu_count()} cores",
                torch=torch.__version__, torchrec=getattr(torchrec, "__version__", "?"),
                fbgemm_gpu=getattr(fbgemm_gpu, "__version__", "?"), python=platform.python_version(),
                backend="gloo", threads_per_process=1, sizes=sizes, dim=args.dim, runs=args.runs,
                baseline_runs=args.baseline_runs, level=LEVEL, block=BLOCK, norm=NORM, malloc_env=MALLOC_ENV,
                load_average=[load_at_start, os.getloadavg()[0]], wall_s=time.perf_counter() - started,
                command="python benchmarks/bench_torchrec.py " + " ".join(sys.argv[1:]))
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "torchrec.json")
    runs = []
    if args.append and os.path.exists(json_path):
        with open(json_path) as f:
            runs = json.load(f)["runs"]
    runs.append({"meta": meta, "rows": rows})
    with open(json_path, "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    with open(os.path.join(args.out, "torchrec.md"), "w") as f:
        f.write(_markdown(runs))
    if not all(row["masks_equal"] for row in rows):
        raise SystemExit("masks differ between TorchRecSparsifier and gather + torch.ao.pruning")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], json.loads(sys.argv[6]))
    else:
        main()
