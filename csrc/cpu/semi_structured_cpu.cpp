// CPU kernel of sparsify_24_pack: fused 2:4 prune + pack into torch's semi-structured (CUTLASS) layout.
// Rows are read in place with their row stride (unit column stride), else from a contiguous copy.
// One task per band of rows; each metadata element (4 or 8 groups of 4) is pruned, packed and written to
// its reordered position by the shared math of common/semi_structured.h (the code the CUDA kernel runs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "common/op_args.h"
#include "common/semi_structured_args.h"

namespace sparsity_ext {
namespace {

constexpr int64_t kGrain = 1 << 16;  // dense elements per parallel task

template <typename T>
void sparsify_24_pack_rows(const T* data, int64_t ld, int64_t rows, int64_t cols, T* values,
                           typename MetaTraits<T>::meta_t* meta) {
  constexpr int kGroups = MetaTraits<T>::kGroupsPerMeta;
  const int64_t meta_cols = cols / (4 * kGroups);
  const int meta_bytes = static_cast<int>(sizeof(typename MetaTraits<T>::meta_t));
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = data + r * ld;
      T* row_values = values + r * (cols / 2);
      for (int64_t c = 0; c < meta_cols; ++c) {
        meta[meta_reordered_offset(r, c, rows, meta_bytes)] =
            prune_pack_meta_element(row + c * 4 * kGroups, row_values + c * 2 * kGroups);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparsify_24_pack_cpu(const at::Tensor& data) {
  check_sparsify_24_pack_args(data);
  const at::Tensor src = rows_readable_in_place(data) ? data : data.contiguous();
  auto [values, meta] = empty_semi_structured(src);
  SPX_DISPATCH_SEMI_STRUCTURED_TYPES(src.scalar_type(), "sparsify_24_pack_cpu", [&] {
    using T = typename Storage<scalar_t>::type;
    using meta_t = typename MetaTraits<T>::meta_t;
    sparsify_24_pack_rows<T>(reinterpret_cast<const T*>(src.data_ptr<scalar_t>()), row_stride(src), src.size(0),
                             src.size(1), reinterpret_cast<T*>(values.data_ptr<scalar_t>()),
                             reinterpret_cast<meta_t*>(meta.data_ptr()));
  });
  return {values, meta};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) { m.impl("sparsify_24_pack", &sparsify_24_pack_cpu); }

}  // namespace sparsity_ext
