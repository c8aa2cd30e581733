"""What `sparsity-ext bench` measures: one Case per op variant, each with its input maker, its memory floor
and the torch baselines that do the same job.

A case is run at several sizes (element counts; see sizes_for). Its sparsity_ext call runs on every backend
the registry can run it on for the device; its baselines are the natural torch ways to get the same result:
torch.ao.pruning's own mask update for the same configuration, torch.kthvalue / torch.topk, masked_fill_ /
mul_, and torch's own 2:4 conversion.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from .. import ops

TABLE_COLS = 128              # embedding-table-like cases: (numel // 128) rows x 128
LEVEL, BLOCK = 0.8, (1, 4)    # block_norm_mask cases: DataNormSparsifier's usual embedding configuration, L1

# Element counts per size step. quick: about a minute on a 2-core CPU; full CPU: up to 16M elements; full CUDA: up to
# 2^28 (16384^2, 1 GiB of fp32), which keeps the whole CUDA suite to a couple of minutes on an H100.
SIZE_LADDERS = {
    ("cpu", True): (2**12, 2**14, 2**16, 2**18, 2**20),
    ("cpu", False): (2**16, 2**18, 2**20, 2**22, 2**24),
    ("cuda", True): (2**16, 2**20, 2**24),
    ("cuda", False): (2**20, 2**22, 2**24, 2**26, 2**28),
}
# Implementations that are slow by design (torch.ao.pruning, full-sort baselines, the pure-torch reference backend)
# stop at this many elements on each device, so that the suite's time is spent on the kernels.
SLOW_MAX_NUMEL = {"cpu": 2**22, "cuda": 2**28}


@dataclasses.dataclass(frozen=True)
class Baseline:
    name: str
    bind: Callable[[dict], Callable[[], object]]   # inputs -> the one call to time
    key: str                                       # same key (and size): same measurement, taken once
    slow: bool = False                             # slow by design: capped at SLOW_MAX_NUMEL


@dataclasses.dataclass(frozen=True)
class Case:
    key: str                       # short id, accepted by --ops (its op name selects all its variants)
    op: str                        # the sparsity_ext op (registry name) it measures
    title: str
    layout: str                    # "table": rows x TABLE_COLS, "square": side x side, "vector": (n,)
    dtype: torch.dtype             # dtype of the tensor the op dispatches on
    make: Callable[[tuple, str, torch.Generator], dict]     # (shape, device, generator) -> inputs
    run: Callable[[dict], object]  # the sparsity_ext call
    floor_bytes: Callable[[int], float]   # bytes read once + written once, for numel elements
    baselines: tuple[Baseline, ...] = ()
    restore: bool = False          # run() changes inputs["x"]: restore it from inputs["pristine"] before each call
    max_numel: dict | None = None  # per device: cap on this case's sizes


def shape_for(layout: str, numel: int) -> tuple[int, ...]:
    if layout == "table":
        return (max(1, numel // TABLE_COLS), TABLE_COLS)
    if layout == "square":  # a multiple of 64 on each side: torch's 2:4 layouts need it
        side = max(64, round(math.sqrt(numel) / 64) * 64)
        return (side, side)
    return (numel,)


def sizes_for(case: Case, device: str, quick: bool, override: tuple[int, ...] | None = None) -> list[int]:
    """The element counts a case runs at: the ladder (or --sizes), each capped by the case's max_numel."""
    ladder = override or SIZE_LADDERS[(device, quick)]
    cap = (case.max_numel or {}).get(device)
    return sorted({min(n, cap) if cap else n for n in ladder})


# ------------------------------------------------------------------------------------------- inputs
def _randn(shape, device, generator, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device).to(dtype)


def _table(shape, device, generator) -> dict:
    return {"x": _randn(shape, device, generator)}


def _table_in_place(shape, device, generator) -> dict:
    x = _randn(shape, device, generator)
    return {"x": x, "pristine": x.clone()}


def _half_square(shape, device, generator) -> dict:
    return {"x": _randn(shape, device, generator, torch.float16)}


