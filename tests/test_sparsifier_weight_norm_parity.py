"""WeightNormSparsifier masks: parity with torch.ao.pruning on tie-free data, the mask contract where
torch.ao.pruning breaks, conv / 1-D / fp16 weights, callable norms, and backend agreement."""
import itertools

import pytest
import torch
from torch import nn
from torch.ao import pruning as tao

import sparsity_ext
from sparsity_ext import reference
from sparsity_ext.sparsifier.weight_norm_sparsifier import as_matrix, from_matrix

from conftest import backend_available, tie_free

BLOCKS = [(1, 1), (1, 4), (4, 1), (2, 2), (3, 5)]
LEVELS = [0, 0.3, 0.5, 0.8, 1]
# full tiling for every block; partial edge blocks; blocks taller than the weight for (4, 1) and (3, 5)
SHAPES = [(12, 20), (7, 10), (2, 9)]


def torch_ao_breaks(shape, block, level, zeros):
    """Where torch.ao.pruning's WeightNormSparsifier raises or returns a mask of the wrong shape: partial
    edge blocks (which includes blocks taller than the weight) with 0 < zeros_per_block < block size and
    sparsity_level > 0. (Verified below: every case flagged here does break, every other one matches.)"""
    partial = shape[0] % block[0] != 0 or shape[1] % block[1] != 0
    return partial and 0 < zeros < block[0] * block[1] and level > 0


GRID = [(shape, block, level, zeros, norm)
        for shape, block, level, norm in itertools.product(SHAPES, BLOCKS, LEVELS, (1, 2))
        for zeros in range(block[0] * block[1] + 1)]


def _grid_id(case):
    shape, block, level, zeros, norm = case
    oracle = "reference(torch.ao breaks)" if torch_ao_breaks(shape, block, level, zeros) else "torch.ao"
    return f"{shape[0]}x{shape[1]}-b{block[0]}x{block[1]}-s{level}-z{zeros}-L{norm}-vs-{oracle}"


def _model_with(weight):
    """A module whose only tensor is `weight` (tensor_fqn 'weight')."""
    model = nn.Module()
    model.weight = nn.Parameter(weight.clone())
    return model


def _sparsify(sparsifier_cls, weight, config_entry=None, steps=1, **kwargs):
    """(model, sparsifier) after prepare + `steps` steps on a one-tensor model."""
    model = _model_with(weight)
    sparsifier = sparsifier_cls(**kwargs)
    sparsifier.prepare(model, [{"tensor_fqn": "weight", **(config_entry or {})}])
    for _ in range(steps):
        sparsifier.step()
    return model, sparsifier


def _mask(model):
    return model.parametrizations.weight[0].mask


@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_masks_and_squashed_weights_equal_torch_ao(case):
    shape, block, level, zeros, norm = case
    weight = tie_free(shape, seed=sum(shape) + block[0] * 7 + block[1])
    args = dict(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm)
    ours, ours_sparsifier = _sparsify(sparsity_ext.WeightNormSparsifier, weight, **args)
    assert _mask(ours).shape == shape

    if torch_ao_breaks(shape, block, level, zeros):
        # torch.ao.pruning's dtype rule: bool from its logical_or when zeros_per_block < block size
        computed = 0 < level and 0 < zeros and not (level >= 1 and zeros == block[0] * block[1])
        assert _mask(ours).dtype == (torch.bool if computed and zeros < block[0] * block[1] else torch.float32)
        try:
            theirs, _ = _sparsify(tao.WeightNormSparsifier, weight, **args)
            assert _mask(theirs).shape != shape, "torch.ao.pruning was expected to give a wrongly-shaped mask"
        except RuntimeError:
            pass  # torch.ao.pruning raises here
        expected = reference.block_norm_mask(weight, level, block, zeros, norm)
        assert torch.equal(_mask(ours).bool(), expected)
        ours_sparsifier.squash_mask()
        assert torch.equal(ours.weight, weight * expected)
        return

    theirs, theirs_sparsifier = _sparsify(tao.WeightNormSparsifier, weight, **args)
    assert _mask(ours).dtype == _mask(theirs).dtype
    assert torch.equal(_mask(ours), _mask(theirs))
    ours_sparsifier.squash_mask()
    theirs_sparsifier.squash_mask()
    assert torch.equal(ours.weight.view(torch.int32), theirs.weight.view(torch.int32))


