// Host-only argument checks and dtype dispatch shared by the CPU and CUDA launchers (torch code; the
// kernels' own math is in mask_math.h). Every check names the op and the argument, and runs before
// any kernel is launched.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>

#include "common/mask_math.h"

namespace sparsity_ext {

// The dtypes the scoring kernels read (fp64 is served by the reference only).
#define SPX_DISPATCH_SCORED_TYPES(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Storage type of a torch scalar type for the torch-free kernels.
template <typename scalar_t>
struct Storage {
  using type = scalar_t;
};
template <>
struct Storage<at::Half> {
  using type = half_storage;
};
template <>
struct Storage<at::BFloat16> {
  using type = bf16_storage;
};

inline void check_scored_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
}

// Checks the arguments of block_norm_mask(_apply_) / nm_mask and returns the block grid.
inline BlockGrid check_block_mask_args(const char* op, const at::Tensor& data, double sparsity_level,
                                       at::IntArrayRef block_shape, int64_t zeros_per_block, int64_t norm) {
  TORCH_CHECK(data.dim() == 2, op, ": data must be 2-D, got shape ", data.sizes());
  check_scored_dtype(op, "data", data);
  TORCH_CHECK(block_shape.size() == 2 && block_shape[0] >= 1 && block_shape[1] >= 1, op,
              ": block_shape must be two positive ints, got ", block_shape);
  TORCH_CHECK(zeros_per_block >= 0 && zeros_per_block <= block_shape[0] * block_shape[1], op,
              ": zeros_per_block must be in [0, ", block_shape[0] * block_shape[1], "], got ", zeros_per_block);
  TORCH_CHECK(norm >= 0 && norm <= 2, op, ": norm must be 0, 1 or 2, got ", norm);
  TORCH_CHECK(sparsity_level >= 0.0 && sparsity_level <= 1.0, op, ": sparsity_level must be in [0, 1], got ",
              sparsity_level);
  const BlockGrid grid = make_block_grid(data.size(0), data.size(1), block_shape[0], block_shape[1]);
  // positions inside a block are packed into 32 bits next to the key (cut_key)
  TORCH_CHECK(std::min(grid.block_rows, grid.rows) * std::min(grid.block_cols, grid.cols) < (int64_t{1} << 32), op,
              ": a block may cover at most 2^32 - 1 elements of data, got block_shape ", block_shape);
  return grid;
}

// The per-block scores given to block_norm_mask_select: fp32 (block_scores' output), one per block.
inline void check_block_scores_arg(const char* op, const at::Tensor& scores, const BlockGrid& grid) {
  TORCH_CHECK(scores.dim() == 1 && scores.scalar_type() == at::kFloat, op,
              ": scores must be a 1-D float32 tensor, got ", scores.scalar_type(), " of shape ", scores.sizes());
  TORCH_CHECK(scores.numel() == grid.num_blocks(), op, ": scores must hold one value per block (",
              grid.num_blocks(), "), got ", scores.numel());
}

// The mask block_norm_mask_update_ scores data with and rewrites: data's shape, bool, float32 or data's dtype.
inline void check_update_mask_arg(const char* op, const at::Tensor& data, const at::Tensor& mask) {
  TORCH_CHECK(mask.sizes() == data.sizes(), op, ": mask shape ", mask.sizes(), " != data shape ", data.sizes());
  const auto dtype = mask.scalar_type();
  TORCH_CHECK(dtype == at::kBool || dtype == at::kFloat || dtype == data.scalar_type(), op,
              ": mask must be bool, float32 or data's dtype (", data.scalar_type(), "), got ", dtype);
}

// A mask argument in one of the two mask formats: bool of data's shape, or packed bits (uint8, 1-D,
// ceil(numel/8) bytes). Returns whether it is packed.
inline bool check_mask_format_arg(const char* op, const at::Tensor& data, const at::Tensor& mask) {
  if (mask.scalar_type() == at::kBool) {
    TORCH_CHECK(mask.sizes() == data.sizes(), op, ": mask shape ", mask.sizes(), " != data shape ", data.sizes());
    return false;
  }
  TORCH_CHECK(mask.scalar_type() == at::kByte, op, ": mask must be bool or packed uint8, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 1 && mask.numel() == (data.numel() + 7) / 8, op, ": a packed mask for data of shape ",
              data.sizes(), " must be 1-D with ", (data.numel() + 7) / 8, " bytes, got shape ", mask.sizes());
  return true;
}

inline void check_nm_args(int64_t n, int64_t m) {
  TORCH_CHECK(m >= 1 && n >= 0 && n <= m, "nm_mask: need m >= 1 and 0 <= n <= m, got n=", n, ", m=", m);
}

inline void check_select_args(const at::Tensor& values, int64_t k) {
  TORCH_CHECK(values.dim() == 1, "select_threshold: values must be 1-D, got shape ", values.sizes());
  check_scored_dtype("select_threshold", "values", values);
  TORCH_CHECK(k >= 1 && k <= values.numel(), "select_threshold: k must be in [1, ", values.numel(), "], got ", k);
}

// Whether a 2-D tensor can be read in place as rows with a row stride: unit column stride and rows
// that do not overlap. Other layouts are copied to a contiguous buffer first.
inline bool rows_readable_in_place(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
}

inline int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

// An all-keep mask: every bool true, or every bit of the numel elements set (padding bits stay 0).
inline void fill_ones(at::Tensor& mask, bool packed, int64_t numel) {
  if (!packed) {
    mask.fill_(true);
    return;
  }
  mask.fill_(0xFF);
  if (numel % 8 != 0) mask.narrow(0, mask.numel() - 1, 1).fill_(static_cast<int64_t>((1u << (numel % 8)) - 1u));
}

inline at::Tensor empty_mask(const at::Tensor& data, bool packed) {
  return packed ? at::empty({(data.numel() + 7) / 8}, data.options().dtype(at::kByte))
                : at::empty(data.sizes(), data.options().dtype(at::kBool));
}

}  // namespace sparsity_ext
