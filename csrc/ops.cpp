// The one place where every sparsity_ext op is declared. Backends register their kernels beside
// the kernels themselves (csrc/cpu/*.cpp: TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m); csrc/cuda/*.cu:
// TORCH_LIBRARY_IMPL(sparsity_ext, CUDA, m)); fake (meta) impls live in sparsity_ext/_fake.py.
// The contract of each op is docs/design.md's "Mask semantics"; sparsity_ext/reference.py is its oracle.
#include <torch/library.h>

// Importing sparsity_ext._C only has to run the static registrations below; no per-op Python glue.
// C++-only builds (CMake option SPARSITY_EXT_PYTHON_MODULE=OFF) leave the module stub out.
#ifndef SPARSITY_EXT_NO_PYTHON_MODULE
#include <Python.h>
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(sparsity_ext, m) {
  // data: 2-D floating tensor (the Python wrapper views 1-D data as one row). norm: 0 identity,
  // 1 |x|, 2 x*x. Returns a bool mask of data's shape, or (packed=True) uint8 bits, 1 bit per element.
  m.def("block_norm_mask(Tensor data, float sparsity_level, int[] block_shape, int zeros_per_block, "
        "int norm, bool packed=False) -> Tensor");
  // Same mask, and data is zeroed where the mask is 0 in the same pass.
  m.def("block_norm_mask_apply_(Tensor(a!) data, float sparsity_level, int[] block_shape, "
        "int zeros_per_block, int norm, bool packed=False) -> Tensor");
  // Keep the n largest |x| of every m consecutive elements along the last dim of a 2-D tensor.
  m.def("nm_mask(Tensor data, int n, int m) -> Tensor");
  // The two halves of block_norm_mask, for a selection made across chunks, shards or tensors:
  // block_scores is the mean norm of every block (fp32, row-major over blocks; the values the mask
  // ops rank), and block_norm_mask_select writes the mask of the blocks a threshold selects: those
  // scoring below it plus the first `ties` (by index) scoring equal to it (NaN ranks above every
  // number and equals NaN) — select_threshold(scores, k) gives (threshold, ties) of the k smallest.
  m.def("block_scores(Tensor data, int[] block_shape, int norm) -> Tensor");
  m.def("block_norm_mask_select(Tensor data, Tensor scores, float threshold, int ties, int[] block_shape, "
        "int zeros_per_block, int norm, bool packed=False) -> Tensor");
  // A sparsifier's mask update in one op: mask = block_norm_mask(mask * data, ...) written into mask
  // (bool, float32 or data's dtype; 1 keep, 0 drop), without materializing mask * data.
  m.def("block_norm_mask_update_(Tensor data, Tensor(a!) mask, float sparsity_level, int[] block_shape, "
        "int zeros_per_block, int norm) -> ()");
  // block_norm_mask written into a given mask instead of a new one: bool of data's shape, or packed
  // uint8 bits (1-D, ceil(numel/8) bytes), contiguous. Reuses a mask's memory across steps.
  m.def("block_norm_mask_into_(Tensor data, Tensor(a!) mask, float sparsity_level, int[] block_shape, "
        "int zeros_per_block, int norm) -> ()");
  // k-th smallest (1-based) of a 1-D float tensor, NaN largest; returns (value, tie_rank): the k
  // smallest are every x < value plus the first tie_rank elements equal to value, by index.
  m.def("select_threshold(Tensor values, int k) -> (Tensor, Tensor)");
  // data[i] = 0 where mask[i] is false; mask is bool of data's shape or packed uint8 bits. Returns
  // nothing: torch.compile cannot functionalize a custom op whose output aliases an input.
  m.def("apply_mask_(Tensor(a!) data, Tensor mask) -> ()");
  // bool mask (any shape) -> uint8[ceil(numel/8)], row-major, bit i of byte j = element 8j+i.
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor packed, int[] shape) -> Tensor");
  // Fused 2:4 prune (the 2 largest |x| of every 4 consecutive elements of a row, as nm_mask(data, 2, 4))
  // and pack into torch's SparseSemiStructuredTensorCUTLASS layout: values (rows, cols/2) of data's
  // dtype and reordered metadata (int16, or int32 for int8). csrc/common/semi_structured.h: the layout.
  m.def("sparsify_24_pack(Tensor data) -> (Tensor, Tensor)");
}
