// CUDA launchers of the mask-format ops: pack_mask, unpack_mask, apply_mask_ (kernels:
// mask_format_kernels.cuh). Each thread owns 32 flags = one 32-bit word of packed bits.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "common/op_args.h"
#include "cuda/launch.h"
#include "cuda/mask_format_kernels.cuh"

namespace sparsity_ext {
namespace {

// Contiguous and aligned to `bytes` (the kernels read whole words); copies when it is not.
at::Tensor contiguous_aligned(const at::Tensor& t, int64_t bytes) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % bytes == 0 ? c : c.clone();
}

at::Tensor pack_mask_cuda(const at::Tensor& mask) {
  TORCH_CHECK(mask.is_cuda(), "pack_mask: mask must be a CUDA tensor, got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pack_mask: mask must be bool, got ", mask.scalar_type());
  const c10::cuda::OptionalCUDAGuard device_guard(mask.device());
  const at::Tensor src = contiguous_aligned(mask, 16);
  const int64_t numel = src.numel();
  at::Tensor packed = at::empty({(numel + 7) / 8}, mask.options().dtype(at::kByte));
  if (numel == 0) return packed;
  cuda::launch(cuda::pack_kernel, cuda::grid_for(cuda::pack_kernel, (numel + 31) / 32), cuda::current_stream(),
               src.data_ptr<bool>(), numel, packed.data_ptr<uint8_t>());
  return packed;
}

at::Tensor unpack_mask_cuda(const at::Tensor& packed, at::IntArrayRef shape) {
  TORCH_CHECK(packed.is_cuda(), "unpack_mask: packed must be a CUDA tensor, got ", packed.device());
  TORCH_CHECK(packed.scalar_type() == at::kByte, "unpack_mask: packed must be uint8, got ", packed.scalar_type());
  const c10::cuda::OptionalCUDAGuard device_guard(packed.device());
  at::Tensor mask = at::empty(shape, packed.options().dtype(at::kBool));
  const int64_t numel = mask.numel();
  TORCH_CHECK(packed.numel() == (numel + 7) / 8, "unpack_mask: packed has ", packed.numel(), " bytes, shape ", shape,
              " needs ", (numel + 7) / 8);
  if (numel == 0) return mask;
  const at::Tensor src = contiguous_aligned(packed, 4);
  cuda::launch(cuda::unpack_kernel, cuda::grid_for(cuda::unpack_kernel, (numel + 31) / 32), cuda::current_stream(),
               src.data_ptr<uint8_t>(), numel, mask.data_ptr<bool>());
  return mask;
}

void apply_mask__cuda(at::Tensor& data, const at::Tensor& mask) {
  TORCH_CHECK(data.is_cuda() && mask.is_cuda() && data.device() == mask.device(),
              "apply_mask_: data and mask must be on the same CUDA device, got ", data.device(), " and ",
              mask.device());
  const bool packed = check_mask_format_arg("apply_mask_", data, mask);
  const c10::cuda::OptionalCUDAGuard device_guard(data.device());
  if (data.numel() == 0) return;
  at::Tensor work = data.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, data.scalar_type(), "apply_mask_cuda", [&] {
    using T = typename Storage<scalar_t>::type;
    cuda::launch_apply_mask(reinterpret_cast<T*>(work.data_ptr<scalar_t>()), work.numel(), work.numel(), work.numel(),
                            packed ? nullptr : mask_c.data_ptr<bool>(), packed ? mask_c.data_ptr<uint8_t>() : nullptr,
                            stream);
  });
  if (!work.is_same(data)) data.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CUDA, m) {
  m.impl("pack_mask", &pack_mask_cuda);
  m.impl("unpack_mask", &unpack_mask_cuda);
  m.impl("apply_mask_", &apply_mask__cuda);
}

}  // namespace sparsity_ext
