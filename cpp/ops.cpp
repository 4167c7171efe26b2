// The operators lowp::quantize and lowp::quantize_ (registered with torch.library), and the
// pybind11 module lightning_lowp._C. Arguments arrive validated by lightning_lowp.functional;
// here they become FormatParams / BlockLayout, and tensors are brought to a layout the
// kernels can walk linearly.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/InferenceMode.h>
#include <pybind11/pybind11.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include "quantize.h"
#include "vocabulary.h"

namespace lowp {
namespace {

// The operators can be called directly (torch.ops.lowp.*), bypassing lightning_lowp.functional's
// checks, so every parameter is range-checked here too: out of range, the bit arithmetic of
// the kernels would be undefined.
void check_param(const char* kind, const char* name, int64_t value, int64_t lo, int64_t hi) {
  TORCH_CHECK_VALUE(lo <= value && value <= hi, "lowp::quantize: ", kind, " parameter ", name, "=", value,
                    " is out of range; accepted: ", lo, "..", hi);
}

// The fields of a fixed-point format (also a scaled format's fixed-point element).
void set_fixed(FormatParams& p, const char* kind, int64_t wl, int64_t fl, int64_t clamp, int64_t symmetric) {
  check_param(kind, "wl", wl, 1, 25);
  check_param(kind, "fl", fl, wl - 128, 149);
  check_param(kind, "clamp", clamp, 0, 1);
  check_param(kind, "symmetric", symmetric, 0, 1);
  const float inf = std::numeric_limits<float>::infinity();
  const double step = std::ldexp(1.0, static_cast<int>(-fl));
  const double top = std::ldexp(1.0, static_cast<int>(wl - 1));
  p.e_q = static_cast<int>(-fl);
  p.max_pos = clamp ? static_cast<float>((top - 1) * step) : inf;
  p.max_neg = clamp ? static_cast<float>((symmetric ? top - 1 : top) * step) : inf;
  p.overflow_inf = false;
}

// The fields of a custom float (also a scaled format's float element).
void set_float(FormatParams& p, const char* kind, int64_t exp_bits, int64_t man_bits, int64_t subnormals,
               int64_t specials_code, int64_t overflow) {
  check_param(kind, "exp", exp_bits, 1, 8);
  check_param(kind, "man", man_bits, 0, 23);
  check_param(kind, "subnormals", subnormals, 0, 1);
  check_param(kind, "specials", specials_code, 0, count_of(kSpecialsNames) - 1);
  check_param(kind, "overflow", overflow, 0, count_of(kOverflowNames) - 1);
  const int exp = static_cast<int>(exp_bits), man = static_cast<int>(man_bits);
  const auto specials = static_cast<Specials>(specials_code);
  const int bias = (1 << (exp - 1)) - 1;
  const int top = (1 << exp) - 1 - bias;  // exponent of the all-ones exponent code
  double max_value;
  if (specials == Specials::Ieee) {
    max_value = std::ldexp(2.0 - std::ldexp(1.0, -man), top - 1);
  } else if (specials == Specials::Fn) {  // the all-ones code is NaN
    max_value = man == 0 ? std::ldexp(1.0, top - 1) : std::ldexp(2.0 - std::ldexp(1.0, 1 - man), top);
  } else {
    max_value = std::ldexp(2.0 - std::ldexp(1.0, -man), top);
  }
  p.emin = 1 - bias;
  p.man = man;
  p.subnormals = subnormals != 0;
  p.max_pos = p.max_neg = static_cast<float>(max_value);
  p.overflow_inf = static_cast<Overflow>(overflow) == Overflow::Inf;
}

FormatParams format_params(int64_t kind, at::IntArrayRef a) {
  FormatParams p{};
  TORCH_CHECK_VALUE(kind >= 0 && kind < static_cast<int64_t>(count_of(kKindNames)),
                    "lowp::quantize: kind must be 0 (fixed), 1 (float), 2 (block) or 3 (scaled), got ", kind);
  p.kind = static_cast<Kind>(kind);
  switch (p.kind) {
    case Kind::Fixed:
      TORCH_CHECK_VALUE(a.size() == kFixedParamCount, "lowp::quantize: fixed point takes [wl, fl, clamp, symmetric]");
      set_fixed(p, "fixed", a[kFixedWl], a[kFixedFl], a[kFixedClamp], a[kFixedSymmetric]);
      break;
    case Kind::Float:
      TORCH_CHECK_VALUE(a.size() == kFloatParamCount,
                        "lowp::quantize: floating point takes [exp, man, subnormals, specials, overflow]");
      set_float(p, "float", a[kFloatExp], a[kFloatMan], a[kFloatSubnormals], a[kFloatSpecials], a[kFloatOverflow]);
      break;
    case Kind::Block:
      TORCH_CHECK_VALUE(a.size() == kBlockParamCount, "lowp::quantize: block floating point takes [wl, dim, block_size]");
      check_param("block", "wl", a[kBlockWl], 1, 25);
      check_param("block", "block_size", a[kBlockSize], 0, std::numeric_limits<int32_t>::max());
      p.wl = static_cast<int>(a[kBlockWl]);
      p.overflow_inf = false;
      break;
    case Kind::Scaled: {
      TORCH_CHECK_VALUE(a.size() == kScaledParamCount, "lowp::quantize: a scaled format takes ", kScaledParamCount,
                        " params (see lightning_lowp._C.FORMAT_PARAMS['scaled'])");
      check_param("scaled", "element_kind", a[kScaledElementKind], 0, 1);
      check_param("scaled", "block_size", a[kScaledBlockSize], kScaledRow, std::numeric_limits<int32_t>::max());
      check_param("scaled", "scale_rounding", a[kScaledScaleRounding], 0, count_of(kScaleRuleNames) - 1);
      p.element = static_cast<Kind>(a[kScaledElementKind]);
      if (p.element == Kind::Fixed) {
        set_fixed(p, "scaled", a[kScaledWl], a[kScaledFl], 1, a[kScaledSymmetric]);
        p.element_mbits = static_cast<int>(a[kScaledWl]) - 2;
      } else {
        set_float(p, "scaled", a[kScaledExp], a[kScaledMan], a[kScaledSubnormals], a[kScaledSpecials], 1);
        p.element_mbits = p.man;
      }
      p.element_max = p.max_pos;  // elements saturate at +-max (a fixed-point element's extra negative code unused)
      TORCH_CHECK_VALUE(p.element_max > 0.0f, "lowp::quantize: a scaled format's element must have a positive max");
      int emax;
      std::frexp(p.element_max, &emax);
      p.element_emax = emax - 1;
      TORCH_CHECK_VALUE(p.element_mbits >= 0 && p.element_mbits <= 22,
                        "lowp::quantize: a scaled format's element needs 0..22 mantissa bits");
      p.scale_rule = static_cast<ScaleRule>(a[kScaledScaleRounding]);
      check_param("scaled", "scale", a[kScaledScale], 0, count_of(kScaleKindNames) - 1);
      check_param("scaled", "tensor_scale", a[kScaledTensorScale], 0, 1);
      check_param("scaled", "tile_rows", a[kScaledTileRows], 1, std::numeric_limits<int32_t>::max());
      TORCH_CHECK_VALUE(a[kScaledTileRows] == 1 || a[kScaledBlockSize] > 0,
                        "lowp::quantize: a tile (tile_rows > 1) needs block_size > 0 columns");
      p.scale = static_cast<ScaleKind>(a[kScaledScale]);
      p.tensor_scale = a[kScaledTensorScale] != 0;
      TORCH_CHECK_VALUE(!p.tensor_scale || p.scale == ScaleKind::Fp8E4m3,
                        "lowp::quantize: tensor_scale=1 (NVFP4) needs scale=fp8_e4m3 block scales");
      p.overflow_inf = false;
      break;
    }
  }
  return p;
}

// Stochastic rounding keys come from a CPU generator (the given one, else torch's default),
// so a seed gives the same bits on every device, and drawing a key never waits for a GPU.
int64_t draw_key(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return static_cast<int64_t>(gen->random64());
}

int64_t product(at::IntArrayRef sizes, size_t begin, size_t end) {
  int64_t n = 1;
  for (size_t i = begin; i < end; ++i) n *= sizes[i];
  return n;
}

// The blocks of a block or scaled format on a contiguous tensor of these sizes (see
// BlockLayout): blocking dim `d` (already wrapped), runs of block_size along it (0: block
// floating point's one exponent per index along d), tiles of tile_rows rows over the last
// two dims, or the whole tensor.
BlockLayout block_layout(at::IntArrayRef sizes, int64_t d, int64_t block_size, int64_t tile_rows, bool whole) {
  BlockLayout layout;
  if (whole) {
    layout.inner = product(sizes, 0, sizes.size());
    return layout;
  }
  layout.outer = product(sizes, 0, d);
  layout.dim_size = sizes[d];
  layout.inner = product(sizes, d + 1, sizes.size());
  if (block_size > 0) {
    layout.block_len = block_size;
    layout.blocks_per_outer = (layout.dim_size + block_size - 1) / block_size;
  }
  if (tile_rows > 1) {
    layout.rows = sizes[d - 1];
    layout.tile_rows = tile_rows;
  }
  return layout;
}

void run_kernel(const at::Tensor& in, at::Tensor& out, const FormatParams& p, Rounding mode, uint64_t key,
                const BlockLayout& layout) {
  if (in.is_cuda()) {
#ifdef LOWP_WITH_CUDA
    quantize_cuda(in, out, p, mode, key, layout);
#else
    TORCH_CHECK(false, "lightning_lowp was built without CUDA; reinstall it where nvcc is found");
#endif
  } else {
    quantize_cpu(in, out, p, mode, key, layout);
  }
}

void check_quantize_arguments(const at::Tensor& x, int64_t rounding) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "lowp::quantize: x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(rounding >= 0 && rounding <= 5, "lowp::quantize: rounding must be 0..5, got ", rounding);
}

// Element-wise formats walk memory in storage order whenever in and out share a dense layout.
bool storage_order(const at::Tensor& x, const at::Tensor& out, const FormatParams& p) {
  return p.kind != Kind::Block && p.kind != Kind::Scaled && x.is_non_overlapping_and_dense() &&
         out.strides() == x.strides();
}

// out = quantize(x) with the stochastic-rounding key drawn (x not empty); out may be x itself.
// Never changes out's shape, dtype or layout.
void quantize_with_key(const at::Tensor& x, at::Tensor& out, const FormatParams& p, at::IntArrayRef params,
                       Rounding mode, uint64_t key) {
  const bool blocked = p.kind == Kind::Block || p.kind == Kind::Scaled;
  if (storage_order(x, out, p)) {
    run_kernel(x, out, p, mode, key, BlockLayout{1, 1, x.numel()});
    return;
  }
  // Otherwise the kernels see a contiguous tensor.
  BlockLayout layout{1, 1, x.numel()};
  if (blocked) {
    const bool scaled = p.kind == Kind::Scaled;
    int64_t dim = params[scaled ? kScaledDim : kBlockDim];
    int64_t block_size = params[scaled ? kScaledBlockSize : kBlockSize];
    const int64_t tile_rows = scaled ? params[kScaledTileRows] : 1;
    // Block floating point's dim without block_size: one exponent per index along dim;
    // a scaled format's whole-tensor block: one scale.
    const bool whole = scaled ? block_size == kScaledWholeTensor || x.dim() == 0 : dim == -1 && block_size == 0;
    if (x.dim() == 0) {
      TORCH_CHECK_VALUE(whole || dim == 0 || dim == -1, "lowp::quantize: dim ", dim, " is out of range for a 0-d tensor");
    } else {
      TORCH_CHECK_VALUE(tile_rows == 1 || (x.dim() >= 2 && dim == -1), "lowp::quantize: a (", tile_rows, ", ",
                        block_size, ") tile needs a tensor of at least 2 dims, blocked along dim -1; got ", x.dim(),
                        " dims");
      dim = at::maybe_wrap_dim(dim, x.dim());
      if (scaled && block_size == kScaledRow) block_size = std::max<int64_t>(1, x.size(dim));  // all of dim
      layout = block_layout(x.sizes(), dim, block_size, tile_rows, whole);
    }
  }
  const at::Tensor src = x.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty_like(src, at::MemoryFormat::Contiguous);
  run_kernel(src, dst, p, mode, key, layout);
  if (!dst.is_same(out)) out.copy_(dst);
}

// out = quantize(x), drawing the key from the generator.
void quantize_into(const at::Tensor& x, at::Tensor& out, int64_t kind, at::IntArrayRef params, int64_t rounding,
                   const std::optional<at::Generator>& generator) {
  check_quantize_arguments(x, rounding);
  const FormatParams p = format_params(kind, params);
  const Rounding mode = static_cast<Rounding>(rounding);
  if (x.numel() == 0) return;
  const uint64_t key = mode == Rounding::Stochastic ? static_cast<uint64_t>(draw_key(generator)) : 0;
  quantize_with_key(x, out, p, params, mode, key);
}

at::Tensor quantize(const at::Tensor& x, int64_t kind, at::IntArrayRef params, int64_t rounding,
                    const std::optional<at::Generator>& generator) {
  at::Tensor out = at::empty_like(x);
  quantize_into(x, out, kind, params, rounding, generator);
  return out;
}

// As torch's own in-place ops: an inference tensor is written only in inference mode.
void check_writable(const at::Tensor& t, const char* what) {
  TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), "lowp::", what,
              ": an in-place update to an inference tensor outside InferenceMode is not allowed");
}

