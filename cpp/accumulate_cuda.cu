// Low-precision accumulation on CUDA: one thread per output element, the products added in k
// order by the same scalar functions as the CPU kernels (add_rounded, aligned_exponent,
// truncate_to_step, store_float32 in rounding.h), so the bits are the CPU's and the
// reference's. Warps cover consecutive output columns: loads of b are coalesced, a's element
// is shared. Products are multiplied with __fmul_rn (mul_rn): never fused into the addition.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "quantize.h"

namespace lowp {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t{1} << 20));
}

template <Rounding R>
__global__ void accumulate_kernel(const float* a, const float* b, float* out, int64_t M, int64_t K, int64_t N,
                                  int64_t total, FormatParams f, int64_t chunk, uint64_t key) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / N, n = i % N;  // row = batch * M + m
    const float* a_row = a + row * K;
    const float* b_col = b + (row / M) * K * N + n;
    float acc = 0.0f, acc32 = 0.0f;
    int64_t since_promotion = 0;
    for (int64_t k = 0; k < K; ++k) {
      const uint32_t r = R == Rounding::Stochastic ? random_bits(key, static_cast<uint64_t>(i * K + k)) : 0u;
      acc = add_rounded<R>(acc, mul_rn(a_row[k], b_col[k * N]), f, r);
      if (chunk > 0 && ++since_promotion == chunk) {
        since_promotion = 0;
        acc32 = add_rn(acc32, acc);
        acc = 0.0f;
      }
    }
    out[i] = chunk > 0 ? add_rn(acc32, acc) : acc;
  }
}

template <bool TowardZero>
__global__ void aligned_kernel(const float* a, const float* b, float* out, int64_t M, int64_t K, int64_t N,
                               int64_t total, int64_t group, int bits, int64_t chunk) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / N, n = i % N;
    const float* a_row = a + row * K;
    const float* b_col = b + (row / M) * K * N + n;
    float acc = 0.0f, acc32 = 0.0f;
    int64_t since_promotion = 0;
    for (int64_t k0 = 0; k0 < K; k0 += group) {
      const int64_t k1 = k0 + group < K ? k0 + group : K;
      int e_max = aligned_exponent(acc);
      for (int64_t k = k0; k < k1; ++k) e_max = max_int(e_max, aligned_exponent(mul_rn(a_row[k], b_col[k * N])));
      const int q = e_max - bits + 1;
      double sum = truncate_to_step(acc, q);
      for (int64_t k = k0; k < k1; ++k) sum += truncate_to_step(mul_rn(a_row[k], b_col[k * N]), q);
      acc = store_float32<TowardZero>(sum);
      since_promotion += k1 - k0;
      if (chunk > 0 && since_promotion == chunk) {
        since_promotion = 0;
        acc32 = add_rn(acc32, acc);
        acc = 0.0f;
      }
    }
    out[i] = chunk > 0 ? add_rn(acc32, acc) : acc;
  }
}

}  // namespace

void accumulate_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const FormatParams& f, Rounding mode,
                     int64_t chunk, uint64_t key) {
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The key is drawn on the host: a captured graph would replay the same random bits forever.
  TORCH_CHECK(mode != Rounding::Stochastic ||
                  c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "lowp::matmul_accumulate: stochastic rounding cannot run under CUDA graph capture (every replay would "
              "reuse the random bits drawn at capture)");
  const int64_t M = a.size(1), K = a.size(2), N = b.size(2), total = out.numel();
  dispatch_rounding(mode, [&](auto rounding) {
    accumulate_kernel<decltype(rounding)::value><<<grid_for(total), kThreads, 0, stream>>>(
        a.const_data_ptr<float>(), b.const_data_ptr<float>(), out.mutable_data_ptr<float>(), M, K, N, total, f, chunk,
        key);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void aligned_accumulate_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, int64_t group, int bits,
                             bool toward_zero, int64_t chunk) {
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t M = a.size(1), K = a.size(2), N = b.size(2), total = out.numel();
  const float* a_data = a.const_data_ptr<float>();
  const float* b_data = b.const_data_ptr<float>();
  float* out_data = out.mutable_data_ptr<float>();
  if (toward_zero) {
    aligned_kernel<true><<<grid_for(total), kThreads, 0, stream>>>(a_data, b_data, out_data, M, K, N, total, group,
                                                                   bits, chunk);
  } else {
    aligned_kernel<false><<<grid_for(total), kThreads, 0, stream>>>(a_data, b_data, out_data, M, K, N, total, group,
                                                                    bits, chunk);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lowp
