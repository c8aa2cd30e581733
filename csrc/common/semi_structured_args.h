// Host-side argument checks and dtype dispatch of sparsify_24_pack, shared by the CPU and CUDA launchers.
// The Python wrapper (sparsity_ext/semi_structured/_layout.py check_dense) raises the same conditions as
// TypeError / ValueError before any kernel runs; these guard direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "common/semi_structured.h"

namespace sparsity_ext {

#define SPX_DISPATCH_SEMI_STRUCTURED_TYPES(TYPE, NAME, ...)    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kChar, __VA_ARGS__))

// torch's SparseSemiStructuredTensorCUTLASS shape constraints: (row multiple, column multiple).
inline void check_sparsify_24_pack_args(const at::Tensor& data) {
  const auto dtype = data.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kChar,
              "sparsify_24_pack: data must be float16, bfloat16 or int8, got ", dtype);
  TORCH_CHECK(data.dim() == 2, "sparsify_24_pack: data must be 2-D, got shape ", data.sizes());
  const int64_t row_multiple = dtype == at::kChar ? 16 : 32, col_multiple = dtype == at::kChar ? 128 : 64;
  TORCH_CHECK(data.size(0) >= row_multiple && data.size(0) % row_multiple == 0 && data.size(1) >= col_multiple &&
                  data.size(1) % col_multiple == 0,
              "sparsify_24_pack: a ", dtype, " tensor needs rows a positive multiple of ", row_multiple,
              " and cols a positive multiple of ", col_multiple, ", got shape ", data.sizes());
}

// (values, metadata) outputs of sparsify_24_pack for `data` (checked).
inline std::tuple<at::Tensor, at::Tensor> empty_semi_structured(const at::Tensor& data) {
  const bool wide_meta = data.scalar_type() == at::kChar;
  const int64_t dense_cols_per_meta =
      4 * (wide_meta ? MetaTraits<int8_t>::kGroupsPerMeta : MetaTraits<half_storage>::kGroupsPerMeta);
  at::Tensor values = at::empty({data.size(0), data.size(1) / 2}, data.options());
  at::Tensor meta = at::empty({data.size(0), data.size(1) / dense_cols_per_meta},
                              data.options().dtype(wide_meta ? at::kInt : at::kShort));
  return {values, meta};
}

}  // namespace sparsity_ext
