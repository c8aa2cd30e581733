// CPU select_threshold: the exact k-th smallest of a 1-D float tensor by radix select over order
// keys computed on the fly from the values (three histogram passes, no key array, no sort).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common/mask_math.h"
#include "common/op_args.h"
#include "cpu/radix_select_cpu.h"

namespace sparsity_ext {
namespace {

constexpr int64_t kSelectGrain = 1 << 16;  // values per histogram chunk

std::tuple<at::Tensor, at::Tensor> select_threshold_cpu(const at::Tensor& values, int64_t k) {
  TORCH_CHECK(values.device().is_cpu(), "select_threshold: values must be a CPU tensor, got ", values.device());
  check_select_args(values, k);
  const at::Tensor contiguous = values.contiguous();
  RadixState state{};
  SPX_DISPATCH_SCORED_TYPES(values.scalar_type(), "select_threshold_cpu", [&] {
    using T = typename Storage<scalar_t>::type;
    const T* data = reinterpret_cast<const T*>(contiguous.data_ptr<scalar_t>());
    const auto key_at = [data](int64_t i) { return order_key(to_float(data[i])); };
    state = cpu::radix_select(cpu::make_chunking(values.numel(), kSelectGrain), key_at, k, nullptr);
  });
  // The k-th key is the key of an actual value, so converting back to the input dtype is exact.
  at::Tensor value = at::scalar_tensor(key_to_float(state.prefix), values.options().dtype(at::kFloat))
                         .to(values.scalar_type());
  at::Tensor tie_rank = at::scalar_tensor(state.rank, values.options().dtype(at::kLong));
  return {value, tie_rank};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) { m.impl("select_threshold", &select_threshold_cpu); }

}  // namespace sparsity_ext
