// CUDA kernels: grid-stride loops over the same scalar arithmetic as the CPU (rounding.h),
// on the tensor's device and its current stream. Element-wise formats: 4 elements per
// thread with vector loads when aligned. Block and scaled formats whose blocks are runs along
// a dim can take a fused kernel that finds each block's maximum and rounds its elements (a
// group of lanes per run along the last dim, a thread per column otherwise; see
// block_path); the general path (and other layouts: blocks shared along a dim, tiles, the
// whole tensor) takes the block maxima in a pass of their own first.
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "quantize.h"

namespace lowp {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;

template <typename scalar_t>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// Block of element i (see BlockLayout).
__device__ __forceinline__ int64_t block_of(int64_t i, const BlockLayout& L) {
  if (L.dim_size == 1 && L.blocks_per_outer == 0) return 0;  // whole tensor
  const int64_t row = i / L.inner;
  return L.block_of(row / L.dim_size, row % L.dim_size, i % L.inner);
}

// Stochastic rounding's counter of element i (see BlockLayout::counter_of).
__device__ __forceinline__ int64_t counter_of(int64_t i, const BlockLayout& L) {
  if (!L.column_blocks()) return i;
  const int64_t row = i / L.inner;
  return L.counter_of(row / L.dim_size, row % L.dim_size, i % L.inner);
}

// One element of a block or scaled format, given its block's state; `counter` is its
// stochastic-rounding counter.
template <Kind K, Rounding R>
__device__ __forceinline__ float quantize_in_block(float x, int64_t counter, const FormatParams& p, uint64_t key,
                                                   const BlockState& state) {
  const uint32_t r = R == Rounding::Stochastic ? random_bits(key, static_cast<uint64_t>(counter)) : 0u;
  if (K == Kind::Scaled && p.scale != ScaleKind::E8m0) {
    return float_scaled_fast_applies<R>(p, state.scale) ? quantize_float_scaled_fast<R>(p, x, state.scale, r)
                                                        : quantize_float_scaled<R>(p, x, state.scale, state.max_mag, r);
  }
  return quantize_value<R>(x, step_exponent<K>(p, x, state.block), state.max_mag, state.max_mag, p.overflow_inf, r);
}

template <Kind K, Rounding R>
__device__ __forceinline__ float quantize_element(float x, int64_t i, const FormatParams& p, uint64_t key,
                                                  const BlockLayout& L, const uint32_t* maxima) {
  if (K == Kind::Block || K == Kind::Scaled) {
    // maxima[num_blocks]: the whole tensor's, for NVFP4's tensor scale
    const BlockState state = block_state<K>(p, maxima[block_of(i, L)], p.tensor_scale ? maxima[L.num_blocks()] : 0u);
    return quantize_in_block<K, R>(x, counter_of(i, L), p, key, state);
  }
  const uint32_t r = R == Rounding::Stochastic ? random_bits(key, static_cast<uint64_t>(i)) : 0u;
  return quantize_value<R>(x, step_exponent<K>(p, x, 0), p.max_pos, p.max_neg, p.overflow_inf, r);
}

template <Kind K, Rounding R, typename scalar_t>
__global__ void quantize_kernel(const scalar_t* in, scalar_t* out, int64_t n,
                                FormatParams p, uint64_t key, BlockLayout L, const uint32_t* maxima,
                                bool vectorized) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (vectorized) {
    const int64_t packs = n / kVec;
    for (int64_t j = tid; j < packs; j += stride) {
      Pack<scalar_t> pack = reinterpret_cast<const Pack<scalar_t>*>(in)[j];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        pack.v[k] = static_cast<scalar_t>(
            quantize_element<K, R>(static_cast<float>(pack.v[k]), j * kVec + k, p, key, L, maxima));
      }
      reinterpret_cast<Pack<scalar_t>*>(out)[j] = pack;
    }
    tail = packs * kVec;
  }
  for (int64_t i = tail + tid; i < n; i += stride) {
    out[i] = static_cast<scalar_t>(quantize_element<K, R>(static_cast<float>(in[i]), i, p, key, L, maxima));
  }
}