void quantize_(at::Tensor& x, int64_t kind, at::IntArrayRef params, int64_t rounding,
               const std::optional<at::Generator>& generator) {
  check_writable(x, "quantize_");
  quantize_into(x, x, kind, params, rounding, generator);
}

// The bytes a tensor's elements span, from its first to past its last (a bound: a strided
// tensor need not touch all of them).
struct Span {
  uintptr_t begin, end;
  size_t index;
  bool written;
};

Span span_of(const at::Tensor& t, size_t index, bool written) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size()), index, written};
}

// No out[i] may share memory with another tensor of the call (x[i] excepted when it is the
// same view: in place): the kernels would read values another tensor's rounding already
// wrote. A sweep over the tensors' spans sorted by address; spans that meet are checked
// element-wise by at::get_overlap_status.
void check_no_overlap(at::TensorList out, at::TensorList x) {
  std::vector<Span> spans;
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i].numel() == 0) continue;
    spans.push_back(span_of(out[i], i, true));
    const bool in_place = out[i].is_same(x[i]) || (out[i].const_data_ptr() == x[i].const_data_ptr() &&
                                                   out[i].strides() == x[i].strides());
    if (!in_place) spans.push_back(span_of(x[i], i, false));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  std::vector<Span> open;
  for (const Span& s : spans) {
    open.erase(std::remove_if(open.begin(), open.end(), [&](const Span& o) { return o.end <= s.begin; }), open.end());
    for (const Span& o : open) {
      if (!s.written && !o.written) continue;  // two tensors that are only read
      const at::Tensor& a = s.written ? out[s.index] : x[s.index];
      const at::Tensor& b = o.written ? out[o.index] : x[o.index];
      TORCH_CHECK_VALUE(at::get_overlap_status(a, b) == at::MemOverlapStatus::No,
                        "lowp::quantize_foreach_: ", s.written ? "out[" : "x[", s.index, "] and ",
                        o.written ? "out[" : "x[", o.index,
                        "] share memory; each output must be its own input (in place) or overlap no other tensor");
    }
    open.push_back(s);
  }
}

