"""Sparsity-level schedulers (LambdaSL, CubicSL, BaseScheduler) against torch.ao.pruning's."""
import warnings

import pytest
import torch
from torch import nn
from torch.ao import pruning as tao

import sparsity_ext

from conftest import tie_free


def _prepared(cls=sparsity_ext.WeightNormSparsifier, levels=(0.5,), **kwargs):
    """A sparsifier prepared on a model with one 16x16 Linear per entry of `levels`."""
    model = nn.Sequential(*(nn.Linear(16, 16) for _ in levels))
    with torch.no_grad():
        for i, layer in enumerate(model):
            layer.weight.copy_(tie_free((16, 16), seed=i))
    sparsifier = cls(**kwargs)
    sparsifier.prepare(model, [{"tensor_fqn": f"{i}.weight", "sparsity_level": lvl} for i, lvl in enumerate(levels)])
    return model, sparsifier


def _levels(sparsifier):
    return [group["sparsity_level"] for group in sparsifier.groups]


def test_lambda_scheduler_scales_the_base_level():
    _, sparsifier = _prepared()
    scheduler = sparsity_ext.LambdaSL(sparsifier, lambda epoch: epoch * 10)
    assert scheduler.base_sl == [0.5]
    assert _levels(sparsifier) == [0.0] and scheduler.last_epoch == 0  # the constructor's step: epoch 0
    sparsifier.step()
    scheduler.step()
    assert _levels(sparsifier) == [5.0] and scheduler.get_last_sl() == [5.0] and scheduler.last_epoch == 1


def test_lambda_scheduler_takes_one_function_per_group():
    _, sparsifier = _prepared(levels=(0.5, 0.8))
    scheduler = sparsity_ext.LambdaSL(sparsifier, [lambda e: 1.0, lambda e: 0.5 ** e])
    for epoch in range(1, 4):
        sparsifier.step()
        scheduler.step()
        assert _levels(sparsifier) == [0.5, 0.8 * 0.5 ** epoch]
    with pytest.raises(ValueError, match="Expected 2"):
        sparsity_ext.LambdaSL(sparsifier, [lambda e: 1.0])


@pytest.mark.parametrize("scheduler_kind", ["lambda", "cubic"])
def test_schedules_equal_torch_ao(scheduler_kind):
    """Our scheduler over our sparsifier and torch.ao's over torch.ao's: same levels, same masks, every step."""
    runs = []
    for lib in (sparsity_ext, tao):
        model, sparsifier = _prepared(lib.WeightNormSparsifier, levels=(0.6, 0.9), sparse_block_shape=(2, 2))
        if scheduler_kind == "lambda":
            scheduler = lib.LambdaSL(sparsifier, lambda epoch: min(1.0, 0.25 * epoch))
        else:
            scheduler = lib.CubicSL(sparsifier, init_sl=0.1, init_t=2, delta_t=2, total_t=3,
                                    initially_zero=[True, False])
        runs.append((model, sparsifier, scheduler))
    for _ in range(10):
        for model, sparsifier, scheduler in runs:
            sparsifier.step()
            scheduler.step()
        (ours_model, ours, ours_scheduler), (theirs_model, theirs, theirs_scheduler) = runs
        assert _levels(ours) == _levels(theirs) and ours_scheduler.get_last_sl() == theirs_scheduler.get_last_sl()
        for ours_layer, theirs_layer in zip(ours_model, theirs_model):
            assert torch.equal(ours_layer.parametrizations.weight[0].mask.bool(),
                               theirs_layer.parametrizations.weight[0].mask.bool())


def _cubic(s_0, s_f, t, t_0, dt, n):
    """The cubic ramp of Zhu & Gupta, written out: s_f + (s_0 - s_f)(1 - (t - t_0)/(n dt))^3 within [s_0, s_f]."""
    progress = (t - t_0) / (n * dt)
    return min(s_f, max(s_0, s_f + (s_0 - s_f) * (1 - progress) ** 3))