// Largest finite magnitude of every block: each thread folds its run of elements of one
// block and flushes with atomicMax; for a single block, a warp reduces first. With
// `whole`, also the whole tensor's, into maxima[num_blocks].
template <typename scalar_t>
__global__ void block_max_kernel(const scalar_t* in, int64_t n, BlockLayout L, uint32_t* maxima,
                                 bool whole) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool single = L.num_blocks() == 1;
  int64_t current = -1;
  uint32_t m = 0, all = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t b = single ? 0 : block_of(i, L);
    if (b != current) {
      if (current >= 0 && m) atomicMax(maxima + current, m);
      current = b;
      m = 0;
    }
    m = max(m, finite_magnitude_bits(static_cast<float>(in[i])));
    all = max(all, m);
  }
  if (whole) {
    for (int offset = 16; offset > 0; offset /= 2) all = max(all, __shfl_xor_sync(0xffffffffu, all, offset));
    if ((threadIdx.x & 31) == 0 && all) atomicMax(maxima + L.num_blocks(), all);
  }
  if (single) {
    for (int offset = 16; offset > 0; offset /= 2) m = max(m, __shfl_xor_sync(0xffffffffu, m, offset));
    if ((threadIdx.x & 31) == 0 && m) atomicMax(maxima, m);
  } else if (current >= 0 && m) {
    atomicMax(maxima + current, m);
  }
}

// The largest of m over each group of `width` lanes (a power of two, at most 32), every lane
// of the warp taking part.
__device__ __forceinline__ uint32_t group_max(uint32_t m, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) m = max(m, __shfl_xor_sync(0xffffffffu, m, offset, width));
  return m;
}

// Blocks that are runs along the last dim (inner 1, no tiles; blocks_per_outer runs a row):
// `width` lanes (a power of two, at most a warp) per block, striding over its elements. The
// lanes fold the block's maximum, reduce it by shuffles, and round the elements, in one pass
// over memory (the second read hits the cache) and with no atomics. Every lane of a warp
// runs the same iterations, so that the shuffles see them all. tensor_max: the whole
// tensor's maximum (NVFP4's tensor scale), or null.
template <Kind K, Rounding R, typename scalar_t>
__global__ void run_blocks_kernel(const scalar_t* in, scalar_t* out, FormatParams p, uint64_t key, BlockLayout L,
                                  int width, const uint32_t* tensor_max) {
  const int64_t blocks = L.num_blocks();
  const int per_warp = 32 / width;
  const int lane = threadIdx.x % width, group = (threadIdx.x % 32) / width;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const bool exact_runs = L.dim_size % L.block_len == 0;  // a block starts at b * block_len
  const uint32_t whole_max = tensor_max != nullptr ? *tensor_max : 0u;
  for (int64_t first = warp * per_warp; first < blocks; first += warps * per_warp) {
    const int64_t b = first + group;
    int64_t start = 0, len = 0;
    if (b < blocks) {
      if (exact_runs) {
        start = b * L.block_len;
        len = L.block_len;
      } else {  // the last run of a row is short
        const int64_t o = b / L.blocks_per_outer, c = b - o * L.blocks_per_outer;
        start = o * L.dim_size + c * L.block_len;
        len = min(L.block_len, L.dim_size - c * L.block_len);
      }
    }
    uint32_t m = 0;
    for (int64_t j = lane; j < len; j += width) m = max(m, finite_magnitude_bits(static_cast<float>(in[start + j])));
    m = group_max(m, width);  // (every lane: inactive ones with len 0)
    const BlockState state = block_state<K>(p, m, whole_max);
    for (int64_t j = lane; j < len; j += width) {
      const int64_t i = start + j;
      out[i] = static_cast<scalar_t>(quantize_in_block<K, R>(static_cast<float>(in[i]), i, p, key, state));
    }
  }
}