// out[i] = quantize(x[i]) for every i, in one call: what a training step needs for all its
// parameters (or gradients, or optimizer states) at once, without a trip through Python and
// the dispatcher per tensor. The same bits as quantize_ on each in turn (stochastic rounding
// draws one key per tensor, in list order). out[i] is x[i] (in place) or does not overlap it.
void quantize_foreach_(at::TensorList out, at::TensorList x, int64_t kind, at::IntArrayRef params, int64_t rounding,
                       const std::optional<at::Generator>& generator) {
  TORCH_CHECK_VALUE(out.size() == x.size(), "lowp::quantize_foreach_: out and x must have the same length, got ",
                    out.size(), " and ", x.size());
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK_VALUE(out[i].sizes() == x[i].sizes() && out[i].scalar_type() == x[i].scalar_type() &&
                          out[i].device() == x[i].device(),
                      "lowp::quantize_foreach_: out[", i, "] and x[", i, "] must match in shape, dtype and device, got ",
                      out[i].sizes(), " ", out[i].scalar_type(), " ", out[i].device(), " and ", x[i].sizes(), " ",
                      x[i].scalar_type(), " ", x[i].device());
    // The dispatcher picks one kernel for the whole list, from the first tensor's device.
    TORCH_CHECK_VALUE(x[i].device() == x[0].device(), "lowp::quantize_foreach_: every tensor must be on one device; x[",
                      i, "] is on ", x[i].device(), ", x[0] on ", x[0].device());
    check_writable(out[i], "quantize_foreach_");
  }
  check_no_overlap(out, x);
