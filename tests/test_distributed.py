"""Row-sharded masks (sparsity_ext.distributed) over gloo on loopback, 2 and 4 processes.

Each world is launched once (process startup dominates on a small machine): every rank runs all the
cases below on its own rows of deterministic tables and saves what it got; the tests then compare the
concatenated shards with the single-process mask of the whole table (ops.block_norm_mask, or
DataNormSparsifier), and check what the ranks recorded about failures and bad input.

Run as a script (`python tests/test_distributed.py RANK WORLD INIT_FILE OUT_DIR`), this file is the worker.
"""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch

from sparsity_ext import ops
from sparsity_ext.data_sparsifier import DataNormSparsifier
from sparsity_ext.data_sparsifier._chunked import score_chunk
from sparsity_ext.reference import num_selected_blocks

WORLD_SIZES = (2, 4)
LAUNCH_TIMEOUT_S = 240
COLLECTIVE_TIMEOUT_S = 60  # a desynchronized group fails the run instead of hanging it


# ----------------------------------------------------------------------------------- data
def make_table(kind: str, rows: int, width: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Deterministic tables: "random" (almost surely tie-free scores), "ties" (values from {1, 3} with
    random signs: few distinct block scores, each shared by blocks on every rank), "constant" (every block
    scores the same: the selection is decided by block index alone), "nan" (random, with NaN elements in a
    fifth of the rows, so NaN scores take part in the selection)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(rows, width, generator=g) < 0.5, -1.0, 1.0)
    if kind == "random":
        table = torch.randn(rows, width, generator=g, dtype=torch.float64)
    elif kind == "ties":
        table = torch.where(torch.rand(rows, width, generator=g) < 0.3, 3.0, 1.0) * signs
    elif kind == "constant":
        table = torch.ones(rows, width) * signs
    elif kind == "nan":
        table = torch.randn(rows, width, generator=g, dtype=torch.float64)
        nan_rows = torch.rand(rows, generator=g) < 0.2
        table[nan_rows, ::3] = float("nan")
    else:
        raise ValueError(kind)
    return table.to(dtype)