// Blocks that are runs along a dim other than the last (column blocks, inner > 1, no tiles):
// a thread per block, walking down its column twice (maximum, then rounding; the second
// walk hits the cache). Neighbouring threads take neighbouring columns, so every access is
// coalesced, and nothing is atomic.
template <Kind K, Rounding R, typename scalar_t>
__global__ void column_blocks_kernel(const scalar_t* in, scalar_t* out, FormatParams p, uint64_t key, BlockLayout L,
                                     const uint32_t* tensor_max) {
  const int64_t blocks = L.num_blocks();  // outer * blocks_per_outer * inner
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const uint32_t whole_max = tensor_max != nullptr ? *tensor_max : 0u;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks; b += stride) {
    // b = (o * blocks_per_outer + c) * inner + i (BlockLayout::block_of)
    const int64_t i = b % L.inner, run = b / L.inner;
    const int64_t c = run % L.blocks_per_outer, o = run / L.blocks_per_outer;
    const int64_t d_begin = c * L.block_len, d_end = min(L.dim_size, d_begin + L.block_len);
    const int64_t base = o * L.dim_size * L.inner + i;
    uint32_t m = 0;
    for (int64_t d = d_begin; d < d_end; ++d) {
      m = max(m, finite_magnitude_bits(static_cast<float>(in[base + d * L.inner])));
    }
    const BlockState state = block_state<K>(p, m, whole_max);
    for (int64_t d = d_begin; d < d_end; ++d) {
      const int64_t idx = base + d * L.inner;
      out[idx] = static_cast<scalar_t>(
          quantize_in_block<K, R>(static_cast<float>(in[idx]), L.counter_of(o, d, i), p, key, state));
    }
  }
}

// quantize_foreach_cuda's launches: up to kForeachTensors tensors and kForeachChunks chunks
// of kChunk elements each, described in the kernel's arguments (under 4 KiB), a CTA a chunk.
constexpr int kForeachTensors = 48;
constexpr int kForeachChunks = 192;
constexpr int64_t kChunk = 1 << 16;

template <typename scalar_t>
struct ForeachBatch {
  const scalar_t* in[kForeachTensors];
  scalar_t* out[kForeachTensors];
  int64_t numel[kForeachTensors];
  uint64_t key[kForeachTensors];
  uint8_t tensor[kForeachChunks];  // the tensor of each chunk
  int32_t chunk[kForeachChunks];   // its index within the tensor
};

// Element-wise formats over many tensors in one launch: CTA c rounds chunk c of its tensor,
// element i of a tensor in storage order with counter i (as quantize_kernel does each tensor).
template <Kind K, Rounding R, typename scalar_t>
__global__ void foreach_kernel(ForeachBatch<scalar_t> batch, FormatParams p) {
  const int t = batch.tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(batch.chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(batch.numel[t], begin + kChunk);
  const scalar_t* in = batch.in[t];
  scalar_t* out = batch.out[t];
  const BlockLayout none;  // (element-wise: no blocks)
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float x = static_cast<float>(in[i]);
    out[i] = static_cast<scalar_t>(quantize_element<K, R>(x, i, p, batch.key[t], none, nullptr));
  }
}

// The multiprocessor count of each device, asked once (two runtime calls per launch otherwise).
int multiprocessors(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices];
  if (device >= kMaxDevices) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  }
  int sms = counts[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

int grid_size(int64_t work, int device) {
  const int sms = multiprocessors(device);
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, static_cast<int64_t>(sms) * 8)));
}

// The lanes per block of run_blocks_kernel: the block length rounded up to a power of two, at
// most a warp.
int run_width(const BlockLayout& L) {
  int width = 1;
  while (width < 32 && width < L.block_len) width *= 2;
  return width;
}

// How a block or scaled format's kernels take its blocks (see the file's comment).
enum class BlockPath { General, Runs, Columns };

