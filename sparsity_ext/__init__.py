"""sparsity_ext: a kernel-accelerated, drop-in re-implementation of torch.ao.pruning.

Swap `torch.ao.pruning` for `sparsity_ext` in an import: same classes, arguments, state_dict layout
and masks; the hot mask computation runs in C++/CUDA/Triton kernels (see sparsity_ext.ops).
"""
from . import _extension  # noqa: F401  (loads the compiled kernels, or warns once)
from . import ops
from ._backend import current_backend, use_backend
from ._info import info
from ._mappings import get_dynamic_sparse_quantized_mapping, get_static_sparse_quantized_mapping
from .accelerate import accelerate_torch_ao, restore_torch_ao
from .checkpoint import load_checkpoint
from .scheduler import BaseScheduler, CubicSL, LambdaSL
from .sparsifier import (BaseSparsifier, FakeSparsity, NearlyDiagonalSparsifier, WeightNormSparsifier,
                         fqn_to_module, get_arg_info_from_tensor_fqn, module_to_fqn)

__all__ = ["ops", "load_checkpoint", "use_backend", "current_backend", "info", "accelerate_torch_ao", "restore_torch_ao",
           "BaseSparsifier", "WeightNormSparsifier", "NearlyDiagonalSparsifier", "FakeSparsity",
           "BaseScheduler", "LambdaSL", "CubicSL", "fqn_to_module", "module_to_fqn", "get_arg_info_from_tensor_fqn",
           "get_static_sparse_quantized_mapping", "get_dynamic_sparse_quantized_mapping"]
__version__ = "0.1.0"
