"""Sparsifiers and their mask parametrization (mirror torch.ao.pruning.sparsifier)."""
from .base_sparsifier import BaseSparsifier
from .nearly_diagonal_sparsifier import NearlyDiagonalSparsifier
from .utils import FakeSparsity, fqn_to_module, get_arg_info_from_tensor_fqn, module_to_fqn
from .weight_norm_sparsifier import WeightNormSparsifier

__all__ = ["BaseSparsifier", "WeightNormSparsifier", "NearlyDiagonalSparsifier", "FakeSparsity",
           "fqn_to_module", "module_to_fqn", "get_arg_info_from_tensor_fqn"]