def _half_square_and_masked(shape, device, generator) -> dict:
    x = _randn(shape, device, generator, torch.float16)
    return {"x": x, "masked": x * ops.nm_mask(x, 2, 4)}   # torch's 2:4 conversions take already-2:4 tensors


def _vector(shape, device, generator) -> dict:
    return {"v": _randn(shape, device, generator)}


def _data_and_masks(shape, device, generator) -> dict:
    x = _randn(shape, device, generator)
    mask = x > 0
    return {"x": x, "mask": mask, "not_mask": ~mask, "packed": ops.pack_mask(mask)}


def _packed_mask(shape, device, generator) -> dict:
    mask = _randn(shape, device, generator) > 0
    return {"mask": mask, "packed": ops.pack_mask(mask), "shape": list(shape)}


# ------------------------------------------------------------------------------- torch baselines
def _ao_data_norm(inputs: dict):
    """torch.ao.pruning's DataNormSparsifier holding inputs["x"] (same storage), configured as the cases."""
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier
    sparsifier = DataNormSparsifier(sparsity_level=LEVEL, sparse_block_shape=BLOCK, zeros_per_block=BLOCK[0] * BLOCK[1],
                                    norm="L1")
    sparsifier.add_data("table", inputs["x"])
    return sparsifier


def _ao_data_norm_step(inputs: dict):
    return _ao_data_norm(inputs).step


def _ao_data_norm_step_apply(inputs: dict):
    sparsifier = _ao_data_norm(inputs)
    data = sparsifier.get_data("table", return_original=True)

    def step_and_apply():
        sparsifier.step()
        data.mul_(sparsifier.get_mask("table"))
    return step_and_apply


def _ao_weight_norm_24_step(inputs: dict):
    import torch.ao.pruning as ao
    weight = inputs["x"]
    model = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta"))
    model[0].weight = torch.nn.Parameter(weight, requires_grad=False)
    sparsifier = ao.WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    return sparsifier.step


def _kth(values: torch.Tensor) -> int:
    return max(1, int(values.numel() * LEVEL))


def _torch_24_conversions(device: str) -> tuple[Baseline, ...]:
    if device == "cuda":
        from torch.sparse import to_sparse_semi_structured
        return (Baseline("torch.sparse.to_sparse_semi_structured (pre-masked)",
                         lambda a: lambda: to_sparse_semi_structured(a["masked"]), "to_sparse_semi_structured"),
                Baseline("torch._sparse_semi_structured_tile (own 2:4 pattern)",
                         lambda a: lambda: torch._sparse_semi_structured_tile(a["x"]), "sparse_semi_structured_tile"))
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass
    return (Baseline("torch CPU 2:4 conversion (cutlass layout, pre-masked)",
                     lambda a: lambda: sparse_semi_structured_from_dense_cutlass(a["masked"]), "cutlass_conversion_cpu"),)


AO_DATA_NORM_STEP = Baseline("torch.ao DataNormSparsifier.step", _ao_data_norm_step, "ao_data_norm_step", slow=True)
MASKED_FILL = Baseline("torch masked_fill_ (bool mask)", lambda a: lambda: a["x"].masked_fill_(a["not_mask"], 0),
                       "masked_fill")
MUL = Baseline("torch mul_ (bool mask)", lambda a: lambda: a["x"].mul_(a["mask"]), "mul")


