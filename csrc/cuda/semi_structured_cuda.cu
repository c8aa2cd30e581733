// CUDA entry point of sparsify_24_pack: checks, device guard, layout; the kernel is cuda/semi_structured.cuh.
// Input rows are read in place when they are 16-byte aligned (unit column stride, aligned base and row
// stride); any other layout is first copied to an aligned contiguous buffer.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common/op_args.h"
#include "common/semi_structured_args.h"
#include "cuda/launch.h"
#include "cuda/semi_structured.cuh"

namespace sparsity_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> sparsify_24_pack_cuda(const at::Tensor& data) {
  TORCH_CHECK(data.is_cuda(), "sparsify_24_pack: data must be a CUDA tensor, got ", data.device());
  check_sparsify_24_pack_args(data);
  const c10::cuda::OptionalCUDAGuard device_guard(data.device());
  const int64_t elem = data.element_size();
  const auto readable = [&](const at::Tensor& t) {
    return rows_readable_in_place(t) && cuda::aligned(t.data_ptr(), 16) && (row_stride(t) * elem) % 16 == 0;
  };
  at::Tensor src = readable(data) ? data : data.contiguous();
  if (!readable(src)) src = src.clone();  // a contiguous view at an unaligned offset
  auto [values, meta] = empty_semi_structured(src);
  const int64_t rows = src.size(0), cols = src.size(1);
  SPX_DISPATCH_SEMI_STRUCTURED_TYPES(src.scalar_type(), "sparsify_24_pack_cuda", [&] {
    using T = typename Storage<scalar_t>::type;
    using meta_t = typename MetaTraits<T>::meta_t;
    const int64_t threads = rows * (cols / (4 * MetaTraits<T>::kGroupsPerMeta));
    const auto kernel = cuda::sparsify_24_pack_kernel<T>;
    cuda::launch(kernel, cuda::grid_for(kernel, threads), cuda::current_stream(),
                 reinterpret_cast<const T*>(src.data_ptr<scalar_t>()), row_stride(src), rows, cols,
                 reinterpret_cast<T*>(values.data_ptr<scalar_t>()), reinterpret_cast<meta_t*>(meta.data_ptr()));
  });
  return {values, meta};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CUDA, m) { m.impl("sparsify_24_pack", &sparsify_24_pack_cuda); }

}  // namespace sparsity_ext
