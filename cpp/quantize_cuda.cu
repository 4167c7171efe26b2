// CUDA kernels: grid-stride loops over the same scalar arithmetic as the CPU (rounding.h),
// 4 elements per thread with vector loads when aligned, on the tensor's device and its
// current stream.
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>

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

template <Kind K, Rounding R>
__device__ __forceinline__ float quantize_element(float x, int64_t i, const FormatParams& p, uint64_t key,
                                                  const BlockLayout& L, const uint32_t* maxima) {
  int block_e_q = 0;
  float max_pos = p.max_pos, max_neg = p.max_neg;
  float scale = 0.0f;
  if (K == Kind::Block || K == Kind::Scaled) {
    // maxima[num_blocks]: the whole tensor's, for NVFP4's tensor scale
    const BlockState state = block_state<K>(p, maxima[block_of(i, L)], p.tensor_scale ? maxima[L.num_blocks()] : 0u);
    block_e_q = state.block;
    max_pos = max_neg = state.max_mag;
    scale = state.scale;
  }
  const uint32_t r = R == Rounding::Stochastic ? random_bits(key, static_cast<uint64_t>(counter_of(i, L))) : 0u;
  if (K == Kind::Scaled && p.scale != ScaleKind::E8m0) {
    return float_scaled_fast_applies<R>(p, scale) ? quantize_float_scaled_fast<R>(p, x, scale, r)
                                                  : quantize_float_scaled<R>(p, x, scale, max_pos, r);
  }
  return quantize_value<R>(x, step_exponent<K>(p, x, block_e_q), max_pos, max_neg, p.overflow_inf, r);
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

}  // namespace

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
    if (p.kind == Kind::Block || p.kind == Kind::Scaled) {
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