def test_rising_schedule_gives_torch_ao_masks_step_by_step():
    weight = tie_free((16, 24), seed=3)
    models, sparsifiers = [], []
    for cls in (sparsity_ext.WeightNormSparsifier, tao.WeightNormSparsifier):
        model, sparsifier = _sparsify(cls, weight, steps=0, sparsity_level=0.2, sparse_block_shape=(2, 2))
        models.append(model)
        sparsifiers.append(sparsifier)
    for level in (0.2, 0.45, 0.6, 0.85):
        for sparsifier in sparsifiers:
            sparsifier.groups[0]["sparsity_level"] = level
            sparsifier.step()
        assert torch.equal(_mask(models[0]).bool(), _mask(models[1]).bool()), level


def test_steps_score_the_masked_weight():
    """Like torch.ao.pruning, a step scores mask * weight: after a step at 0.5, a step at 0.25 masks a subset
    of the already-masked blocks (all scored 0; ties go to the lower block index)."""
    weight = tie_free((16, 24), seed=3)
    blocks_of = lambda mask: mask.reshape(8, 2, 12, 2).permute(0, 2, 1, 3).reshape(96, 4)  # noqa: E731
    for cls in (sparsity_ext.WeightNormSparsifier, tao.WeightNormSparsifier):
        model, sparsifier = _sparsify(cls, weight, sparsity_level=0.5, sparse_block_shape=(2, 2))
        first = ~blocks_of(_mask(model).bool()).any(dim=1)
        sparsifier.groups[0]["sparsity_level"] = 0.25
        sparsifier.step()
        second = ~blocks_of(_mask(model).bool()).any(dim=1)
        assert first.sum() == 48 and second.sum() == 24 and not (second & ~first).any()
        if cls is sparsity_ext.WeightNormSparsifier:
            assert torch.equal(second.nonzero(), first.nonzero()[:24])


def test_callable_norm_ranks_its_scores_as_torch_ao_does():
    weight = tie_free((8, 12), seed=5)

    def cubed(t):  # signed: the scores themselves are ranked, smallest first
        return t ** 3

    for block, zeros in (((1, 4), 4), ((2, 2), 2), ((1, 1), 1)):
        args = dict(sparsity_level=0.5, sparse_block_shape=block, zeros_per_block=zeros, norm=cubed)
        ours, _ = _sparsify(sparsity_ext.WeightNormSparsifier, weight, **args)
        theirs, _ = _sparsify(tao.WeightNormSparsifier, weight, **args)
        assert torch.equal(_mask(ours).bool(), _mask(theirs).bool())


def test_callable_norm_goes_through_ops_with_the_identity_norm(monkeypatch):
    """A callable norm is evaluated once and handed to ops.block_norm_mask with norm=0; built-in norms hand
    the original weight and its mask to ops.block_norm_mask_update_ with norm 1 or 2, on every backend."""
    calls = []
    real_mask, real_update = sparsity_ext.ops.block_norm_mask, sparsity_ext.ops.block_norm_mask_update_

    def spy_mask(data, level, block, zeros, norm, *rest):
        calls.append(("block_norm_mask", data.clone(), norm))
        return real_mask(data, level, block, zeros, norm, *rest)

    def spy_update(data, mask, level, block, zeros, norm):
        calls.append(("block_norm_mask_update_", data.clone(), norm))
        return real_update(data, mask, level, block, zeros, norm)

    monkeypatch.setattr(sparsity_ext.ops, "block_norm_mask", spy_mask)
    monkeypatch.setattr(sparsity_ext.ops, "block_norm_mask_update_", spy_update)
    weight = tie_free((4, 8), seed=6)
    _sparsify(sparsity_ext.WeightNormSparsifier, weight, norm=lambda t: t.abs() + 1)
    assert [c[0] for c in calls] == ["block_norm_mask"]
    assert calls[0][2] == 0 and torch.equal(calls[0][1], weight.abs() + 1)
    for backend in ("reference", "cpu") if backend_available("cpu", "cpu") else ("reference",):
        calls.clear()
        with sparsity_ext.use_backend(backend):
            _sparsify(sparsity_ext.WeightNormSparsifier, weight, norm=1)
        assert [c[0] for c in calls] == ["block_norm_mask_update_"]  # one op, whichever backend runs it
        assert calls[0][2] == 1 and torch.equal(calls[0][1], weight)  # the first mask keeps everything