def split_rows(rows: int, block_rows: int, world: int, pattern: str) -> list[int]:
    """Rows per rank, each shard starting on a block-row boundary: "even", "uneven" (rank r gets about
    r + 1 parts), or "empty" (rank 1 holds no rows); the last non-empty shard takes the partial block row."""
    units = -(-rows // block_rows)
    weights = {"even": [1] * world, "uneven": list(range(1, world + 1)),
               "empty": [0 if r == 1 else 1 for r in range(world)]}[pattern]
    counts = [units * w // sum(weights) for w in weights]
    last = max(r for r, w in enumerate(weights) if w)
    counts[last] += units - sum(counts)
    sizes = [c * block_rows for c in counts]
    sizes[last] -= units * block_rows - rows
    return sizes


def local_rows(table: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return table[start:start + sizes[rank]].clone()


# ---------------------------------------------------------------------------------- cases
def _function_cases() -> list[dict]:
    """Cases for sharded_block_norm_mask: block shapes (with zeros_per_block below the block size), L1/L2,
    every data kind, levels from none to all, fp32/bf16/fp64, uneven and empty shards, packed output."""
    cases = []
    geometry = [((1, 4), None), ((1, 4), 2), ((2, 4), None), ((2, 4), 3), ((3, 5), 7), ((1, 1), None)]
    kinds = ["random", "ties", "constant", "nan"]
    levels = [0.5, 0.3, 0.9, 0.75, 0.0, 1.0, 0.99, 0.05]
    patterns = ["uneven", "even", "empty"]
    i = 0
    for block, zeros in geometry:
        for norm in (1, 2):
            for kind in kinds:
                cases.append(dict(name=f"f{i}", seed=i, rows=61, width=27, block=block, zeros=zeros, norm=norm,
                                  kind=kind, level=levels[i % len(levels)], pattern=patterns[i % len(patterns)],
                                  dtype=torch.float32, packed=i % 5 == 0, chunk=10_000 if i % 2 else 300))
                i += 1
    for dtype in (torch.bfloat16, torch.float64):
        for kind in ("ties", "nan"):
            cases.append(dict(name=f"f{i}", seed=i, rows=50, width=16, block=(2, 4), zeros=None, norm=2, kind=kind,
                              level=0.6, pattern="uneven", dtype=dtype, packed=False, chunk=10_000))
            i += 1
    return cases


FUNCTION_CASES = _function_cases()

# Sparsifier tables: (name, kind, rows, width, add_data overrides).
SPARSIFIER_TABLES = [("emb", "ties", 70, 24, dict(sparse_block_shape=(2, 4), zeros_per_block=3)),
                     ("w", "random", 45, 30, dict(sparsity_level=0.3))]
SPARSIFIER_DEFAULTS = dict(sparsity_level=0.5, sparse_block_shape=(1, 4), norm="L2")
SPARSIFIER_LEVELS = (0.5, 0.8)  # the level of "emb" in the first and the second step


def sparsifier_shards(world: int, rank: int) -> dict[str, torch.Tensor]:
    shards = {}
    for i, (name, kind, rows, width, overrides) in enumerate(SPARSIFIER_TABLES):
        block_rows = overrides.get("sparse_block_shape", SPARSIFIER_DEFAULTS["sparse_block_shape"])[0]
        shards[name] = local_rows(make_table(kind, rows, width, seed=100 + i), split_rows(rows, block_rows, world,
                                                                                          "uneven"), rank)
    return shards


# --------------------------------------------------------------------------------- worker
def _error(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def _expect_error(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 -- recorded and checked by the test
        return _error(exc)
    return None


def _run_function_cases(world: int, rank: int, out: dict) -> None:
    from sparsity_ext.distributed import sharded_block_norm_mask
    for case in FUNCTION_CASES:
        table = make_table(case["kind"], case["rows"], case["width"], case["dtype"], case["seed"])
        local = local_rows(table, split_rows(case["rows"], case["block"][0], world, case["pattern"]), rank)
        out[case["name"]] = sharded_block_norm_mask(local, case["level"], case["block"], case["zeros"], case["norm"],
                                                    packed=case["packed"], max_chunk_bytes=case["chunk"])


def _new_sparsifier(shards: dict[str, torch.Tensor], mask_dtype):
    from sparsity_ext.distributed import ShardedDataNormSparsifier
    sparsifier = ShardedDataNormSparsifier(**SPARSIFIER_DEFAULTS, mask_dtype=mask_dtype, max_chunk_bytes=512)
    for name, _, _, _, overrides in SPARSIFIER_TABLES:
        data = torch.nn.Embedding.from_pretrained(shards[name], freeze=False) if name == "emb" else shards[name]
        sparsifier.add_data(name, data, **overrides)
    return sparsifier


def _masks(sparsifier) -> dict[str, torch.Tensor]:
    return {name: sparsifier.get_mask(name, as_bool=True).clone() for name in sparsifier.data_groups}


def _run_sparsifier_cases(world: int, rank: int, out: dict) -> None:
    """Two steps and a squash per mask_dtype; between the steps, injected failures and bad input."""
    from sparsity_ext.distributed import _pieces as sharded_module
    for mask_dtype in (None, torch.bool, "packed"):
        tag = f"s[{mask_dtype}]"
        shards = sparsifier_shards(world, rank)
        sparsifier = _new_sparsifier(shards, mask_dtype)
        sparsifier.step()
        out[f"{tag}.step1"] = _masks(sparsifier)
        out[f"{tag}.bytes"] = sparsifier.last_step_bytes
        sparsifier.data_groups["emb"]["sparsity_level"] = SPARSIFIER_LEVELS[1]

        # Injected failures: the scorer raising on rank 1 (before the first histogram all-reduce), and the
        # mask writer raising on the last rank for the second table, "w" (after every selection: at the vote).
        before = {name: (sparsifier.get_data(name).clone(), sparsifier.get_mask(name).clone())
                  for name in sparsifier.data_groups}
        originals = sharded_module.score_chunk, sharded_module.chunk_keep
        width_of_w = SPARSIFIER_TABLES[1][3]
        for label, failing_rank, attribute in (("score", 1, "score_chunk"), ("keep", world - 1, "chunk_keep")):
            if rank == failing_rank:
                def failing(chunk, *args, _attribute=attribute, _original=getattr(sharded_module, attribute)):
                    if _attribute == "score_chunk" or chunk.shape[1] == width_of_w:
                        raise ValueError(f"injected failure in {_attribute}")
                    return _original(chunk, *args)
                setattr(sharded_module, attribute, failing)
            error = _expect_error(sparsifier.step)
            sharded_module.score_chunk, sharded_module.chunk_keep = originals
            unchanged = all(torch.equal(sparsifier.get_data(name), data)
                            and torch.equal(sparsifier.get_mask(name), mask) for name, (data, mask) in before.items())
            out[f"{tag}.fail_{label}"] = dict(error=error, unchanged=unchanged)

        # Bad input through the sparsifier: a zeros_per_block above the block size on rank 0 only.
        if rank == 0:
            sparsifier.data_groups["w"]["zeros_per_block"] = 99
        error = _expect_error(sparsifier.step)
        sparsifier.data_groups["w"]["zeros_per_block"] = 4
        unchanged = all(torch.equal(sparsifier.get_mask(name), mask) for name, (_, mask) in before.items())
        out[f"{tag}.bad_config"] = dict(error=error, unchanged=unchanged)

        sparsifier.step()  # the group is still in step after the failures
        out[f"{tag}.step2"] = _masks(sparsifier)
        sparsifier.update_mask("w", sparsifier.get_data("w"), **dict(sparsifier.data_groups["w"], sparsity_level=0.7))
        out[f"{tag}.update_mask"] = sparsifier.get_mask("w", as_bool=True).clone()
        sparsifier.update_mask("w", sparsifier.get_data("w"), **sparsifier.data_groups["w"])
        state = sparsifier.state_dict()
        out[f"{tag}.state_masks"] = {name: state["state"][name]["mask"] for name in sparsifier.data_groups}
        sparsifier.squash_mask()
        out[f"{tag}.squashed"] = {name: sparsifier.get_data(name, return_original=False).detach().clone()
                                  for name in sparsifier.data_groups}


def _run_bad_input_cases(world: int, rank: int, out: dict) -> None:
    from sparsity_ext.distributed import ShardedDataNormSparsifier, sharded_block_norm_mask
    table = make_table("random", 40, 16)
    # Shards starting inside a block row (rank 1 on row 5 with (2, 4) blocks; rows 1 and 2 of a (3, 5) block
    # on three ranks when world > 2): the split block rows are completed across ranks.
    misaligned = [5] + split_rows(35, 1, world - 1, "even")
    for label, block, zeros, norm, kind in (("a", (2, 4), None, 1, "random"), ("b", (3, 5), 7, 2, "ties")):
        data = make_table(kind, 40, 16, seed=3)
        out[f"misaligned.{label}"] = sharded_block_norm_mask(local_rows(data, misaligned, rank), 0.5, block, zeros,
                                                             norm)
        out[f"misaligned.{label}.packed"] = sharded_block_norm_mask(local_rows(data, misaligned, rank), 0.5, block,
                                                                    zeros, norm, packed=True)
    thin = [1, 1] + split_rows(38, 1, world - 2, "even") if world > 2 else [1, 39]
    out["misaligned.thin"] = sharded_block_norm_mask(local_rows(table, thin, rank), 0.3, (3, 4))
    sizes = split_rows(40, 2, world, "even")
    local = local_rows(table, sizes, rank)
    out["bad.width"] = _expect_error(
        lambda: sharded_block_norm_mask(local[:, :15] if rank == 1 else local, 0.5, (2, 4)))
    out["bad.level"] = _expect_error(lambda: sharded_block_norm_mask(local, 0.5 if rank else 0.25, (2, 4)))
    out["bad.dtype"] = _expect_error(
        lambda: sharded_block_norm_mask(local.to(torch.int32) if rank == world - 1 else local, 0.5, (2, 4)))

    # The sparsifier on shards that start inside a block row.
    sparsifier = ShardedDataNormSparsifier(sparse_block_shape=(2, 4), mask_dtype=torch.bool)
    sparsifier.add_data("t", local_rows(table, misaligned, rank))
    sparsifier.step()
    out["misaligned.sparsifier"] = sparsifier.get_mask("t").clone()
    # Different names on different ranks.
    sparsifier.add_data("extra" if rank == 0 else "other", local.clone())
    out["bad.names"] = _expect_error(sparsifier.step)
    # The group still works after every bad input: a correct call.
    out["bad.after"] = sharded_block_norm_mask(local, 0.5, (2, 4))


def _run_dtensor_cases(world: int, rank: int, out: dict) -> None:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from sparsity_ext.distributed import ShardedDataNormSparsifier, sharded_block_norm_mask
    mesh = init_device_mesh("cpu", (world,))
    table = make_table("ties", 48, 20)
    dtable = distribute_tensor(table, mesh, [Shard(0)])
    out["dt.function"] = sharded_block_norm_mask(dtable, 0.4, (2, 4), 5, 1)
    embedding = torch.nn.Embedding(48, 20)
    embedding.weight = torch.nn.Parameter(distribute_tensor(table.clone(), mesh, [Shard(0)]))
    sparsifier = ShardedDataNormSparsifier(sparsity_level=0.4, sparse_block_shape=(2, 4), mask_dtype="packed")
    sparsifier.add_data("emb", embedding)
    sparsifier.step()
    out["dt.sparsifier"] = sparsifier.get_mask("emb", as_bool=True).clone()
    sparsifier.squash_mask()
    out["dt.squashed"] = embedding.weight.to_local().detach().clone()  # squash zeroed the DTensor's own shard
    # A mesh that orders the ranks otherwise than its group (shard i would not be group rank i's rows).
    reversed_mesh = DeviceMesh("cpu", list(reversed(range(world))))
    out["dt.reversed_mesh"] = _expect_error(
        lambda: sharded_block_norm_mask(distribute_tensor(table, reversed_mesh, [Shard(0)]), 0.4, (2, 4)))


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    out: dict = {}
    try:
        _run_function_cases(world, rank, out)
        _run_sparsifier_cases(world, rank, out)
        _run_bad_input_cases(world, rank, out)
        _run_dtensor_cases(world, rank, out)
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- tests
_RUNS: dict[int, list[dict]] = {}


def launch(world: int, tmp_dir) -> list[dict]:
    """Runs the worker on `world` gloo processes; each rank's saved results, by rank."""
    if world not in _RUNS:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        init_file = os.path.join(tmp_dir, "store")
        procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(world), init_file, str(tmp_dir)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(world)]
        outputs = []
        try:
            for proc in procs:
                outputs.append(proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        for rank, proc in enumerate(procs):
            assert proc.returncode == 0, f"rank {rank} of {world} exited with {proc.returncode}:\n{outputs[rank]}"
        _RUNS[world] = [torch.load(os.path.join(tmp_dir, f"rank{rank}.pt"), weights_only=False)
                        for rank in range(world)]
    return _RUNS[world]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    return world, launch(world, tmp_path_factory.mktemp(f"world{world}"))


def _gathered(results: list[dict], key: str, name: str | None = None) -> torch.Tensor:
    parts = [r[key] if name is None else r[key][name] for r in results]
    return torch.cat(parts)


def _as_bool(mask: torch.Tensor, shape) -> torch.Tensor:
    return ops.unpack_mask(mask, shape) if mask.dtype == torch.uint8 and mask.shape != shape else mask


def test_function_masks_match_single_process(run):
    world, results = run
    mismatched = []
    for case in FUNCTION_CASES:
        table = make_table(case["kind"], case["rows"], case["width"], case["dtype"], case["seed"])
        expected = ops.block_norm_mask(table, case["level"], case["block"], case["zeros"], case["norm"])
        sizes = split_rows(case["rows"], case["block"][0], world, case["pattern"])
        shards = [_as_bool(r[case["name"]], (sizes[rank], case["width"])) for rank, r in enumerate(results)]
        if not torch.equal(torch.cat(shards), expected):
            mismatched.append(case)
    assert not mismatched, mismatched


def test_ties_straddle_ranks():
    """The tie cases exercise the cross-rank tie rank: the threshold's ties lie on several ranks and only
    some of them are selected (so which ones depends on the select over the tied blocks' indices)."""
    straddling = 0
    for case in FUNCTION_CASES:
        if case["kind"] not in ("ties", "constant") or case["level"] in (0.0, 1.0):
            continue
        table = make_table(case["kind"], case["rows"], case["width"], case["dtype"], case["seed"])
        scores = score_chunk(table, case["block"], case["norm"])
        k = num_selected_blocks(case["level"], scores.numel())
        threshold = scores.sort().values[k - 1]
        tied = (scores == threshold).nonzero().flatten()
        chosen = k - int((scores < threshold).sum())
        block_cols = -(-case["width"] // case["block"][1])
        tie_rows = tied // block_cols * case["block"][0]
        sizes = split_rows(case["rows"], case["block"][0], 2, case["pattern"])
        if 0 < chosen < tied.numel() and (tie_rows < sizes[0]).any() and (tie_rows >= sizes[0]).any():
            straddling += 1
    assert straddling >= 8


def _reference_sparsifier(level_of_emb: float):
    tables = {name: make_table(kind, rows, width, seed=100 + i)
              for i, (name, kind, rows, width, _) in enumerate(SPARSIFIER_TABLES)}
    sparsifier = DataNormSparsifier(**SPARSIFIER_DEFAULTS, mask_dtype=torch.bool)
    for name, _, _, _, overrides in SPARSIFIER_TABLES:
        sparsifier.add_data(name, tables[name], **dict(overrides, **({"sparsity_level": level_of_emb}
                                                                      if name == "emb" else {})))
    sparsifier.step()
    return sparsifier


@pytest.mark.parametrize("mask_dtype", [None, torch.bool, "packed"], ids=str)
def test_sparsifier_matches_single_process(run, mask_dtype):
    world, results = run
    tag = f"s[{mask_dtype}]"
    for step, level in zip(("step1", "step2"), SPARSIFIER_LEVELS):
        reference = _reference_sparsifier(level)
        for name in reference.data_groups:
            assert torch.equal(_gathered(results, f"{tag}.{step}", name), reference.get_mask(name)), (step, name)
    for name in reference.data_groups:  # the saved masks are the live ones, in the sparsifier's format
        for rank, r in enumerate(results):
            assert torch.equal(_as_bool(r[f"{tag}.state_masks"][name].to_dense(), r[f"{tag}.step2"][name].shape)
                               != 0, r[f"{tag}.step2"][name])
    single = DataNormSparsifier(**SPARSIFIER_DEFAULTS, mask_dtype=torch.bool)
    single.add_data("w", reference.get_data("w"), **dict(SPARSIFIER_TABLES[1][4], sparsity_level=0.7))
    single.step()
    assert torch.equal(_gathered(results, f"{tag}.update_mask"), single.get_mask("w"))
    reference.squash_mask()
    for name in reference.data_groups:
        assert torch.equal(_gathered(results, f"{tag}.squashed", name), reference.get_data(name, return_original=False))
    # Per table: 3 radix passes + 1 tie-count all-reduce, and as many again where only some of the blocks tied
    # at the threshold are selected (a select over their indices); then 1 vote; each of 2^11 + world int64s.
    collectives = 1
    for i, (name, kind, rows, width, overrides) in enumerate(SPARSIFIER_TABLES):
        config = dict(SPARSIFIER_DEFAULTS, **overrides)
        scores = score_chunk(make_table(kind, rows, width, seed=100 + i), config["sparse_block_shape"], 2).sort().values
        k = num_selected_blocks(SPARSIFIER_LEVELS[0] if name == "emb" else config["sparsity_level"], scores.numel())
        tied = scores == scores[k - 1]
        collectives += 8 if int(tied.sum()) > int(tied[:k].sum()) else 4
    assert all(r[f"{tag}.bytes"] == collectives * ((1 << 11) + world) * 8 for r in results)


@pytest.mark.parametrize("mask_dtype", [None, torch.bool, "packed"], ids=str)
@pytest.mark.parametrize("where", ["score", "keep"])
def test_failing_rank_changes_nothing_anywhere(run, mask_dtype, where):
    world, results = run
    failing_rank = 1 if where == "score" else world - 1
    for rank, r in enumerate(results):
        outcome = r[f"s[{mask_dtype}].fail_{where}"]
        assert outcome["error"] is not None, f"rank {rank} did not raise"
        kind, message = outcome["error"]
        assert kind == "RuntimeError"
        assert f"failed on rank(s) [{failing_rank}]" in message and "injected failure" in message, message
        assert outcome["unchanged"], f"rank {rank} changed its data or masks"


@pytest.mark.parametrize("mask_dtype", [None, torch.bool, "packed"], ids=str)
def test_bad_config_on_one_rank_raises_everywhere(run, mask_dtype):
    _, results = run
    for r in results:
        outcome = r[f"s[{mask_dtype}].bad_config"]
        assert outcome["error"][0] == "ValueError" and "rank 0" in outcome["error"][1], outcome
        assert outcome["unchanged"]


@pytest.mark.parametrize("key, pattern", [
    ("bad.width", "same width"),
    ("bad.level", "same level"),
    ("bad.dtype", "must be one of"),
    ("bad.names", "same names in the same order"),
])
def test_bad_input_raises_on_every_rank(run, key, pattern):
    _, results = run
    for rank, r in enumerate(results):
        assert r[key] is not None and r[key][0] == "ValueError" and pattern in r[key][1], (rank, r[key])


def test_bad_input_leaves_the_group_usable(run):
    _, results = run
    table = make_table("random", 40, 16)
    assert torch.equal(_gathered(results, "bad.after"), ops.block_norm_mask(table, 0.5, (2, 4)))


def test_shards_starting_inside_a_block_row(run):
    _, results = run
    for label, block, zeros, norm, kind in (("a", (2, 4), None, 1, "random"), ("b", (3, 5), 7, 2, "ties")):
        expected = ops.block_norm_mask(make_table(kind, 40, 16, seed=3), 0.5, block, zeros, norm)
        assert torch.equal(_gathered(results, f"misaligned.{label}"), expected), label
        # each rank packs its own rows: compare unpacked shard by shard
        rows = [r[f"misaligned.{label}"].shape[0] for r in results]
        starts = [sum(rows[:i]) for i in range(len(rows))]
        for r, start, count in zip(results, starts, rows):
            assert torch.equal(ops.unpack_mask(r[f"misaligned.{label}.packed"], (count, 16)),
                               expected[start:start + count]), label
    table = make_table("random", 40, 16)
    assert torch.equal(_gathered(results, "misaligned.thin"), ops.block_norm_mask(table, 0.3, (3, 4)))
    reference = DataNormSparsifier(sparse_block_shape=(2, 4), mask_dtype=torch.bool)
    reference.add_data("t", table.clone())
    reference.step()
    assert torch.equal(_gathered(results, "misaligned.sparsifier"), reference.get_mask("t"))


def test_dtensor_shards(run):
    _, results = run
    table = make_table("ties", 48, 20)
    assert torch.equal(_gathered(results, "dt.function"), ops.block_norm_mask(table, 0.4, (2, 4), 5, 1))
    reference = DataNormSparsifier(sparsity_level=0.4, sparse_block_shape=(2, 4), mask_dtype=torch.bool)
    reference.add_data("emb", table.clone())
    reference.step()
    assert torch.equal(_gathered(results, "dt.sparsifier"), reference.get_mask("emb"))
    reference.squash_mask()
    assert torch.equal(_gathered(results, "dt.squashed"), reference.get_data("emb", return_original=False))
    for r in results:
        assert r["dt.reversed_mesh"][0] == "ValueError" and "group-rank order" in r["dt.reversed_mesh"][1]


def test_needs_an_initialized_process_group():
    from sparsity_ext.distributed import sharded_block_norm_mask
    with pytest.raises(RuntimeError, match="init_process_group"):
        sharded_block_norm_mask(torch.ones(4, 4), 0.5)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