#ifdef LOWP_WITH_CUDA
  if (!x.empty() && x[0].is_cuda() && foreach_cuda_kernel()) {
    // Element-wise formats on tensors in storage order: one multi-tensor kernel (launches of
    // many tensors). The keys are drawn in list order, as quantize_into would draw them.
    const FormatParams p = format_params(kind, params);
    const Rounding mode = static_cast<Rounding>(rounding);
    std::vector<ForeachItem> batch;
    for (size_t i = 0; i < out.size(); ++i) {
      check_quantize_arguments(x[i], rounding);
      if (x[i].numel() == 0) continue;
      const uint64_t key = mode == Rounding::Stochastic ? static_cast<uint64_t>(draw_key(generator)) : 0;
      at::Tensor o = out[i];
      if (storage_order(x[i], o, p)) {
        batch.push_back({x[i], o, key});
      } else {
        quantize_with_key(x[i], o, p, params, mode, key);
      }
    }
    quantize_foreach_cuda(batch, p, mode);
    return;
  }
#endif
  for (size_t i = 0; i < out.size(); ++i) {
    at::Tensor o = out[i];
    quantize_into(x[i], o, kind, params, rounding, generator);
  }
}

// ---- the in-place operators under autograd ----------------------------------------------
// As torch's own in-place ops: what they write gets its version counter bumped (so a backward
// that saved it refuses to run), and under grad mode a tensor that requires grad is refused:
// a leaf with torch's message, any other because these operators have no derivative
// (lightning_lowp.quantize_ gives one, straight-through, by writing quantize(x) with copy_).

