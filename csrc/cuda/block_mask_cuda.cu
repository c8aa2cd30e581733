// CUDA entry points of block_norm_mask, block_norm_mask_apply_, nm_mask and select_threshold:
// argument checks, device guard, layouts; the kernel flow is cuda/block_mask_flow.h.
//
// Strided input: a unit column stride and any row stride >= cols are read in place; other layouts
// are copied to a contiguous buffer (and, for _apply_, copied back).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common/mask_math.h"
#include "common/op_args.h"
#include "cuda/block_mask_flow.h"
#include "cuda/launch.h"

namespace sparsity_ext {
namespace {

at::Tensor block_mask_cuda(const char* op, const at::Tensor& data, double sparsity_level, at::IntArrayRef block_shape,
                           int64_t zeros_per_block, int64_t norm, bool packed, bool apply) {
  TORCH_CHECK(data.is_cuda(), op, ": data must be a CUDA tensor, got ", data.device());
  const BlockGrid grid = check_block_mask_args(op, data, sparsity_level, block_shape, zeros_per_block, norm);
  const c10::cuda::OptionalCUDAGuard device_guard(data.device());
  at::Tensor work = rows_readable_in_place(data) ? data : data.contiguous();
  at::Tensor mask = empty_mask(data, packed);
  SPX_DISPATCH_SCORED_TYPES(data.scalar_type(), "block_mask_cuda", [&] {
    using T = typename Storage<scalar_t>::type;
    cuda::block_mask<T>(reinterpret_cast<T*>(work.data_ptr<scalar_t>()), row_stride(work), grid, sparsity_level,
                        zeros_per_block, static_cast<int>(norm), packed, apply, mask);
  });
  if (apply && !work.is_same(data)) data.copy_(work);
  return mask;
}

at::Tensor block_norm_mask_cuda(const at::Tensor& data, double sparsity_level, at::IntArrayRef block_shape,
                                int64_t zeros_per_block, int64_t norm, bool packed) {
  return block_mask_cuda("block_norm_mask", data, sparsity_level, block_shape, zeros_per_block, norm, packed, false);
}

at::Tensor block_norm_mask_apply__cuda(at::Tensor& data, double sparsity_level, at::IntArrayRef block_shape,
                                       int64_t zeros_per_block, int64_t norm, bool packed) {
  return block_mask_cuda("block_norm_mask_apply_", data, sparsity_level, block_shape, zeros_per_block, norm, packed,
                         true);
}

at::Tensor nm_mask_cuda(const at::Tensor& data, int64_t n, int64_t m) {
  check_nm_args(n, m);
  // N:M is the block contract with s = 1, blocks (1, m), m - n zeros per block, ranked by |x|.
  const int64_t block_shape[2] = {1, m};
  return block_mask_cuda("nm_mask", data, 1.0, block_shape, m - n, 1, false, false);
}

std::tuple<at::Tensor, at::Tensor> select_threshold_cuda(const at::Tensor& values, int64_t k) {
  TORCH_CHECK(values.is_cuda(), "select_threshold: values must be a CUDA tensor, got ", values.device());
  check_select_args(values, k);
  const c10::cuda::OptionalCUDAGuard device_guard(values.device());
  const at::Tensor contiguous = values.contiguous();
  std::pair<at::Tensor, at::Tensor> result;
  SPX_DISPATCH_SCORED_TYPES(values.scalar_type(), "select_threshold_cuda", [&] {
    using T = typename Storage<scalar_t>::type;
    result = cuda::select_kth(reinterpret_cast<const T*>(contiguous.data_ptr<scalar_t>()), values.numel(), k,
                              values.options());
  });
  // the k-th key is the key of an actual value, so converting back to the input dtype is exact
  return {result.first.to(values.scalar_type()), result.second};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CUDA, m) {
  m.impl("block_norm_mask", &block_norm_mask_cuda);
  m.impl("block_norm_mask_apply_", &block_norm_mask_apply__cuda);
  m.impl("nm_mask", &nm_mask_cuda);
  m.impl("select_threshold", &select_threshold_cuda);
}

}  // namespace sparsity_ext