@pytest.mark.parametrize("t", [-5, 0, 1, 7, 10, 25, 50, 99, 100, 101, 1000])
@pytest.mark.parametrize("s_0,s_f,t_0,dt,n", [(0.0, 0.9, 0, 10, 10), (0.2, 0.8, 5, 3, 7), (0.1, 0.1, 0, 1, 1)])
def test_cubic_sparsity_compute_fn(t, s_0, s_f, t_0, dt, n):
    ours = sparsity_ext.CubicSL.sparsity_compute_fn(s_0, s_f, t, t_0, dt, n)
    assert ours == pytest.approx(_cubic(s_0, s_f, t, t_0, dt, n), abs=1e-12)
    assert ours == tao.CubicSL.sparsity_compute_fn(s_0, s_f, t, t_0, dt, n)
    assert s_0 <= ours <= s_f
    zero_first = sparsity_ext.CubicSL.sparsity_compute_fn(s_0, s_f, t, t_0, dt, n, initially_zero=True)
    assert zero_first == (0 if t < t_0 else ours)


def test_cubic_scheduler_ramps_to_the_final_level():
    _, sparsifier = _prepared(levels=(0.8,))
    scheduler = sparsity_ext.CubicSL(sparsifier, init_sl=0.2, init_t=0, delta_t=2, total_t=5)
    seen = [scheduler.get_last_sl()[0]]
    for _ in range(12):
        sparsifier.step()
        scheduler.step()
        seen.append(scheduler.get_last_sl()[0])
    assert seen[0] == pytest.approx(0.2) and seen[-1] == pytest.approx(0.8)
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    assert seen == pytest.approx([_cubic(0.2, 0.8, t, 0, 2, 5) for t in range(13)])


def test_cubic_scheduler_per_group_arguments():
    _, sparsifier = _prepared(levels=(0.5, 0.9))
    scheduler = sparsity_ext.CubicSL(sparsifier, init_sl=[0.0, 0.3], init_t=[0, 4], delta_t=1, total_t=[4, 8],
                                     initially_zero=[False, True])
    assert scheduler.init_sl == [0.0, 0.3] and scheduler.delta_t == [1, 1] and scheduler.initially_zero == [False, True]
    assert _levels(sparsifier) == [0.0, 0]  # group 1 is zero before its init_t
    with pytest.raises(ValueError, match="length 2"):
        sparsity_ext.CubicSL(sparsifier, init_sl=[0.0, 0.1, 0.2])