void check_autograd_write(const at::Tensor& t, const char* what) {
  check_writable(t, what);
  if (!c10::GradMode::is_enabled() || !t.requires_grad()) return;
  TORCH_CHECK(!t.is_leaf(), "lowp::", what,
              ": a leaf Variable that requires grad is being used in an in-place operation.");
  TORCH_CHECK(false, "lowp::", what,
              " has no derivative: to round a tensor that requires grad in place, use lightning_lowp.quantize_ "
              "(straight-through), or torch.no_grad()");
}

void quantize_autograd(at::Tensor& x, int64_t kind, at::IntArrayRef params, int64_t rounding,
                       const std::optional<at::Generator>& generator) {
  check_autograd_write(x, "quantize_");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lowp::quantize_", "")
                             .typed<void(at::Tensor&, int64_t, at::IntArrayRef, int64_t,
                                         const std::optional<at::Generator>&)>();
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(x, kind, params, rounding, generator);
  }
  x.unsafeGetTensorImpl()->bump_version();
}

void quantize_foreach_autograd(at::TensorList out, at::TensorList x, int64_t kind, at::IntArrayRef params,
                               int64_t rounding, const std::optional<at::Generator>& generator) {
  for (const at::Tensor& t : out) check_autograd_write(t, "quantize_foreach_");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lowp::quantize_foreach_", "")
                             .typed<void(at::TensorList, at::TensorList, int64_t, at::IntArrayRef, int64_t,
                                         const std::optional<at::Generator>&)>();
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(out, x, kind, params, rounding, generator);
  }
  for (const at::Tensor& t : out) t.unsafeGetTensorImpl()->bump_version();
}