@pytest.mark.parametrize("shape,block,level,zeros", [
    ((7, 30), (1, 4), 1.0, 2),    # 2:4 on a width that is not a multiple of 4
    ((7, 30), (1, 4), 0.5, 1),    # partial edge blocks, zeros_per_block < block size
    ((5, 9), (2, 2), 1.0, 3),     # s == 1 with partial blocks (torch.ao: padded mask shape)
    ((2, 9), (4, 1), 0.5, 2),     # block rows > weight rows
    ((3, 7), (5, 3), 0.6, 14),    # block larger than the weight in both directions
])
def test_cases_torch_ao_breaks_follow_the_contract(shape, block, level, zeros):
    weight = tie_free(shape, seed=11)
    model, _ = _sparsify(sparsity_ext.WeightNormSparsifier, weight, sparsity_level=level,
                         sparse_block_shape=block, zeros_per_block=zeros)
    expected = reference.block_norm_mask(weight, level, block, zeros, 2)
    assert _mask(model).shape == shape
    assert torch.equal(_mask(model).bool(), expected)
    if level == 1.0 and block == (1, 4):  # 2:4: every full group of 4 keeps its 2 largest |w|, the
        full = weight[:, :28].reshape(7, 7, 4).abs()  # partial group of 2 keeps none
        kept = _mask(model)[:, :28].reshape(7, 7, 4).bool()
        assert torch.equal(kept, full >= full.sort(dim=-1).values[..., 2:3])
        assert not _mask(model)[:, 28:].bool().any()
    assert model.weight.shape == shape  # the parametrized weight has the right shape


