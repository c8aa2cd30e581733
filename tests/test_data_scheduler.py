"""BaseDataScheduler: the behaviours torch.ao.pruning's data-scheduler tests check, and side by side with it."""
import pickle
import warnings

import pytest
import torch
from torch import nn

from sparsity_ext.data_scheduler import BaseDataScheduler
from sparsity_ext.data_sparsifier import DataNormSparsifier

torch_ao_scheduler = pytest.importorskip("torch.ao.pruning._experimental.data_scheduler")
torch_ao_sparsifier = pytest.importorskip("torch.ao.pruning._experimental.data_sparsifier")


def _halving(base):
    class Halving(base):
        """Halves each sparsity_level from the second step on."""

        def get_schedule_param(self):
            assert self._get_sp_called_within_step
            if self.last_epoch > 0:
                return {name: config["sparsity_level"] * 0.5 for name, config in self.data_sparsifier.data_groups.items()}
            return self.base_param
    return Halving


HalvingScheduler = _halving(BaseDataScheduler)
DEFAULTS = {"sparsity_level": 0.7, "sparse_block_shape": (1, 4), "zeros_per_block": 2}


def _data():
    data_list = [("tensor1", torch.randn(5, 5)), ("param1", nn.Parameter(torch.randn(10, 10))),
                 ("emb1", nn.Embedding(50, 5))]
    with_config = [("tensor2", torch.randn(4, 4), {"sparsity_level": 0.3})]
    return data_list, with_config


def _sparsifier(cls=DataNormSparsifier, **kwargs):
    data_list, with_config = _data()
    sparsifier = cls(data_list, **DEFAULTS, **kwargs)
    for name, data, config in with_config:
        sparsifier.add_data(name, data, **config)
    return sparsifier


def _expected_levels():
    return {"tensor1": 0.7, "param1": 0.7, "emb1": 0.7, "tensor2": 0.3}


def test_constructor():
    sparsifier = _sparsifier()
    scheduler = HalvingScheduler(sparsifier, "sparsity_level")
    assert scheduler.data_sparsifier is sparsifier
    assert scheduler._step_count == 1 and scheduler.last_epoch == 0
    assert scheduler.base_param == _expected_levels()
    assert scheduler.get_last_param() == _expected_levels()
    assert not scheduler._get_sp_called_within_step
    assert sparsifier._step_count == 0 and sparsifier.step._with_counter


def test_constructor_rejects_other_objects():
    with pytest.raises(TypeError, match="BaseDataSparsifier"):
        HalvingScheduler(object(), "sparsity_level")
    with pytest.raises(TypeError, match="BaseDataSparsifier"):  # torch.ao.pruning's own sparsifier is not ours
        HalvingScheduler(torch_ao_sparsifier.DataNormSparsifier(), "sparsity_level")


def test_order_of_steps():
    sparsifier = _sparsifier()
    scheduler = HalvingScheduler(sparsifier, "sparsity_level")
    with pytest.warns(UserWarning, match="before data_sparsifier.step"):
        scheduler.step()

    sparsifier = _sparsifier()
    scheduler = HalvingScheduler(sparsifier, "sparsity_level")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right order warns about nothing
        sparsifier.step()
        scheduler.step()
    assert sparsifier._step_count == 1

    sparsifier = _sparsifier()
    scheduler = HalvingScheduler(sparsifier, "sparsity_level")
    sparsifier.step = lambda: None  # replaced after the scheduler wrapped it
    with pytest.warns(UserWarning, match="replaced"):
        scheduler.step()


def test_step_updates_the_configs_and_enables_mask_update():
    sparsifier = _sparsifier()
    scheduler = HalvingScheduler(sparsifier, "sparsity_level")
    assert {n: c["sparsity_level"] for n, c in sparsifier.data_groups.items()} == _expected_levels()
    sparsifier.step()
    sparsifier.enable_mask_update = False
    scheduler.step()
    assert sparsifier.enable_mask_update
    halved = {name: level * 0.5 for name, level in _expected_levels().items()}
    assert {n: c["sparsity_level"] for n, c in sparsifier.data_groups.items()} == halved
    assert scheduler.get_last_param() == halved and scheduler.last_epoch == 1
    sparsifier.step()  # the new level is used
    keep = sparsifier.get_mask("param1", as_bool=True)
    # 10x10 in (1, 4) blocks: 30 blocks; 2 zeroed in each of round(0.35 * 30) = 10 of them
    assert int((~keep).sum()) == 2 * round(0.35 * 30)


def test_two_schedulers_share_one_step_counter():
    sparsifier = _sparsifier()
    HalvingScheduler(sparsifier, "sparsity_level")
    wrapped = sparsifier.step
    HalvingScheduler(sparsifier, "zeros_per_block")
    assert sparsifier.step is wrapped
    sparsifier.step()
    assert sparsifier._step_count == 1


def test_state_dict():
    sparsifier = _sparsifier()
    scheduler1 = HalvingScheduler(sparsifier, "sparsity_level")
    sparsifier.step()
    scheduler1.step()
    scheduler2 = HalvingScheduler(sparsifier, "sparsity_level")
    for name in _expected_levels():
        assert scheduler1.base_param[name] != scheduler2.base_param[name]
        assert scheduler1._last_param[name] == scheduler2.base_param[name]
    state = scheduler1.state_dict()
    assert "data_sparsifier" not in state
    scheduler2.load_state_dict(state)
    assert scheduler2.data_sparsifier is sparsifier
    for name in _expected_levels():
        assert scheduler1.base_param[name] == scheduler2.base_param[name]
        assert scheduler1._last_param[name] == scheduler2._last_param[name]
    assert scheduler2.last_epoch == scheduler1.last_epoch and scheduler2._step_count == scheduler1._step_count


def test_verbose_and_repr(capsys):
    sparsifier = _sparsifier()
    scheduler = HalvingScheduler(sparsifier, "sparsity_level", verbose=True)
    assert "Adjusting sparsity_level for group tensor2 to 0.3" in capsys.readouterr().out
    text = repr(scheduler)
    assert text.startswith("Halving (") and "Data Sparsifier DataNormSparsifier (" in text
    assert "sparsity_level: {'tensor1': 0.7" in text


def test_sparsifier_pickles_after_being_wrapped():
    sparsifier = _sparsifier(mask_dtype="packed")
    HalvingScheduler(sparsifier, "sparsity_level")
    sparsifier.step()
    restored = pickle.loads(pickle.dumps(sparsifier))
    assert "step" not in restored.__dict__ and restored._step_count == 1
    restored.step()
    for name in _expected_levels():
        assert torch.equal(restored.get_mask(name), sparsifier.get_mask(name))


def test_same_schedule_as_torch_ao():
    TorchHalving = _halving(torch_ao_scheduler.BaseDataScheduler)
    ours, theirs = _sparsifier(), _sparsifier(torch_ao_sparsifier.DataNormSparsifier)
    ours_scheduler, theirs_scheduler = HalvingScheduler(ours, "sparsity_level"), TorchHalving(theirs, "sparsity_level")
    for _ in range(3):
        ours.step()
        theirs.step()
        ours_scheduler.step()
        theirs_scheduler.step()
        assert ours.data_groups == theirs.data_groups
        assert ours_scheduler.get_last_param() == theirs_scheduler.get_last_param()
        assert ours_scheduler.last_epoch == theirs_scheduler.last_epoch
        assert ours._step_count == theirs._step_count
    assert set(ours_scheduler.state_dict()) == set(theirs_scheduler.state_dict())