def test_step_order_warnings():
    _, sparsifier = _prepared()
    scheduler = sparsity_ext.LambdaSL(sparsifier, lambda e: 1.0)
    with pytest.warns(UserWarning, match="before `sparsifier.step\\(\\)`"):
        scheduler.step()  # the scheduler's first step, with no sparsifier step yet

    _, sparsifier = _prepared()
    scheduler = sparsity_ext.LambdaSL(sparsifier, lambda e: 1.0)
    sparsifier.step = lambda: None  # replaced after the scheduler wrapped it
    with pytest.warns(UserWarning, match="replaced"):
        scheduler.step()

    _, sparsifier = _prepared()
    scheduler = sparsity_ext.LambdaSL(sparsifier, lambda e: 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            sparsifier.step()
            scheduler.step()
    assert sparsifier._step_count == 3 and scheduler._step_count == 4  # the constructor stepped once

    with pytest.warns(UserWarning, match="get_last_sl"):
        scheduler.get_sl()


def test_wrapping_sparsifier_step_twice_counts_once():
    _, sparsifier = _prepared()
    first = sparsity_ext.LambdaSL(sparsifier, lambda e: 1.0)
    wrapped = sparsifier.step
    second = sparsity_ext.LambdaSL(sparsifier, lambda e: 0.5)
    assert sparsifier.step is wrapped and first.sparsifier is second.sparsifier
    sparsifier.step()
    assert sparsifier._step_count == 1


def test_scheduler_step_reenables_mask_updates():
    model, sparsifier = _prepared()
    scheduler = sparsity_ext.LambdaSL(sparsifier, lambda epoch: 1.0)
    sparsifier.enable_mask_update = False
    sparsifier.step()
    assert bool(model[0].parametrizations.weight[0].mask.all())  # disabled: nothing happened
    scheduler.step()
    assert sparsifier.enable_mask_update
    sparsifier.step()
    assert model[0].parametrizations.weight[0].mask.mean() == 0.5


def test_scheduler_state_dict_round_trip():
    _, sparsifier = _prepared()
    scheduler = sparsity_ext.CubicSL(sparsifier, init_sl=0.1, delta_t=1, total_t=5)
    for _ in range(3):
        sparsifier.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert "sparsifier" not in state and state["last_epoch"] == 3 and state["base_sl"] == [0.5]
    _, other_sparsifier = _prepared()
    other = sparsity_ext.CubicSL(other_sparsifier, init_sl=0.3)
    other.load_state_dict(state)
    assert other.last_epoch == 3 and other.init_sl == [0.1] and other.get_last_sl() == scheduler.get_last_sl()
    other_sparsifier.step()
    other.step()
    scheduler.step()
    assert other.get_last_sl() == scheduler.get_last_sl()


def test_verbose_prints_and_repr(capsys):
    _, sparsifier = _prepared()
    scheduler = sparsity_ext.LambdaSL(sparsifier, lambda e: 0.5, verbose=True)
    sparsifier.step()
    scheduler.step(epoch=7)
    out = capsys.readouterr().out
    assert "Adjusting sparsity level of group 0 to 2.5000e-01." in out
    assert "Epoch     7: adjusting sparsity level of group 0 to 2.5000e-01." in out
    assert repr(scheduler).startswith("LambdaSL (\nSparsifier WeightNormSparsifier (")
    assert "base_sl: [0.5]" in repr(scheduler)


def test_scheduler_needs_a_sparsifier_and_drives_torch_ao_ones_too():
    with pytest.raises(TypeError, match="BaseSparsifier"):
        sparsity_ext.LambdaSL(object(), lambda e: 1.0)
    model, sparsifier = _prepared(tao.WeightNormSparsifier)
    scheduler = sparsity_ext.LambdaSL(sparsifier, lambda epoch: 0.5 * epoch)
    sparsifier.step()
    scheduler.step()
    sparsifier.step()
    assert _levels(sparsifier) == [0.25] and model[0].parametrizations.weight[0].mask.mean() == 0.75


def test_scheduler_subclass_written_for_torch_ao_runs_unchanged():
    """A scheduler in torch.ao.pruning's style: reads base_sl, last_epoch, _get_sl_called_within_step and
    the sparsifier's groups, and uses _make_sure_a_list."""

    class StepSL(sparsity_ext.BaseScheduler):
        def __init__(self, sparsifier, every=2, factor=0.5, last_epoch=-1, verbose=False):
            self.sparsifier = sparsifier
            self.every = self._make_sure_a_list(every)
            self.factor = factor
            super().__init__(sparsifier, last_epoch, verbose)

        def get_sl(self):
            assert self._get_sl_called_within_step
            return [base * (1 - self.factor ** (1 + self.last_epoch // every))
                    for base, every in zip(self.base_sl, self.every)]

    model, sparsifier = _prepared(levels=(0.8, 0.4))
    scheduler = StepSL(sparsifier, every=[1, 2])
    history = []
    for _ in range(4):
        sparsifier.step()
        scheduler.step()
        history.append(_levels(sparsifier))
    assert history == [[0.8 * 0.75, 0.4 * 0.5], [0.8 * 0.875, 0.4 * 0.75], [0.8 * 0.9375, 0.4 * 0.75],
                       [0.8 * 0.96875, 0.4 * 0.875]]
    assert scheduler._step_count == 5 and sparsifier._step_count == 4


def test_scheduler_drives_a_custom_sparsifier_subclass():
    """A BaseSparsifier subclass with its own update_mask, driven by a scheduler through the groups."""

    class TopRowsSparsifier(sparsity_ext.BaseSparsifier):
        def update_mask(self, module, tensor_name, sparsity_level, **kwargs):
            mask = getattr(module.parametrizations, tensor_name)[0].mask
            mask.fill_(1)
            mask[: round(sparsity_level * mask.shape[0])] = 0

    model = nn.Sequential(nn.Linear(4, 10))
    sparsifier = TopRowsSparsifier(defaults={"sparsity_level": 0.6})
    sparsifier.prepare(model, None)
    scheduler = sparsity_ext.LambdaSL(sparsifier, lambda epoch: epoch / 3)
    rows = []
    for _ in range(3):
        sparsifier.step()
        scheduler.step()
        sparsifier.step()
        rows.append(int((~model[0].parametrizations.weight[0].mask.bool().any(dim=1)).sum()))
    assert rows == [2, 4, 6]