def test_conv_weight_blocks_run_along_input_channels_of_each_tap():
    """4-D conv weights are masked in the (Cout, kh*kw*Cin) layout (input channels fastest), so 2:4
    groups are 4 consecutive input channels of one kernel tap."""
    weight = tie_free((6, 8, 3, 3), seed=7)
    conv = nn.Conv2d(8, 6, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(conv, [{"tensor_fqn": "weight"}])
    sparsifier.step()
    mask = conv.parametrizations.weight[0].mask
    assert mask.shape == weight.shape and mask.dtype == torch.bool  # 2:4 masks are bool, as torch.ao.pruning's
    groups = weight.permute(0, 2, 3, 1).reshape(6, 3, 3, 2, 4).abs()   # (Cout, kh, kw, Cin/4, 4)
    kept = mask.permute(0, 2, 3, 1).reshape(6, 3, 3, 2, 4).bool()
    assert torch.equal(kept, groups >= groups.sort(dim=-1).values[..., 2:3])
    assert torch.equal(mask.bool(), from_matrix(reference.block_norm_mask(as_matrix(weight), 1.0, (1, 4), 2, 2),
                                                weight.shape))
    conv(torch.randn(1, 8, 5, 5))  # the parametrized conv runs
    sparsifier.squash_mask()
    assert torch.equal(conv.weight, weight * mask)


def test_conv_layout_round_trips():
    for shape in ((5, 3, 2, 4), (4, 6, 3), (3, 2, 2, 2, 2)):
        t = torch.arange(torch.Size(shape).numel()).reshape(shape)
        matrix = as_matrix(t)
        assert matrix.shape == (shape[0], t[0].numel())
        assert torch.equal(matrix[:, : shape[1]], t[(slice(None), slice(None)) + (0,) * (len(shape) - 2)])
        assert torch.equal(from_matrix(matrix, shape), t)


def test_one_dim_weight_is_one_row():
    weight = tie_free((10,), seed=8)
    model, _ = _sparsify(sparsity_ext.WeightNormSparsifier, weight, sparsity_level=0.5,
                         sparse_block_shape=(1, 2), zeros_per_block=1)
    expected = reference.block_norm_mask(weight[None], 0.5, (1, 2), 1, 2)[0]
    assert torch.equal(_mask(model).bool(), expected)


@pytest.mark.parametrize("zeros", [5, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_weights_follow_the_reference(dtype, zeros):
    weight = tie_free((9, 14), dtype=dtype, seed=9)
    model, _ = _sparsify(sparsity_ext.WeightNormSparsifier, weight, sparsity_level=0.6,
                         sparse_block_shape=(2, 4), zeros_per_block=zeros)
    # torch.ao.pruning's dtypes: bool within blocks, else float32, except that fp16/bf16 weights keep
    # their own dtype (torch.ao.pruning's float32 mask would turn them float32)
    half = dtype in (torch.float16, torch.bfloat16)
    assert _mask(model).dtype == (torch.bool if zeros < 8 else dtype if half else torch.float32)
    assert model.weight.dtype == dtype
    assert torch.equal(_mask(model).bool(), reference.block_norm_mask(weight, 0.6, (2, 4), zeros, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,block,level,zeros", [
    ((33, 70), (1, 4), 0.5, 4), ((33, 70), (1, 4), 1.0, 2), ((33, 70), (2, 3), 0.7, 4),
    ((64, 64), (4, 4), 0.9, 16), ((1, 101), (1, 8), 0.3, 5),
])
def test_reference_and_auto_backends_give_the_same_masks(dtype, shape, block, level, zeros):
    """Whatever 'auto' runs on this machine (a compiled kernel, or the reference fallback) agrees with the
    reference, through the sparsifier."""
    weight = tie_free(shape, dtype=dtype, seed=10)
    masks = []
    for backend in ("reference", "auto"):
        with sparsity_ext.use_backend(backend):
            model, _ = _sparsify(sparsity_ext.WeightNormSparsifier, weight, sparsity_level=level,
                                 sparse_block_shape=block, zeros_per_block=zeros)
        masks.append(_mask(model))
    assert torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("block,zeros", [((1, 4), 4), ((1, 4), 2), ((2, 4), 3)])
def test_steps_on_a_weight_of_many_row_tiles_equal_torch_ao(block, zeros):
    """The fused update scores mask * original tile by tile (128 KiB of rows); over rising levels, where each
    step re-scores the weight masked by the previous one, the masks stay torch.ao's."""
    weight = tie_free((300, 1000), seed=11)  # whole blocks: torch.ao mis-shapes partial ones
    ours_model, theirs_model = _model_with(weight), _model_with(weight)
    ours = sparsity_ext.WeightNormSparsifier(sparse_block_shape=block, zeros_per_block=zeros)
    theirs = tao.WeightNormSparsifier(sparse_block_shape=block, zeros_per_block=zeros)
    ours.prepare(ours_model, [{"tensor_fqn": "weight"}])
    theirs.prepare(theirs_model, [{"tensor_fqn": "weight"}])
    for level in (0.3, 0.55, 0.8):
        for sparsifier in (ours, theirs):
            sparsifier.groups[0]["sparsity_level"] = level
            sparsifier.step()
        assert torch.equal(_mask(ours_model), _mask(theirs_model)), level


META_MODULES = {"linear": lambda device: nn.Linear(32, 16, device=device),
                "conv": lambda device: nn.Conv2d(8, 4, 3, device=device)}


@pytest.mark.parametrize("make", sorted(META_MODULES))
@pytest.mark.parametrize("args", [dict(sparsity_level=0.5), dict(sparsity_level=0.5, zeros_per_block=2),
                                  dict(sparsity_level=0.7, sparse_block_shape=(2, 2), norm=lambda t: t.abs())])
def test_steps_on_a_meta_model_give_the_masks_shape(make, args):
    """A model on the meta device (shapes only) steps as under torch.ao.pruning: the mask keeps the weight's shape
    and the dtype the same step gives on the CPU (torch.ao.pruning's own mask dtypes are not followed anyway:
    ours keeps its float32 mask where torch.ao.pruning's logical_or makes it bool)."""
    def mask_after_steps(lib, device):
        model = META_MODULES[make](device)
        sparsifier = lib.WeightNormSparsifier(**args)
        sparsifier.prepare(model, [{"tensor_fqn": "weight"}])
        sparsifier.step()
        sparsifier.step()
        return model.parametrizations.weight[0].mask

    ours, on_cpu = mask_after_steps(sparsity_ext, "meta"), mask_after_steps(sparsity_ext, "cpu")
    assert ours.device.type == "meta"
    assert (ours.shape, ours.dtype) == (on_cpu.shape, on_cpu.dtype)
    if make == "linear":  # torch.ao.pruning cannot sparsify 4-D conv weights, on any device
        assert ours.shape == mask_after_steps(tao, "meta").shape


def test_bad_arguments_on_a_meta_model_still_raise():
    model = nn.Linear(32, 16, device="meta")
    sparsifier = sparsity_ext.WeightNormSparsifier(sparsity_level=0.5)
    with pytest.raises(ValueError, match="zeros_per_block"):
        sparsifier.prepare(model, [{"tensor_fqn": "weight", "zeros_per_block": 9}])
    sparsifier.prepare(model, [{"tensor_fqn": "weight"}])
    sparsifier.groups[0]["zeros_per_block"] = 9
    with pytest.raises(ValueError, match="zeros_per_block"):
        sparsifier.step()


def _keep_every_block(self, data, input_shape, sparsity_level, sparse_block_shape, mask=None):
    return torch.ones(data.shape, device=data.device)


def _drop_first_column(self, data, sparse_block_shape, zeros_per_block, mask=None):
    keep = torch.ones(data.shape, device=data.device)
    keep[:, 0] = 0
    return keep


@pytest.mark.parametrize("hooks", [{"_make_tensor_mask": _keep_every_block},
                                   {"_make_block_mask": _drop_first_column},
                                   {"_make_tensor_mask": _keep_every_block, "_make_block_mask": _drop_first_column}],
                         ids=["tensor", "block", "both"])
@pytest.mark.parametrize("accelerated", [False, True])
def test_overridden_mask_hooks_are_honoured_as_torch_ao_does(hooks, accelerated):
    """The mask hooks policy (WeightNormSparsifier docstring): a subclass overriding _make_tensor_mask or
    _make_block_mask gets the mask torch.ao.pruning composes from its hooks, in our class and in torch.ao's
    own class under accelerate_torch_ao()."""
    weight = tie_free((8, 16), seed=11)
    args = dict(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2)
    ours, _ = _sparsify(type("Ours", (sparsity_ext.WeightNormSparsifier,), hooks), weight, **args)
    ao_class = type("Theirs", (tao.WeightNormSparsifier,), hooks)
    if accelerated:
        with sparsity_ext.accelerate_torch_ao():
            theirs, _ = _sparsify(ao_class, weight, **args)
    else:
        theirs, _ = _sparsify(ao_class, weight, **args)
    plain, _ = _sparsify(sparsity_ext.WeightNormSparsifier, weight, **args)
    assert torch.equal(_mask(ours).bool(), _mask(theirs).bool())
    assert not torch.equal(_mask(ours).bool(), _mask(plain).bool())  # the hooks did change the mask