// The fused kernels (runs, columns) take the layouts of runs along a dim; they need enough
// blocks to fill the device (a group of lanes or a thread each). With fewer (a few long rows;
// fp8_rowwise along dim 0 of a wide matrix) the general path, whose grid strides over
// elements, keeps more loads in flight. LOWP_CUDA_BLOCKS (read at every call) chooses:
// "auto" as above, "fused" wherever the layout allows, "general" never. Unset, it is
// "general" until the fused kernels have passed the bit-identity tests on a GPU (written
// without one; the tests run them under "fused" and "auto").
BlockPath block_path(const BlockLayout& L, int device) {
  const char* env = std::getenv("LOWP_CUDA_BLOCKS");
  const std::string choice = env != nullptr ? env : "general";
  TORCH_CHECK(choice == "auto" || choice == "fused" || choice == "general",
              "LOWP_CUDA_BLOCKS must be auto, fused or general, got ", choice);
  if (choice == "general" || L.blocks_per_outer == 0 || L.tile_rows != 1) return BlockPath::General;
  const BlockPath fused = L.inner == 1 ? BlockPath::Runs : BlockPath::Columns;
  if (choice == "fused") return fused;
  const int64_t lanes = L.inner == 1 ? L.num_blocks() * run_width(L) : L.num_blocks();
  return lanes >= static_cast<int64_t>(multiprocessors(device)) * 512 ? fused : BlockPath::General;
}

}  // namespace

// LOWP_CUDA_FOREACH (read at every call): "multi" takes quantize_foreach_ of element-wise
// formats through the multi-tensor kernel, "loop" launches quantize_cuda per tensor. Unset,
// it is "loop" until the multi-tensor kernel has passed the CUDA tests on a GPU (written
// without one; the tests run both).
bool foreach_cuda_kernel() {
  const char* env = std::getenv("LOWP_CUDA_FOREACH");
  const std::string choice = env != nullptr ? env : "loop";
  TORCH_CHECK(choice == "multi" || choice == "loop", "LOWP_CUDA_FOREACH must be multi or loop, got ", choice);
  return choice == "multi";
}

void quantize_foreach_cuda(const std::vector<ForeachItem>& items, const FormatParams& p, Rounding mode) {
  if (items.empty()) return;
  TORCH_CHECK(p.kind == Kind::Fixed || p.kind == Kind::Float,
              "lowp::quantize_foreach_cuda: element-wise formats only");
  const c10::cuda::CUDAGuard guard(items[0].in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(mode != Rounding::Stochastic ||
                  c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "lowp::quantize_foreach_: stochastic rounding cannot run under CUDA graph capture (see lowp::quantize)");
  std::vector<at::ScalarType> dtypes;
  for (const ForeachItem& item : items) {
    if (std::find(dtypes.begin(), dtypes.end(), item.in.scalar_type()) == dtypes.end()) {
      dtypes.push_back(item.in.scalar_type());
    }
  }
  for (const at::ScalarType dtype : dtypes) {  // a launch holds tensors of one dtype
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowp_quantize_foreach_cuda", [&] {
      ForeachBatch<scalar_t> batch{};
      int tensors = 0, chunks = 0;
      const auto launch = [&] {
        if (chunks > 0) {
          dispatch_kind(p.kind, [&](auto kind) {
            constexpr Kind K = decltype(kind)::value;
            if constexpr (K == Kind::Fixed || K == Kind::Float) {
              dispatch_rounding(mode, [&](auto rounding) {
                foreach_kernel<K, decltype(rounding)::value, scalar_t><<<chunks, kThreads, 0, stream>>>(batch, p);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              });
            }
          });
        }
        tensors = chunks = 0;
      };
      for (const ForeachItem& item : items) {
        if (item.in.scalar_type() != dtype) continue;
        const int64_t n = item.in.numel();
        int slot = -1;  // the tensor's place in this launch, once it has one
        for (int64_t c = 0; c * kChunk < n; ++c) {
          if (slot < 0) {
            if (tensors == kForeachTensors) launch();
            slot = tensors++;
            batch.in[slot] = item.in.const_data_ptr<scalar_t>();
            batch.out[slot] = item.out.mutable_data_ptr<scalar_t>();
            batch.numel[slot] = n;
            batch.key[slot] = item.key;
          }
          batch.tensor[chunks] = static_cast<uint8_t>(slot);
          batch.chunk[chunks] = static_cast<int32_t>(c);
          if (++chunks == kForeachChunks) {
            launch();
            slot = -1;  // the rest of this tensor goes in the next launch
          }
        }
      }
      launch();
    });
  }
}

