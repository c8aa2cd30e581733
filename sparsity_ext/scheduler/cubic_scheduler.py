"""CubicSL: the cubic sparsity ramp of Zhu & Gupta (https://arxiv.org/abs/1710.01878). Mirrors
torch.ao.pruning.CubicSL."""
from __future__ import annotations


from .base_scheduler import BaseScheduler, check_sparsifier

__all__ = ["CubicSL"]


def _clamp(x, lo, hi):
    return max(lo, min(hi, x))


class CubicSL(BaseScheduler):
    """Ramps each group's sparsity level from init_sl to its final level (the group's sparsity_level when the
    scheduler is created) along a cubic:

        s_t = s_f + (s_0 - s_f) * (1 - (t - t_0) / (delta_t * total_t)) ** 3, clamped to [s_0, s_f].

    Args:
        sparsifier: the scheduled sparsifier.
        init_sl: initial sparsity level s_0.
        init_t: step t_0 at which pruning starts.
        delta_t: pruning frequency.
        total_t: number of pruning steps.
        initially_zero: sparsity 0 (instead of s_0) before t_0.
        last_epoch: index of the last epoch. Default: -1.
        verbose: print each update. Default: False.
    Each of init_sl .. initially_zero is one value for every group or a list with one per group.
    """

    def __init__(self, sparsifier, init_sl=0.0, init_t=0, delta_t=10, total_t=100, initially_zero=False,
                 last_epoch=-1, verbose=False):
        check_sparsifier(sparsifier)  # before its groups are read
        self.sparsifier = sparsifier
        self.init_sl = self._make_sure_a_list(init_sl)
        self.init_t = self._make_sure_a_list(init_t)
        self.delta_t = self._make_sure_a_list(delta_t)
        self.total_t = self._make_sure_a_list(total_t)
        self.initially_zero = self._make_sure_a_list(initially_zero)
        super().__init__(sparsifier, last_epoch, verbose)

    @staticmethod
    def sparsity_compute_fn(s_0, s_f, t, t_0, dt, n, initially_zero=False):
        """The sparsity level at step t (see the class docstring); 0 before t_0 when initially_zero."""
        if initially_zero and t < t_0:
            return 0
        s_t = s_f + (s_0 - s_f) * (1.0 - (t - t_0) / (dt * n)) ** 3
        return _clamp(s_t, s_0, s_f)

    def get_sl(self):
        self._warn_unless_within_step()
        return [self.sparsity_compute_fn(s_0=s_0, s_f=s_f, t=self.last_epoch, t_0=t_0, dt=dt, n=n,
                                         initially_zero=zero)
                for s_0, s_f, t_0, dt, n, zero in zip(self.init_sl, self.base_sl, self.init_t, self.delta_t,
                                                      self.total_t, self.initially_zero)]
