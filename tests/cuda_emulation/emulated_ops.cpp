// The CUDA kernels and host flow of csrc/cuda (block_mask_flow.h, mask_kernels.cuh,
// mask_format_kernels.cuh) compiled for the CPU emulation of cuda_runtime.h here, as a Python module for
// tests/test_cuda_emulation.py. The entry points mirror csrc/cuda/*.cu on CPU tensors.
#include <torch/extension.h>

#include "common/op_args.h"
#include "cuda/block_mask_flow.h"
#include "cuda/mask_format_kernels.cuh"

namespace sparsity_ext {
namespace {

at::Tensor block_mask(at::Tensor data, double sparsity_level, std::vector<int64_t> block_shape, int64_t zeros_per_block,
                      int64_t norm, bool packed, bool apply, int64_t max_ctas) {
  cuda::emulated_max_ctas = max_ctas;
  const BlockGrid grid = check_block_mask_args("emulated", data, sparsity_level, block_shape, zeros_per_block, norm);
  at::Tensor work = rows_readable_in_place(data) ? data : data.contiguous();
  at::Tensor mask = empty_mask(data, packed);
  SPX_DISPATCH_SCORED_TYPES(data.scalar_type(), "emulated", [&] {
    using T = typename Storage<scalar_t>::type;
    cuda::block_mask<T>(reinterpret_cast<T*>(work.data_ptr<scalar_t>()), row_stride(work), grid, sparsity_level,
                        zeros_per_block, static_cast<int>(norm), packed, apply, mask);
  });
  if (apply && !work.is_same(data)) data.copy_(work);
  return mask;
}

std::vector<at::Tensor> select_threshold(at::Tensor values, int64_t k) {
  check_select_args(values, k);
  const at::Tensor contiguous = values.contiguous();
  std::pair<at::Tensor, at::Tensor> result;
  SPX_DISPATCH_SCORED_TYPES(values.scalar_type(), "emulated", [&] {
    using T = typename Storage<scalar_t>::type;
    result = cuda::select_kth(reinterpret_cast<const T*>(contiguous.data_ptr<scalar_t>()), values.numel(), k,
                              values.options());
  });
  return {result.first.to(values.scalar_type()), result.second};
}

at::Tensor pack_mask(at::Tensor mask) {
  const at::Tensor src = mask.contiguous();
  at::Tensor packed = at::empty({(src.numel() + 7) / 8}, at::kByte);
  if (src.numel() > 0) {
    cuda::launch(cuda::pack_kernel, cuda::grid_for(cuda::pack_kernel, (src.numel() + 31) / 32), nullptr,
                 src.data_ptr<bool>(), src.numel(), packed.data_ptr<uint8_t>());
  }
  return packed;
}

at::Tensor unpack_mask(at::Tensor packed, int64_t numel) {
  at::Tensor mask = at::empty({numel}, at::kBool);
  if (numel > 0) {
    cuda::launch(cuda::unpack_kernel, cuda::grid_for(cuda::unpack_kernel, (numel + 31) / 32), nullptr,
                 packed.data_ptr<uint8_t>(), numel, mask.data_ptr<bool>());
  }
  return mask;
}

void apply_mask_(at::Tensor data, at::Tensor mask) {
  const bool packed = mask.scalar_type() == at::kByte;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, data.scalar_type(), "emulated", [&] {
    using T = typename Storage<scalar_t>::type;
    cuda::launch_apply_mask(reinterpret_cast<T*>(data.data_ptr<scalar_t>()), data.numel(), data.numel(), data.numel(),
                            packed ? nullptr : mask.data_ptr<bool>(), packed ? mask.data_ptr<uint8_t>() : nullptr,
                            nullptr);
  });
}

}  // namespace
}  // namespace sparsity_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_mask", &sparsity_ext::block_mask);
  m.def("select_threshold", &sparsity_ext::select_threshold);
  m.def("pack_mask", &sparsity_ext::pack_mask);
  m.def("unpack_mask", &sparsity_ext::unpack_mask);
  m.def("apply_mask_", &sparsity_ext::apply_mask_);
}
