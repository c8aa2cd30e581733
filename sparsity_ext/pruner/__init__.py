"""Structured pruning: remove whole rows / channels (mirrors torch.ao.pruning._experimental.pruner)."""
from . import match_utils, prune_functions
from .base_structured_sparsifier import BaseStructuredSparsifier
from .FPGM_pruner import FPGMPruner
from .lstm_saliency_pruner import LSTMSaliencyPruner
from .parametrization import BiasHook, FakeStructuredSparsity
from .saliency_pruner import SaliencyPruner

__all__ = ["BaseStructuredSparsifier", "FakeStructuredSparsity", "BiasHook", "SaliencyPruner",
           "LSTMSaliencyPruner", "FPGMPruner", "prune_functions", "match_utils"]
