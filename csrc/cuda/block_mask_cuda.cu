// CUDA launchers of the block-norm masks and of select_threshold (kernels: mask_kernels.cuh).
//
// Everything runs on the current stream without a host synchronization: k is computed on the host
// from the shape, and the threshold key and tie cut-off stay in a device-side RadixState that the
// later kernels read. Extra memory: 4 bytes per block (keys), +8 per block (cuts) for blocks that
// are not one row of <= 32 columns when zeros_per_block < block size, a 50 KB workspace, and one
// counter per 8192 blocks for splitting ties at the threshold.
//
// Strided input: a unit column stride and any row stride >= cols are read in place; other layouts
// are copied to a contiguous buffer (and, for _apply_, copied back).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/mask_math.h"
#include "common/op_args.h"
#include "cuda/launch.h"
#include "cuda/mask_kernels.cuh"

namespace sparsity_ext {
namespace {

using cuda::aligned;
using cuda::grid_for;
using cuda::kThreads;
using cuda::ZeroMode;

// Device-side state of one radix select; zero-initialized (at::zeros) before the first pass.
struct SelectWorkspace {
  unsigned long long hist[kRadixPasses][kRadixBins];
  RadixState state;
};

SelectWorkspace* new_workspace(at::Tensor& storage, const at::TensorOptions& options) {
  storage = at::zeros({static_cast<int64_t>(sizeof(SelectWorkspace))}, options.dtype(at::kByte));
  return reinterpret_cast<SelectWorkspace*>(storage.data_ptr<uint8_t>());
}

// Radix select of the k-th smallest of keys(i), i < n; pass 0's histogram is already in ws->hist[0]
// when first_pass_done.
template <class Keys>
void radix_select(const Keys& keys, int64_t n, int64_t k, SelectWorkspace* ws, bool first_pass_done,
                  cudaStream_t stream) {
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    if (pass > 0 || !first_pass_done) {
      cuda::radix_hist_kernel<<<grid_for(n), kThreads, 0, stream>>>(keys, n, pass == 0 ? nullptr : &ws->state, pass,
                                                                     ws->hist[pass]);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    cuda::radix_step_kernel<<<1, kThreads, 0, stream>>>(ws->hist[pass], &ws->state, pass, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void fill_ones(at::Tensor& mask, bool packed, int64_t numel) {
  if (!packed) {
    mask.fill_(true);
    return;
  }
  mask.fill_(0xFF);
  if (numel % 8 != 0) mask.narrow(0, mask.numel() - 1, 1).fill_(static_cast<int64_t>((1u << (numel % 8)) - 1u));
}

template <typename T>
void launch_block_keys(const T* data, const cuda::KeysArgs& args, cudaStream_t stream) {
  const BlockGrid& g = args.grid;
  const unsigned blocks = grid_for(g.num_blocks());
  if (g.block_rows == 1 && g.block_cols == 4) {
    cuda::block_keys_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(data, args);
  } else if (g.block_rows == 1 && g.block_cols == 8) {
    cuda::block_keys_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(data, args);
  } else {
    cuda::block_keys_kernel<T, 0><<<blocks, kThreads, 0, stream>>>(data, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, ZeroMode kMode, int kGroup>
void launch_mask(T* data, const cuda::MaskArgs& args, cudaStream_t stream) {
  const int64_t chunks = (args.grid.rows * args.grid.cols + cuda::kChunk - 1) / cuda::kChunk;
  cuda::mask_kernel<T, kMode, kGroup><<<grid_for(chunks), kThreads, 0, stream>>>(data, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void block_mask_kernel(T* data, int64_t ld, const BlockGrid& grid, double sparsity_level, int64_t zeros_per_block,
                       int norm, bool packed, bool apply, at::Tensor& mask) {
  const int64_t num_blocks = grid.num_blocks();
  const int64_t k = num_selected_blocks(sparsity_level, num_blocks);
  if (k == 0 || zeros_per_block == 0) {
    fill_ones(mask, packed, grid.rows * grid.cols);
    return;
  }
  const cudaStream_t stream = cuda::current_stream();
  const bool all_selected = k == num_blocks;
  const ZeroMode mode = zeros_per_block >= grid.block_size() ? ZeroMode::kWholeBlock
                        : (grid.block_rows == 1 && grid.block_cols <= 32) ? ZeroMode::kRowRank
                                                                          : ZeroMode::kCut;
  const at::TensorOptions options = mask.options();
  // uninitialized O(num_blocks) buffers: every entry is written by block_keys_kernel
  const at::Tensor keys = all_selected ? at::Tensor() : at::empty({num_blocks}, options.dtype(at::kInt));
  const at::Tensor cuts = mode == ZeroMode::kCut ? at::empty({num_blocks}, options.dtype(at::kLong)) : at::Tensor();
  uint32_t* key_data = keys.defined() ? reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()) : nullptr;
  uint64_t* cut_data = cuts.defined() ? reinterpret_cast<uint64_t*>(cuts.data_ptr<int64_t>()) : nullptr;
  at::Tensor workspace_storage;
  SelectWorkspace* ws = key_data ? new_workspace(workspace_storage, options) : nullptr;

  if (key_data || cut_data) {
    const int64_t vector_bytes = std::min<int64_t>(16, grid.block_cols * static_cast<int64_t>(sizeof(T)));
    const bool vector_rows = grid.block_rows == 1 && (grid.block_cols == 4 || grid.block_cols == 8) &&
                             aligned(data, vector_bytes) && (ld * static_cast<int64_t>(sizeof(T))) % vector_bytes == 0;
    const cuda::KeysArgs args{ld,          grid,     norm,     zeros_per_block, vector_rows,
                              key_data,    cut_data, ws ? ws->hist[0] : nullptr};
    launch_block_keys(data, args, stream);
  }
  if (key_data) {
    radix_select(cuda::KeyArray{key_data}, num_blocks, k, ws, /*first_pass_done=*/true, stream);
    // when the blocks equal to the threshold are only partly selected: the last selected one
    const int64_t tiles = (num_blocks + cuda::kTieTile - 1) / cuda::kTieTile;
    const at::Tensor tile_counts = at::empty({tiles}, options.dtype(at::kInt));
    unsigned* counts = reinterpret_cast<unsigned*>(tile_counts.data_ptr<int32_t>());
    cuda::tie_count_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(key_data, num_blocks, &ws->state,
                                                                                 counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::tie_find_kernel<<<1, kThreads, 0, stream>>>(key_data, num_blocks, &ws->state, counts, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // kRowRank fast path: every 32-element chunk lies in one row, read with 16-byte loads
  const bool row_vectors = grid.block_rows == 1 && grid.cols % cuda::kChunk == 0 && aligned(data, 16) &&
                           (ld * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  cuda::MaskArgs args{ld,       grid,     zeros_per_block, norm,  key_data, ws ? &ws->state : nullptr,
                      cut_data, mask.data_ptr(), packed,   apply, false};
  switch (mode) {
    case ZeroMode::kWholeBlock:
      return launch_mask<T, ZeroMode::kWholeBlock, 1>(data, args, stream);
    case ZeroMode::kCut:
      return launch_mask<T, ZeroMode::kCut, 1>(data, args, stream);
    case ZeroMode::kRowRank:
      args.vector_rows = row_vectors && (grid.block_cols == 4 || grid.block_cols == 8);
      // Without the vector path a block may straddle two threads' chunks, and one thread would zero
      // elements the other still ranks: write the mask first, then zero in a second pass.
      args.apply = apply && args.vector_rows;
      if (grid.block_cols <= 4) {
        launch_mask<T, ZeroMode::kRowRank, 4>(data, args, stream);
      } else if (grid.block_cols <= 8) {
        launch_mask<T, ZeroMode::kRowRank, 8>(data, args, stream);
      } else {
        launch_mask<T, ZeroMode::kRowRank, 32>(data, args, stream);
      }
      if (apply && !args.apply) {
        const int64_t chunks = (grid.rows * grid.cols + cuda::kChunk - 1) / cuda::kChunk;
        cuda::zero_dropped_kernel<T><<<grid_for(chunks), kThreads, 0, stream>>>(data, ld, grid.rows, grid.cols,
                                                                                mask.data_ptr(), packed);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
  }
}

at::Tensor block_mask_cuda(const char* op, const at::Tensor& data, double sparsity_level, at::IntArrayRef block_shape,
                           int64_t zeros_per_block, int64_t norm, bool packed, bool apply) {
  TORCH_CHECK(data.is_cuda(), op, ": data must be a CUDA tensor, got ", data.device());
  const BlockGrid grid = check_block_mask_args(op, data, sparsity_level, block_shape, zeros_per_block, norm);
  const c10::cuda::OptionalCUDAGuard device_guard(data.device());
  at::Tensor work = rows_readable_in_place(data) ? data : data.contiguous();
  at::Tensor mask = empty_mask(data, packed);
  SPX_DISPATCH_SCORED_TYPES(data.scalar_type(), "block_mask_cuda", [&] {
    using T = typename Storage<scalar_t>::type;
    block_mask_kernel<T>(reinterpret_cast<T*>(work.data_ptr<scalar_t>()), row_stride(work), grid, sparsity_level,
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
  const cudaStream_t stream = cuda::current_stream();
  const at::Tensor contiguous = values.contiguous();
  at::Tensor workspace_storage;
  SelectWorkspace* ws = new_workspace(workspace_storage, values.options());
  SPX_DISPATCH_SCORED_TYPES(values.scalar_type(), "select_threshold_cuda", [&] {
    using T = typename Storage<scalar_t>::type;
    const T* data = reinterpret_cast<const T*>(contiguous.data_ptr<scalar_t>());
    radix_select(cuda::ValueKeys<T>{data}, values.numel(), k, ws, /*first_pass_done=*/false, stream);
  });
  at::Tensor value = at::empty({}, values.options().dtype(at::kFloat));
  at::Tensor tie_rank = at::empty({}, values.options().dtype(at::kLong));
  cuda::select_finish_kernel<<<1, 1, 0, stream>>>(&ws->state, value.data_ptr<float>(), tie_rank.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // the k-th key is the key of an actual value, so converting back to the input dtype is exact
  return {value.to(values.scalar_type()), tie_rank};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CUDA, m) {
  m.impl("block_norm_mask", &block_norm_mask_cuda);
  m.impl("block_norm_mask_apply_", &block_norm_mask_apply__cuda);
  m.impl("nm_mask", &nm_mask_cuda);
  m.impl("select_threshold", &select_threshold_cuda);
}

}  // namespace sparsity_ext