void quantize_cuda(const at::Tensor& in, at::Tensor& out, const FormatParams& p, Rounding mode, uint64_t key,
                   const BlockLayout& layout) {
  const c10::cuda::CUDAGuard guard(in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = in.get_device();
  // The key is drawn on the host: a captured graph would replay the same random bits forever.
  TORCH_CHECK(mode != Rounding::Stochastic ||
                  c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "lowp::quantize: stochastic rounding cannot run under CUDA graph capture (torch.cuda.graph, "
              "torch.compile(mode=\"reduce-overhead\")): every replay would reuse the random bits drawn at capture; "
              "round stochastically outside the graph, or use a deterministic rounding mode inside it");
  const int64_t n = in.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "lowp_quantize_cuda", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::Tensor maxima;
    const uint32_t* maxima_ptr = nullptr;
    const bool blocks = p.kind == Kind::Block || p.kind == Kind::Scaled;
    const BlockPath path = blocks && n > 0 ? block_path(layout, device) : BlockPath::General;
    if (path != BlockPath::General) {
      const uint32_t* tensor_max = nullptr;
      if (p.tensor_scale) {  // the whole tensor's maximum first: one block spanning it
        maxima = at::zeros({1}, in.options().dtype(at::kInt));
        uint32_t* ptr = reinterpret_cast<uint32_t*>(maxima.mutable_data_ptr<int>());
        block_max_kernel<<<grid_size(n, device), kThreads, 0, stream>>>(src, n, BlockLayout{}, ptr, false);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        tensor_max = ptr;
      }
      dispatch_kind(p.kind, [&](auto kind) {
        constexpr Kind K = decltype(kind)::value;
        if constexpr (K == Kind::Block || K == Kind::Scaled) {
          dispatch_rounding(mode, [&](auto rounding) {
            constexpr Rounding R = decltype(rounding)::value;
            if (path == BlockPath::Runs) {
              const int width = run_width(layout);
              const int64_t warps = (layout.num_blocks() + 32 / width - 1) / (32 / width);
              run_blocks_kernel<K, R, scalar_t><<<grid_size(warps * 32, device), kThreads, 0, stream>>>(
                  src, dst, p, key, layout, width, tensor_max);
            } else {
              column_blocks_kernel<K, R, scalar_t><<<grid_size(layout.num_blocks(), device), kThreads, 0, stream>>>(
                  src, dst, p, key, layout, tensor_max);
            }
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      });
      return;
    }
    if (blocks) {
      // one more slot for the whole tensor's maximum (NVFP4's tensor scale)
      maxima = at::zeros({layout.num_blocks() + 1}, in.options().dtype(at::kInt));
      uint32_t* ptr = reinterpret_cast<uint32_t*>(maxima.mutable_data_ptr<int>());
      block_max_kernel<<<grid_size(n, device), kThreads, 0, stream>>>(src, n, layout, ptr, p.tensor_scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      maxima_ptr = ptr;
    }
    const auto alignment = sizeof(Pack<scalar_t>);
    const bool vectorized = reinterpret_cast<uintptr_t>(src) % alignment == 0 &&
                            reinterpret_cast<uintptr_t>(dst) % alignment == 0;
    dispatch_kind(p.kind, [&](auto kind) {
      dispatch_rounding(mode, [&](auto rounding) {
        quantize_kernel<decltype(kind)::value, decltype(rounding)::value, scalar_t>
            <<<grid_size(vectorized ? n / kVec : n, device), kThreads, 0, stream>>>(src, dst, n, p, key, layout, maxima_ptr,
                                                                           vectorized);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace lowp
