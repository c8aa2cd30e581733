"""TorchRecSparsifier on DistributedModelParallel over gloo, 2 and 3 processes, every sharding type.

Each world is launched once: every rank builds the same DLRM-like collection (one table per sharding type:
table-wise, row-wise, column-wise, table-row-wise, table-column-wise, data-parallel), writes its shards of
deterministic tie-free tables, sparsifies with two configs (block rows that straddle row shards, blocks
wider than column shards), and saves its masks with their shard offsets; the tests assemble every table's
mask from all ranks and compare it with DataNormSparsifier's mask of the whole table. Failures injected on
one rank and a bad config on one rank must raise on every rank and leave every weight unchanged.

Run as a script (`python tests/test_torchrec_distributed.py RANK WORLD PORT OUT_DIR`), this file is the worker.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

WORLD_SIZES = (2, 3)
LAUNCH_TIMEOUT_S = 240
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel")
ROWS, DIM = 101, 24  # 101 rows split over 2 or 3 ranks: row shards start inside block rows
CONFIGS = {"a": dict(sparsity_level=0.5, sparse_block_shape=(4, 4)),
           "b": dict(sparsity_level=0.3, sparse_block_shape=(3, 12), zeros_per_block=20, norm="L2")}


def full_table(index: int) -> torch.Tensor:
    return torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(10 + index))


# ----------------------------------------------------------------------------------- worker
def _build_model(world: int):
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints

    class EverySharding(EmbeddingBagCollectionSharder):
        """The stock sharder offers row-wise and table-row-wise only for cuda; its cuda list plans on the CPU."""

        def sharding_types(self, compute_device_type: str) -> list[str]:
            return super().sharding_types("cuda")

    tables = [EmbeddingBagConfig(name=f"t_{kind}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f"f_{kind}"])
              for kind in SHARDING_TYPES]
    constraints = {f"t_{kind}": ParameterConstraints(sharding_types=[kind], min_partition=8) for kind in SHARDING_TYPES}
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu",
                                                         local_world_size=world), constraints=constraints)
    sharders = [EverySharding()]
    plan = planner.collective_plan(ebc, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan, sharders=sharders)


def _fill(model) -> None:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    with torch.no_grad():
        for key, value in model.state_dict().items():
            table = full_table(SHARDING_TYPES.index(key.split(".")[-2][2:]))
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(table[row:row + rows, col:col + cols])
            else:
                value.copy_(table)


def _snapshot(model) -> dict:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    snapshot = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            snapshot[key] = {tuple(s.metadata.shard_offsets): s.tensor.clone() for s in value.local_shards()}
        else:
            snapshot[key] = {(0, 0): value.clone()}
    return snapshot


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[key].keys() == b[key].keys() and
                                        all(torch.equal(a[key][o], b[key][o]) for o in a[key]) for key in a)


def _expect_error(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 -- the test inspects which error every rank got
        return type(exc).__name__, str(exc)
    return None


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from sparsity_ext.distributed import _pieces
    from sparsity_ext.torchrec import TorchRecSparsifier, sparsify_torchrec
    model = _build_model(world)
    out = {"layouts": {}}
    for label, config in CONFIGS.items():
        _fill(model)
        sparsifier = sparsify_torchrec(model, **config)
        out[label] = {name: {offset: mask.clone() for offset, mask in by_offset.items()}
                      for name, by_offset in sparsifier.state_dict()["masks"].items()}
        out[f"{label}.weights"] = _snapshot(model)
        out[f"{label}.bytes"] = sparsifier.last_step_bytes
        sparsifier.squash_mask()
    out["layouts"] = {name: [(p.rank, p.rect) for p in table.pieces] if table.pieces else None
                      for name, table in sparsifier.tables.items()}

    _fill(model)
    before = _snapshot(model)
    sparsifier = TorchRecSparsifier(model, **CONFIGS["a"])
    original = _pieces.score_chunk
    if rank == world - 1:
        def failing(*args):
            raise ValueError("injected failure")
        _pieces.score_chunk = failing
    out["fail"] = _expect_error(sparsifier.step)
    _pieces.score_chunk = original
    out["fail.unchanged"] = _same(before, _snapshot(model))
    bad_level = 0.25 if rank == 0 else 0.5
    out["bad_config"] = _expect_error(lambda: TorchRecSparsifier(model, sparsity_level=bad_level).step())
    out["bad_name"] = _expect_error(lambda: TorchRecSparsifier(model, tables=["t_row_wise", "nope"]))
    out["bad.unchanged"] = _same(before, _snapshot(model))
    sparsifier.step()  # the group still works after the failures
    out["after"] = sparsifier.state_dict()["masks"]
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------ tests
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    pytest.importorskip("torchrec", reason="torchrec is not importable; install the extra: see setup in ./run")
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"torchrec{world}")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(world), str(port), str(out_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"world {world} did not finish in {LAUNCH_TIMEOUT_S} s")
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    return world, [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _assembled(results: list[dict], key: str, name: str) -> torch.Tensor:
    """The whole table's mask from every rank's pieces (each element written by exactly one rank, except
    replicated tables, whose every rank's copy must agree)."""
    whole = torch.zeros(ROWS, DIM, dtype=torch.int64)
    for r in results:
        for (row, col), mask in r[key].get(name, {}).items():
            whole[row:row + mask.shape[0], col:col + mask.shape[1]] += mask.long() + 1
    return whole


@pytest.mark.parametrize("label", list(CONFIGS))
def test_every_sharding_type_matches_the_single_process_mask(run, label):
    from sparsity_ext.data_sparsifier import DataNormSparsifier
    world, results = run
    for index, kind in enumerate(SHARDING_TYPES):
        name = f"t_{kind}"
        config = dict(CONFIGS[label])
        reference = DataNormSparsifier(mask_dtype=torch.bool, **config)
        reference.add_data("t", full_table(index))
        reference.step()
        expected = reference.get_mask("t")
        copies = world if kind == "data_parallel" else 1
        assembled = _assembled(results, label, name)
        assert torch.equal(assembled, (expected.long() + 1) * copies), (kind, label)
        weights = {}
        for r in results:
            for offset, tensor in r[f"{label}.weights"][f"embedding_bags.{name}.weight"].items():
                weights[offset] = tensor
        for (row, col), tensor in weights.items():
            part = (slice(row, row + tensor.shape[0]), slice(col, col + tensor.shape[1]))
            assert torch.equal(tensor, torch.where(expected, full_table(index), torch.zeros(()))[part]), (kind, label)


def test_layouts_cover_the_interesting_cases(run):
    world, results = run
    layouts = results[0]["layouts"]
    row_wise = layouts["t_row_wise"]
    assert len(row_wise) == world and any(rect.row % 4 for _, rect in row_wise)  # a shard starts mid block row
    column_wise = layouts["t_column_wise"]
    assert len(column_wise) > 1 and any(rect.cols < 12 for _, rect in column_wise)  # narrower than a block
    assert layouts["t_data_parallel"] is None
    assert all(r["layouts"] == layouts for r in results)
    assert all(r["a.bytes"] > 0 for r in results)


def test_a_failing_rank_raises_everywhere_and_changes_nothing(run):
    world, results = run
    for r in results:
        kind, message = r["fail"]
        assert kind == "RuntimeError" and f"failed on rank(s) [{world - 1}]" in message, message
        assert "injected failure" in message
        assert r["fail.unchanged"]


def test_bad_input_raises_on_every_rank(run):
    _, results = run
    for r in results:
        assert r["bad_config"][0] == "ValueError" and "same level" in r["bad_config"][1], r["bad_config"]
        assert r["bad_name"][0] == "ValueError" and "no table named ['nope']" in r["bad_name"][1]
        assert r["bad.unchanged"]
    for name in results[0]["after"]:
        assert torch.equal(_assembled(results, "after", name), _assembled(results, "a", name))


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