def cases(device: str) -> list[Case]:
    """Every case, for a device (the 2:4 conversion baselines differ between CPU and CUDA)."""
    table = f"fp32 rows x {TABLE_COLS}, block {BLOCK} {LEVEL:.0%} L1"
    found = [
        Case("block_norm_mask", "block_norm_mask", f"block_norm_mask {table} -> bool", "table", torch.float32, _table,
             lambda a: ops.block_norm_mask(a["x"], LEVEL, BLOCK, None, 1),
             lambda t: 4 * t + t, (AO_DATA_NORM_STEP,)),
        Case("block_norm_mask.packed", "block_norm_mask", f"block_norm_mask {table} -> packed", "table", torch.float32,
             _table, lambda a: ops.block_norm_mask(a["x"], LEVEL, BLOCK, None, 1, packed=True),
             lambda t: 4 * t + t / 8, (AO_DATA_NORM_STEP,)),
        Case("block_norm_mask_apply_", "block_norm_mask_apply_", f"block_norm_mask_apply_ {table} -> packed", "table",
             torch.float32, _table_in_place,
             lambda a: ops.block_norm_mask_apply_(a["x"], LEVEL, BLOCK, None, 1, packed=True),
             lambda t: 4 * t + LEVEL * 4 * t + t / 8,   # W read, its zeroed part written, the bits written
             (Baseline("torch.ao DataNormSparsifier.step + mul_", _ao_data_norm_step_apply, "ao_data_norm_apply",
                       slow=True),),
             restore=True),
        Case("nm_mask", "nm_mask", "nm_mask 2:4 fp16 square -> bool", "square", torch.float16, _half_square,
             lambda a: ops.nm_mask(a["x"], 2, 4), lambda t: 2 * t + t,
             (Baseline("torch.ao WeightNormSparsifier.step (2:4)", _ao_weight_norm_24_step, "ao_weight_norm_24", slow=True),)),
        Case("select_threshold", "select_threshold", f"select_threshold fp32, k = {LEVEL:.0%} of n", "vector",
             torch.float32, _vector, lambda a: ops.select_threshold(a["v"], _kth(a["v"])), lambda t: 4 * t,
             (Baseline("torch.kthvalue", lambda a: lambda: torch.kthvalue(a["v"], _kth(a["v"])), "kthvalue", slow=True),
              Baseline("torch.topk(largest=False)", lambda a: lambda: torch.topk(a["v"], _kth(a["v"]), largest=False),
                       "topk", slow=True)),
             max_numel={"cuda": 10**8}),
        Case("apply_mask_", "apply_mask_", "apply_mask_ fp32 rows x 128, bool mask", "table", torch.float32,
             _data_and_masks, lambda a: ops.apply_mask_(a["x"], a["mask"]),
             lambda t: 4 * t + t + 4 * t, (MASKED_FILL, MUL)),
        Case("apply_mask_.packed", "apply_mask_", "apply_mask_ fp32 rows x 128, packed mask", "table", torch.float32,
             _data_and_masks, lambda a: ops.apply_mask_(a["x"], a["packed"]),
             lambda t: 4 * t + t / 8 + 4 * t, (MASKED_FILL, MUL)),
        Case("pack_mask", "pack_mask", "pack_mask bool rows x 128 -> 1 bit each", "table", torch.bool, _packed_mask,
             lambda a: ops.pack_mask(a["mask"]), lambda t: t + t / 8),
        Case("unpack_mask", "unpack_mask", "unpack_mask 1 bit each -> bool rows x 128", "table", torch.uint8,
             _packed_mask, lambda a: ops.unpack_mask(a["packed"], a["shape"]), lambda t: t / 8 + t),
    ]
    # 2:4 prune + pack into torch's semi-structured layout: values (half the elements) + metadata (2 bits per kept
    # value). torch's conversions take an already-2:4 tensor, so they do less work than the fused op.
    conversion = _torch_24_conversions(device)
    floor_24 = lambda t: 2 * t + t + t / 8   # noqa: E731
    if hasattr(ops, "sparsify_24_pack"):
        found.append(Case("sparsify_24_pack", "sparsify_24_pack", "sparsify_24_pack fp16 square (2:4 prune + pack)",
                          "square", torch.float16, _half_square_and_masked,
                          lambda a: ops.sparsify_24_pack(a["x"]), floor_24, conversion))
    else:  # torch's side alone until the fused op lands, so the two can be compared later
        found.append(Case("sparsify_24_pack", "", "2:4 pack fp16 square (sparsify_24_pack not in this build)",
                          "square", torch.float16, _half_square_and_masked, None, floor_24, conversion))
    return found

