// CPU kernels for the mask-format ops: pack_mask, unpack_mask, apply_mask_.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace sparsity_ext {
namespace {

constexpr int64_t kGrain = 1 << 16;  // elements per parallel task: large enough to amortize a task

at::Tensor pack_mask_cpu(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pack_mask: mask must be bool, got ", mask.scalar_type());
  const at::Tensor flat = mask.contiguous().view(-1);
  const int64_t numel = flat.numel();
  const int64_t nbytes = (numel + 7) / 8;
  at::Tensor packed = at::empty({nbytes}, mask.options().dtype(at::kByte));
  const bool* src = flat.data_ptr<bool>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  at::parallel_for(0, nbytes, kGrain / 8, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t base = 8 * j;
      const int64_t count = std::min<int64_t>(8, numel - base);
      uint8_t byte = 0;
      for (int64_t i = 0; i < count; ++i) byte |= static_cast<uint8_t>(src[base + i]) << i;
      dst[j] = byte;
    }
  });
  return packed;
}

at::Tensor unpack_mask_cpu(const at::Tensor& packed, at::IntArrayRef shape) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, "unpack_mask: packed must be uint8, got ", packed.scalar_type());
  at::Tensor mask = at::empty(shape, packed.options().dtype(at::kBool));
  const int64_t numel = mask.numel();
  TORCH_CHECK(packed.numel() == (numel + 7) / 8, "unpack_mask: packed has ", packed.numel(),
              " bytes, shape ", shape, " needs ", (numel + 7) / 8);
  const at::Tensor src_t = packed.contiguous();
  const uint8_t* src = src_t.data_ptr<uint8_t>();
  bool* dst = mask.data_ptr<bool>();
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = (src[i >> 3] >> (i & 7)) & 1;
  });
  return mask;
}

template <typename scalar_t>
void apply_mask_kernel(scalar_t* data, const at::Tensor& mask, int64_t numel) {
  if (mask.scalar_type() == at::kBool) {
    const bool* keep = mask.data_ptr<bool>();
    // Branch-free selects (masks look random to a branch predictor): every element is rewritten, and the
    // loops vectorize.
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) data[i] = keep[i] ? data[i] : scalar_t(0);
    });
  } else {
    const uint8_t* bits = mask.data_ptr<uint8_t>();
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) data[i] = ((bits[i >> 3] >> (i & 7)) & 1) ? data[i] : scalar_t(0);
    });
  }
}

void apply_mask__cpu(at::Tensor& data, const at::Tensor& mask) {
  const bool packed = mask.scalar_type() == at::kByte;
  TORCH_CHECK(packed || mask.scalar_type() == at::kBool, "apply_mask_: mask must be bool or packed uint8, got ",
              mask.scalar_type());
  TORCH_CHECK(packed ? mask.numel() == (data.numel() + 7) / 8 : mask.sizes() == data.sizes(),
              "apply_mask_: mask shape ", mask.sizes(), " does not fit data shape ", data.sizes());
  // Work on a contiguous buffer; copy back only when data itself is not contiguous.
  at::Tensor work = data.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, data.scalar_type(), "apply_mask_cpu", [&] {
    apply_mask_kernel<scalar_t>(work.data_ptr<scalar_t>(), mask_c, work.numel());
  });
  if (!work.is_same(data)) data.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) {
  m.impl("pack_mask", &pack_mask_cpu);
  m.impl("unpack_mask", &unpack_mask_cpu);
  m.impl("apply_mask_", &apply_mask__cpu);
}

}  // namespace sparsity_ext