// The operands of an accumulating GEMM, (B, M, K) and (B, K, N) float32 on one device
// (lightning_lowp.accumulation validates and broadcasts; here the shapes are checked again,
// since the operators can be called directly).
void check_gemm_operands(const char* op, const at::Tensor& a, const at::Tensor& b, int64_t chunk) {
  TORCH_CHECK_VALUE(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, op,
                    ": a and b must be float32, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.dim() == 3 && b.dim() == 3, op, ": a must be (B, M, K) and b (B, K, N), got ", a.sizes(),
                    " and ", b.sizes());
  TORCH_CHECK_VALUE(a.size(0) == b.size(0) && a.size(2) == b.size(1), op, ": a (B, M, K) and b (B, K, N) do not match: ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": a and b must be on one device");
  TORCH_CHECK_VALUE(chunk >= 0, op, ": chunk must be >= 0 (0: no promotion), got ", chunk);
}

// a @ b with low-precision accumulation.
at::Tensor matmul_accumulate(const at::Tensor& a, const at::Tensor& b, int64_t kind, at::IntArrayRef params,
                             int64_t rounding, int64_t chunk, const std::optional<at::Generator>& generator) {
  check_gemm_operands("lowp::matmul_accumulate", a, b, chunk);
  TORCH_CHECK_VALUE(kind == static_cast<int64_t>(Kind::Float),
                    "lowp::matmul_accumulate: the accumulator must be a float format (kind 1), got kind ", kind);
  TORCH_CHECK_VALUE(rounding >= 0 && rounding <= 5, "lowp::matmul_accumulate: rounding must be 0..5, got ", rounding);
  const FormatParams p = format_params(kind, params);
  const Rounding mode = static_cast<Rounding>(rounding);
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  if (out.numel() == 0) return out;
  const uint64_t key = mode == Rounding::Stochastic ? static_cast<uint64_t>(draw_key(generator)) : 0;
  if (a.is_cuda()) {
#ifdef LOWP_WITH_CUDA
    accumulate_cuda(a.contiguous(), b.contiguous(), out, p, mode, chunk, key);
#endif
  } else {
    accumulate_cpu(a.contiguous(), b.contiguous(), out, p, mode, chunk, key);
  }
  return out;
}

// a @ b with the tensor-core accumulator (lightning_lowp.accumulators.AlignedSum).
at::Tensor matmul_aligned(const at::Tensor& a, const at::Tensor& b, int64_t group, int64_t bits, int64_t rounding,
                          int64_t chunk) {
  check_gemm_operands("lowp::matmul_aligned", a, b, chunk);
  TORCH_CHECK_VALUE(group >= 1 && group <= (1 << 16), "lowp::matmul_aligned: group must be 1..65536, got ", group);
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 32, "lowp::matmul_aligned: bits must be 2..32, got ", bits);
  TORCH_CHECK_VALUE(rounding == static_cast<int64_t>(Rounding::Nearest) ||
                        rounding == static_cast<int64_t>(Rounding::TowardZero),
                    "lowp::matmul_aligned: rounding must be 0 (nearest) or 2 (toward_zero), got ", rounding);
  TORCH_CHECK_VALUE(chunk % group == 0, "lowp::matmul_aligned: chunk (", chunk, ") must be a multiple of group (",
                    group, ")");
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  if (out.numel() == 0) return out;
  const bool toward_zero = rounding == static_cast<int64_t>(Rounding::TowardZero);
  if (a.is_cuda()) {
#ifdef LOWP_WITH_CUDA
    aligned_accumulate_cuda(a.contiguous(), b.contiguous(), out, group, static_cast<int>(bits), toward_zero, chunk);
#endif
  } else {
    aligned_accumulate_cpu(a.contiguous(), b.contiguous(), out, group, static_cast<int>(bits), toward_zero, chunk);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(lowp, m) {
  m.def("quantize(Tensor x, int kind, int[] params, int rounding, Generator? generator=None) -> Tensor");
  m.def("quantize_(Tensor(a!) x, int kind, int[] params, int rounding, Generator? generator=None) -> ()");
  m.def(
      "quantize_foreach_(Tensor(a!)[] out, Tensor[] x, int kind, int[] params, int rounding, "
      "Generator? generator=None) -> ()");
  m.def(
      "matmul_accumulate(Tensor a, Tensor b, int kind, int[] params, int rounding, int chunk, "
      "Generator? generator=None) -> Tensor");
  // The key a stochastic quantize call would draw (for tests and reference implementations).
  m.def("matmul_aligned(Tensor a, Tensor b, int group, int bits, int rounding, int chunk) -> Tensor");
  m.def("draw_key(Generator? generator=None) -> int", &draw_key);
}

TORCH_LIBRARY_IMPL(lowp, CPU, m) {
  m.impl("quantize", &quantize);
  m.impl("quantize_", &quantize_);
  m.impl("quantize_foreach_", &quantize_foreach_);
  m.impl("matmul_accumulate", &matmul_accumulate);
  m.impl("matmul_aligned", &matmul_aligned);
}

TORCH_LIBRARY_IMPL(lowp, Autograd, m) {
  m.impl("quantize_", &quantize_autograd);
  m.impl("quantize_foreach_", &quantize_foreach_autograd);
}

#ifdef LOWP_WITH_CUDA
TORCH_LIBRARY_IMPL(lowp, CUDA, m) {
  m.impl("quantize", &quantize);
  m.impl("quantize_", &quantize_);
  m.impl("quantize_foreach_", &quantize_foreach_);
  m.impl("matmul_accumulate", &matmul_accumulate);
  m.impl("matmul_aligned", &matmul_aligned);
}
#endif

}  // namespace lowp

namespace {

template <size_t N>
pybind11::tuple names(const char* const (&list)[N]) {
  pybind11::tuple t(N);
  for (size_t i = 0; i < N; ++i) t[i] = pybind11::str(list[i]);
  return t;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lightning_lowp kernels; the operators live in torch.ops.lowp";
#ifdef LOWP_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  // The shared vocabulary (vocabulary.h): each value's name, in the order of its number.
  m.attr("ROUNDING_MODES") = names(lowp::kRoundingNames);
  m.attr("FORMAT_KINDS") = names(lowp::kKindNames);
  m.attr("SPECIALS") = names(lowp::kSpecialsNames);
  m.attr("OVERFLOWS") = names(lowp::kOverflowNames);
  m.attr("SCALE_ROUNDINGS") = names(lowp::kScaleRuleNames);
  m.attr("SCALES") = names(lowp::kScaleKindNames);
  pybind11::dict params;
  params["fixed"] = names(lowp::kFixedParamNames);
  params["float"] = names(lowp::kFloatParamNames);
  params["block"] = names(lowp::kBlockParamNames);
  params["scaled"] = names(lowp::kScaledParamNames);
  m.attr("FORMAT_PARAMS") = params;
}
