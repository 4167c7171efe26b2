// Scalar rounding arithmetic shared by the CPU and the CUDA kernels.
//
// Every format is handled the same way: for an input x we find the exponent e_q of the
// grid step 2^e_q that the format has around x (fixed for fixed point, per binade for
// floats, per block for block floating point), round |x| to a multiple of that step with
// integer arithmetic on the float32 bits (exact: no double rounding), then apply the
// format's range (saturate, or overflow to Inf the way IEEE 754 does for the mode).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LOWP_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined: a call left in the element loop stops it from vectorising.
#define LOWP_HD inline __attribute__((always_inline))
#else
#define LOWP_HD inline
#endif

namespace lowp {

// The numbering is shared with lightning_lowp/formats.py (ROUNDING_MODES).
enum class Rounding : int { Nearest = 0, NearestAway = 1, TowardZero = 2, Down = 3, Up = 4, Stochastic = 5 };
enum class Kind : int { Fixed = 0, Float = 1, Block = 2, Scaled = 3 };
// How a scaled format's power-of-two (E8M0) block scale follows from the block's amax
// (torchao's ScaleCalculationMode; see scale_exponent).
enum class ScaleRule : int { Floor = 0, Ceil = 1, Even = 2, Rceil = 3 };
// What a scaled format's block scale is: a power of two 2^E (E8M0), or a float s =
// amax / element_max rounded to nearest E4M3 or float32 (see float_block_scale).
enum class ScaleKind : int { E8m0 = 0, Fp8E4m3 = 1, Fp32 = 2 };

constexpr uint32_t kSignBit = 0x80000000u;
constexpr uint32_t kInfBits = 0x7f800000u;

LOWP_HD uint32_t bits_of(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(uint32_t, f);  // unlike memcpy, keeps the value in registers for the vectoriser
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

LOWP_HD float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(float, u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

LOWP_HD int min_int(int a, int b) { return a < b ? a : b; }
LOWP_HD int max_int(int a, int b) { return a > b ? a : b; }

// 2^e for a normal exponent e in [-126, 127].
LOWP_HD float pow2_normal(int e) { return float_of(static_cast<uint32_t>(e + 127) << 23); }

// k * 2^e exactly, for k <= 2^24 and e in [-149, 127] (the product is always a float32
// or overflows to Inf, so splitting the scale in two normal powers never rounds).
LOWP_HD float scale_pow2(uint32_t k, int e) {
  const int e_low = e < -126 ? -24 : 0;
  // via int32: k < 2^31, and signed conversion is the one CPUs vectorise
  return static_cast<float>(static_cast<int32_t>(k)) * pow2_normal(e - e_low) * pow2_normal(e_low);
}

// Counter-based random bits: a keyed hash of the element's index, so any element can be
// drawn independently, in any order, on any device, with the same result.
LOWP_HD uint32_t mix32(uint32_t x) {  // a bijective avalanche mix (lowbias32)
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

LOWP_HD uint32_t random_bits(uint64_t key, uint32_t counter_low, uint32_t counter_high) {
  uint32_t h = mix32(counter_low ^ static_cast<uint32_t>(key));
  h += static_cast<uint32_t>(key >> 32) ^ (counter_high * 0x9e3779b9u);
  return mix32(h);
}

LOWP_HD uint32_t random_bits(uint64_t key, uint64_t counter) {
  return random_bits(key, static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32));
}

// Whether mode R, applied to a value of the given sign, rounds away from zero when it does
// not land on the grid. Decides overflow to Inf vs. to the largest finite value (IEEE 754).
template <Rounding R>
LOWP_HD uint32_t may_round_away(uint32_t negative) {
  if (R == Rounding::TowardZero) return 0u;
  if (R == Rounding::Down) return negative;
  if (R == Rounding::Up) return negative ^ 1u;
  return 1u;
}

// |x| (finite, given by its bits `a`) rounded to a multiple of 2^e_q with mode R, as bits.
// `negative` is 0 or 1; `rbits` are 32 uniform random bits, used by Stochastic only. Written with selects on
// integers instead of branches, so that the CPU loop vectorises and GPU warps do not diverge.
// `above` / `below` (0 or 1; not for Stochastic; for callers whose step is coarser than a's
// last bit): a is a rounded stand-in for an exact value a little above / below it (closer
// than a's last bit).
template <Rounding R>
LOWP_HD uint32_t round_to_step(uint32_t a, int e_q, uint32_t negative, uint32_t rbits, uint32_t above = 0u,
                               uint32_t below = 0u) {
  const uint32_t biased = a >> 23;
  const uint32_t m = (a & 0x7fffffu) | (biased ? 0x800000u : 0u);  // significand
  const int e_lsb = max_int(static_cast<int>(biased), 1) - 150;      // exponent of its last bit
  const int drop = e_q - e_lsb;                                       // bits below the step
  // From 25 dropped bits on, the quotient is 0 and the remainder is below half the step.
  const int d = min_int(max_int(drop, 0), 25);
  const uint32_t rem = m & ((1u << d) - 1u);
  // The remainder doubled, plus what lies above or below a: 2 rem + above - below, against
  // the doubled half step. An exact value just below a multiple of the step borrows from k.
  const uint32_t borrow = static_cast<uint32_t>(rem == 0u) & below;
  const uint32_t k = (m >> d) - borrow;
  const uint32_t rem2 = 2u * rem + above - below + (borrow << (d + 1));
  const uint32_t half2 = 1u << d;
  // inc: 1 to round the magnitude up. For drop <= 0 it is ignored (see the return).
  uint32_t inc = 0;
  if (R == Rounding::Nearest) inc = rem2 + (k & 1u) > half2;  // ties to the even quotient
  if (R == Rounding::NearestAway) inc = rem2 >= half2;
  if (R == Rounding::Down) inc = negative & (rem2 != 0u);
  if (R == Rounding::Up) inc = (negative ^ 1u) & (rem2 != 0u);
  if (R == Rounding::Stochastic) {
    // Up with probability rem / 2^drop: compare with the remainder scaled to 32 bits
    // (exact for drop <= 32; beyond, the probability is below 2^-8 and resolved to 2^-32).
    const uint32_t scaled = rem << min_int(max_int(32 - drop, 0), 31);
    const uint32_t tiny = m >> min_int(max_int(drop - 32, 0), 31);
    inc = rbits < (drop <= 32 ? scaled : tiny);
  }
  const uint32_t rounded = bits_of(scale_pow2(k + inc, min_int(e_q, 127)));
  return drop > 0 ? rounded : a;  // drop <= 0: already on the grid
}

// The rest of one element, once |x| (bits a of u = bits of x) is rounded to `mag`: apply the
// format's range: a magnitude beyond the largest finite one saturates, or (formats with Inf
// codes, overflow="inf") becomes Inf if the mode rounds away from zero (IEEE 754). NaN stays
// NaN; Inf stays Inf where the format has it. Non-negative floats order like their bits, so
// the range check compares integers.
template <Rounding R>
LOWP_HD float apply_range(uint32_t u, uint32_t mag, float max_pos, float max_neg, bool overflow_inf) {
  const uint32_t sign = u & kSignBit;
  const uint32_t a = u ^ sign;
  const uint32_t negative = sign >> 31;
  const uint32_t max_mag = bits_of(negative ? max_neg : max_pos);
  const uint32_t past = (static_cast<uint32_t>(overflow_inf) & may_round_away<R>(negative)) ? kInfBits : max_mag;
  const uint32_t in_range = mag > max_mag ? past : mag;
  const uint32_t special = a > kInfBits || overflow_inf ? u : (sign | max_mag);  // NaN, Inf
  return float_of(a >= kInfBits ? special : (sign | in_range));
}

// One element with step 2^e_q around it: round |x|, then apply the range.
template <Rounding R>
LOWP_HD float quantize_value(float x, int e_q, float max_pos, float max_neg, bool overflow_inf,
                             uint32_t rbits) {
  const uint32_t u = bits_of(x);
  const uint32_t a = u & ~kSignBit;
  return apply_range<R>(u, round_to_step<R>(a, e_q, u >> 31, rbits), max_pos, max_neg, overflow_inf);
}

// ---- per-format grid step -------------------------------------------------------------

// Constants of one format, computed once per call on the host (see ops.cpp).
struct FormatParams {
  Kind kind;
  int e_q;          // Fixed: the constant step exponent (-fl)
  int emin;         // Float: exponent of the smallest normal
  int man;          // Float: mantissa bits
  bool subnormals;  // Float: whether values below 2^emin are on a 2^(emin-man) grid (else 2^emin)
  float max_pos;    // Fixed / Float: largest finite magnitude of each sign
  float max_neg;
  bool overflow_inf;
  int wl;  // Block: word length
  // Scaled: the element format (Fixed or Float, its fields above) and the scale rule.
  Kind element;
  ScaleRule scale_rule;
  int element_emax;     // floor(log2(largest element))
  int element_mbits;    // mantissa bits of the element (fixed point: wl - 2), for ScaleRule::Even
  float element_max;    // largest element
  ScaleKind scale;      // what the block scale is
  bool tensor_scale;    // NVFP4: a float32 tensor scale above E4M3 block scales
};

// Exponent of a custom float's step below its smallest normal.
LOWP_HD int float_small_step_exponent(const FormatParams& p) { return p.subnormals ? p.emin - p.man : p.emin; }

// Step exponent of a custom float around |x| (bits a).
LOWP_HD int float_step_exponent(const FormatParams& p, uint32_t a) {
  const int e = static_cast<int>(a >> 23) - 127;  // float32 subnormals give -127: below every emin
  const int below_normals = p.subnormals ? p.emin - p.man : p.emin;
  return e < p.emin ? below_normals : e - p.man;
}

// Step exponent and largest magnitude of a block whose largest finite magnitude has bits
// `max_bits`: E = floor(log2 max), step 2^(E - wl + 2), range 2^(E+1) - step (rounded down
// to a float32 when the step is finer than float32 itself). An all-zero block and wl = 1
// give range 0.
LOWP_HD void block_step(uint32_t max_bits, int wl, int* e_q, float* max_mag) {
  if (max_bits == 0 || wl == 1) {
    *e_q = -149;
    *max_mag = 0.0f;
    return;
  }
  const uint32_t biased = max_bits >> 23;
  int e;
  if (biased) {
    e = static_cast<int>(biased) - 127;
  } else {
#if defined(__CUDA_ARCH__)
    const int top = 31 - __clz(max_bits);  // highest set bit of a subnormal
#else
    const int top = 31 - __builtin_clz(max_bits);
#endif
    e = top - 149;
  }
  *e_q = e - wl + 2;
  if (e >= -126) {
    *max_mag = float_of((static_cast<uint32_t>(e + 127) << 23) | ((1u << 23) - (1u << (25 - wl))));
  } else {  // in units of 2^-149
    const uint32_t step = *e_q > -149 ? 1u << (*e_q + 149) : 1u;
    *max_mag = float_of((1u << (e + 150)) - step);
  }
}

// The exponent e of a float32 magnitude (bits a, nonzero and finite) with 2^e <= |x| < 2^(e+1),
// subnormals included.
LOWP_HD int exponent_of(uint32_t a) {
  const uint32_t biased = a >> 23;
  if (biased) return static_cast<int>(biased) - 127;
#if defined(__CUDA_ARCH__)
  return 31 - __clz(a) - 149;
#else
  return 31 - __builtin_clz(a) - 149;
#endif
}

// scale_exponent under ScaleRule::Floor (OCP's), without branches, so that a loop over many
// blocks' maxima vectorises: a subnormal's exponent through the float conversion of its bits
// (exact: they are below 2^23).
LOWP_HD int floor_scale_exponent(const FormatParams& p, uint32_t max_bits) {
  const int normal = static_cast<int>(max_bits >> 23) - 127;
  const int subnormal =
      static_cast<int>(bits_of(static_cast<float>(static_cast<int32_t>(max_bits))) >> 23) - 127 - 149;
  const int e = ((max_bits >> 23) ? normal : subnormal) - p.element_emax;
  return max_bits == 0 ? -127 : min_int(max_int(e, -127), 127);
}

// The exponent E of a scaled format's power-of-two block scale 2^E, from the bits of the
// block's largest finite magnitude amax, in -127..127 (E8M0). The rules are torchao's
// ScaleCalculationMode, on the same float32 bits: floor 2^(floor(log2 amax) - emax) (OCP MX
// v1.0); ceil: one more when amax is not a power of two; even: floor after rounding amax's
// significand to the element's mantissa bits (half up); rceil: ceil(log2(amax / max_element))
// with the quotient rounded to float32 first (as the PTX instruction torchao and
// TransformerEngine use on Blackwell). An all-zero block gets the smallest scale.
LOWP_HD int scale_exponent(const FormatParams& p, uint32_t max_bits) {
  int e;
  if (max_bits == 0) return -127;
  switch (p.scale_rule) {
    case ScaleRule::Floor:
      return floor_scale_exponent(p, max_bits);
    case ScaleRule::Ceil:
      e = static_cast<int>(max_bits >> 23) - 127 + ((max_bits & 0x7fffffu) != 0u) - p.element_emax;
      break;
    case ScaleRule::Even:
      e = static_cast<int>((max_bits + (1u << (22 - p.element_mbits))) >> 23) - 127 - p.element_emax;
      break;
    default: {  // Rceil: the exponent of d rounded up to a power of two (PTX cvt.rp...ue8m0)
      const uint32_t d = bits_of(float_of(max_bits) / p.element_max);
      if (d == 0u) return -127;
      const uint32_t below_top = d >> 23 ? (d & 0x7fffffu) : (d & (d - 1u));  // bits below the leading one
      e = exponent_of(d) + (below_top != 0u);
      break;
    }
  }
  return min_int(max_int(e, -127), 127);
}

// Step exponent of a scaled format's element around |x| (bits a), in a block with scale 2^E:
// the element's own step around |x| / 2^E, times 2^E.
LOWP_HD int scaled_step_exponent(const FormatParams& p, uint32_t a, int E) {
  if (p.element == Kind::Fixed) return p.e_q + E;
  const int e = (a & 0x7fffffffu) ? exponent_of(a) - E : -1000;  // zero: below every emin
  const int below_normals = p.subnormals ? p.emin - p.man : p.emin;
  return (e < p.emin ? below_normals : e - p.man) + E;
}

// ---- float block scales (fp32, fp8_e4m3, NVFP4) ----------------------------------------
// A float scale s is not a power of two, so x / s is not exact in float32 and rounding
// float32(x / s) would round twice. Instead every decision about the element q is made
// exactly in double: s has at most 24 significant bits and a grid value g of the element at
// most 25 (an element has at most 23 mantissa bits, a fixed-point element at most 24
// magnitude bits), so g * s is exact in double (and within its range), and so are the
// comparisons of those products with x (a float32, exact in double). float32(x / s), or its
// double version, only says where to look; the checks after it make the result exact.
// The float32 arithmetic of the scales themselves is single IEEE operations (no fused or
// reassociated ones): the same float32 bits as torchao's PyTorch code computes them.

// a + b and a - b, rounded to nearest even; never fused or reassociated.
LOWP_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

LOWP_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

LOWP_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

LOWP_HD uint64_t bits_of_double(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(uint64_t, d);
#else
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
#endif
}

LOWP_HD double double_of(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(double, u);
#else
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
#endif
}

// floor(v), and a * b + c with one rounding, for a float or a double v (the host's and the
// device's own overloads).
template <typename T>
LOWP_HD T floor_of(T v) {
#if defined(__CUDA_ARCH__)
  return floor(v);
#else
  return std::floor(v);
#endif
}

template <typename T>
LOWP_HD T fma_of(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// 2^e as a double, for a normal double exponent e in [-1022, 1023].
LOWP_HD double pow2_double(int64_t e) { return double_of(static_cast<uint64_t>(e + 1023) << 52); }

// The largest E4M3 value (OCP E4M3, "fn": no Inf, 448 = 1.75 * 2^8), its smallest normal
// (torchao's E4M3_EPS, the floor of NVFP4's block scales) and its smallest positive value.
constexpr float kE4m3Max = 448.0f;
constexpr float kE4m3MinNormal = 0.015625f;  // 2^-6
constexpr float kE4m3Tiny = 0.001953125f;    // 2^-9
constexpr float kFloat32Tiny = 1.40129846e-45f;  // 2^-149

// A non-negative float32 v (Inf included) rounded to nearest E4M3, ties to even, saturating
// at 448 (as PyTorch's cast to float8_e4m3fn of a value already clamped to 448). Without
// branches, so that a loop over many blocks' scales vectorises: from E4M3's smallest normal
// 2^-6 up, float32 with its 20 low bits rounded off (ties to even; 448 is on the grid, so
// nothing rounds past it); below, the constant step 2^-9, as the last place of 2^14 + v.
LOWP_HD float round_e4m3(float v) {
  const float c = v < kE4m3Max ? v : kE4m3Max;
  const uint32_t a = bits_of(c);
  const uint32_t normal = (a + 0x7ffffu + ((a >> 20) & 1u)) & ~0xfffffu;
  const float subnormal = add_rn(add_rn(c, 16384.0f), -16384.0f);
  return a < (121u << 23) ? subnormal : float_of(normal);  // 121: 2^-6's biased exponent
}

// The float scale of a block whose largest finite magnitude has bits max_bits (and, for
// NVFP4, the whole tensor's has bits tensor_bits), in float32 operations as torchao does them:
//   fp32:     s = amax / element_max
//   fp8_e4m3: s = e4m3(amax / element_max) (to nearest, saturating at 448)
//   NVFP4:    t = tensor_amax / (448 * element_max)                 (per_tensor_amax_to_scale)
//             s = t * e4m3(clamp((amax / element_max) / t, 2^-6, 448))  (nvfp4_quantize,
//             get_hp_scales: the block's scale is the float32 product of the two)
// s = 0 (an all-zero block, or a scale that underflows) makes every finite element +-0.
// *inf_mag is what +-Inf saturates to: element_max * s, or where s = 0 element_max times the
// smallest positive scale (2^-149; 2^-9; t * 2^-9), as float32. (Selects, not branches: see
// round_e4m3. The tensor's terms do not depend on the block, and the compiler hoists them.)
LOWP_HD void float_block_scale(const FormatParams& p, uint32_t max_bits, uint32_t tensor_bits, float* scale,
                               float* inf_mag) {
  const float amax = float_of(max_bits);
  const float block = div_rn(amax, p.element_max);
  const float t = div_rn(float_of(tensor_bits), static_cast<float>(static_cast<double>(kE4m3Max) * p.element_max));
  const float scaled = div_rn(max_bits ? block : 1.0f, t);  // t = 0 (no finite nonzero value): Inf
  const float clamped = scaled < kE4m3MinNormal ? kE4m3MinNormal : scaled > kE4m3Max ? kE4m3Max : scaled;
  const float s = p.tensor_scale ? mul_rn(t, round_e4m3(clamped))
                  : p.scale == ScaleKind::Fp8E4m3 ? round_e4m3(block)
                                                  : block;
  const float tiny = p.tensor_scale ? mul_rn(t, kE4m3Tiny) : p.scale == ScaleKind::Fp8E4m3 ? kE4m3Tiny : kFloat32Tiny;
  const float result = max_bits ? s : 0.0f;
  *scale = result;
  *inf_mag = static_cast<float>(static_cast<double>(p.element_max) * (result > 0.0f ? result : tiny));
}

// One element of a block with float scale s >= 0 (inf_mag: what +-Inf becomes): the element
// q nearest the exact quotient |x| / s in mode R on the element's grid, saturating at
// element_max, then float32(q * s) with x's sign. NaN stays NaN; s = 0 gives +-0.
//
// With lo = k * step <= |x| / s < hi = lo + step (step: the element's step around |x| / s),
// decided exactly as |x| against lo * s and hi * s:
//   nearest: up when |x| > (lo + step / 2) * s, or equal and k odd (ties to even);
//   nearest_away: up when |x| >= (lo + step / 2) * s; toward_zero: never;
//   down / up: up (in magnitude) when |x| > lo * s and x is negative / positive;
//   stochastic: up when rbits < floor(frac * 2^32), with frac = (|x| - lo * s) / (step * s)
//     the exact real fraction (this is the definition of frac): |x| - lo * s is exact in
//     double, and with s = S * 2^b (S an integer below 2^24), frac * 2^32 is
//     (|x| - lo * s) * 2^(32 - e_step - b) / S, whose floor is found exactly below.
template <Rounding R>
LOWP_HD float quantize_float_scaled(const FormatParams& p, float x, float s, float inf_mag, uint32_t rbits) {
  // Written with selects instead of branches (stand-ins where the result is set at the end),
  // so that the CPU loop can vectorise for the non-stochastic modes.
  const uint32_t u = bits_of(x);
  const uint32_t sign = u & kSignBit;
  const uint32_t a_bits = u ^ sign;
  const bool live = a_bits - 1u < kInfBits - 1u && s > 0.0f;  // finite, nonzero, with a positive scale
  const double a = float_of(live ? a_bits : 0x3f800000u), sd = live ? s : 1.0f;
  const double top = static_cast<double>(p.element_max);
  const double t = a / sd;  // the quotient to within half an ulp of double: where to look
  // Exponents as int64 and doubles throughout: one lane width, which the vectoriser needs.
  // The binade 2^eb <= |x| / s < 2^(eb+1) (float elements): t's, or one below where t rounded
  // up to 2^(eb+1); the step there, or fixed point's constant one (chosen with a mask: a
  // select on the loop-invariant kind does not vectorise).
  int64_t eb = static_cast<int64_t>(bits_of_double(t) >> 52) - 1023;  // t > 0: no sign bit
  eb -= pow2_double(eb) * sd > a ? 1 : 0;
  const int64_t emin = p.emin, below_normals = p.subnormals ? p.emin - p.man : p.emin;
  const int64_t float_step = eb < emin ? below_normals : eb - p.man;
  const int64_t float_mask = p.element == Kind::Float ? -1 : 0;
  const int64_t e_step = (float_step & float_mask) | (static_cast<int64_t>(p.e_q) & ~float_mask);
  const double step = pow2_double(e_step);
  // k = floor(t / step), or one below where t rounded up onto a multiple of the step. Below
  // element_max, k < 2^25; past it, q is set to element_max below.
  double k = floor_of(t * pow2_double(-e_step));
  k -= k * step * sd > a ? 1.0 : 0.0;
  const double lo = k * step;  // exact: few bits
  const double lo_s = lo * sd;  // exact: at most 25 + 24 bits (below element_max)
  const bool negative = sign != 0u;
  bool up = false;
  if (R == Rounding::Nearest || R == Rounding::NearestAway) {
    const double mid_s = (lo + 0.5 * step) * sd;  // exact: at most 26 + 24 bits
    const bool odd = k - 2.0 * floor_of(0.5 * k) != 0.0;
    up = R == Rounding::Nearest ? (a > mid_s || (a == mid_s && odd)) : a >= mid_s;
  }
  if (R == Rounding::Down) up = negative && a > lo_s;
  if (R == Rounding::Up) up = !negative && a > lo_s;
  if (R == Rounding::Stochastic) {
    // threshold = floor(z), z = (|x| - lo * s) * 2^(32 - e_step - b) / S = frac * 2^32 < 2^32.
    // The numerator is exact; c = floor(z rounded to double) is floor(z) or, where z lies
    // just below an integer and rounds up to it, one more: the sign of c * S - numerator,
    // exact through one fused multiply-add, tells (doubles throughout, so it vectorises).
    const uint32_t biased = bits_of(s) >> 23;
    const double big_s = static_cast<double>((bits_of(s) & 0x7fffffu) | (biased ? 0x800000u : 0u));  // s = S * 2^b
    const int64_t b = static_cast<int64_t>(max_int(static_cast<int>(biased), 1)) - 150;
    const double scaled = (a - lo_s) * pow2_double(32 - e_step - b);  // exact, below S * 2^32 <= 2^56
    double c = floor_of(scaled / big_s);
    c -= fma_of(c, big_s, -scaled) > 0.0 ? 1.0 : 0.0;
    up = static_cast<double>(rbits) < c;
  }
  // |x| / s >= element_max (on the grid): every mode saturates there; below, lo + step <= max.
  const double q = a >= top * sd ? top : up ? lo + step : lo;
  const uint32_t mag = live ? bits_of(static_cast<float>(q * sd)) : 0u;  // q * s exact; one rounding
  const uint32_t special = a_bits > kInfBits ? u : sign | bits_of(inf_mag);  // NaN; +-Inf saturates
  return float_of(a_bits >= kInfBits ? special : sign | mag);  // (a zero scale: +-0)
}

// Bits of |x| for the block maximum: finite magnitudes compare as integers; Inf/NaN count 0.
// (A mask rather than a select: GCC vectorises the max-reduction over it.)
LOWP_HD uint32_t finite_magnitude_bits(float x) {
  const uint32_t a = bits_of(x) & ~kSignBit;
  return a & (0u - static_cast<uint32_t>(a < kInfBits));
}

// ---- the FPU's help: round to nearest even and stochastic rounding in fewer operations --
// round_to_step above works for any step and mode in ~35 vector operations per element
// (more for stochastic rounding). For the two modes used in training, a constant step or
// a float's mantissa cut lets float and integer adds do the work in a handful; the results
// are the same bits (the tests compare both with the float64 reference).

// A constant grid step 2^e_q (fixed point, one block, a float's subnormal range) and the
// constants the fast paths need. They apply to e_q in [-149, 103]: there `magic` is a normal
// float and a + magic, below 2 * magic, stays finite.
struct Step {
  float magic;    // 2^(e_q + 23): from here up, every float is a multiple of the step
  float size;     // 2^e_q
  float scale_a;  // scale_a * scale_b = 2^(32 - e_q), split so that each product is exact
  float scale_b;
};

LOWP_HD bool step_is_fast(int e_q) { return e_q >= -149 && e_q <= 103; }

LOWP_HD Step make_step(int e_q) {
  Step s;
  s.magic = pow2_normal(e_q + 23);
  s.size = scale_pow2(1u, e_q);
  s.scale_a = e_q >= -95 ? pow2_normal(32 - e_q) : pow2_normal(64);
  s.scale_b = e_q >= -95 ? 1.0f : pow2_normal(-32 - e_q);
  return s;
}

// |x| (as a float, below magic) rounded to the nearest multiple of the step, ties to even.
// In a + magic the last place is the step, so the addition rounds a to a multiple of it in
// one correctly rounded operation (ties to even, as magic / step is even), and taking magic
// away is exact.
LOWP_HD float round_nearest_below_magic(float a, const Step& s) { return add_rn(add_rn(a, s.magic), -s.magic); }

// The same for any |x|: magnitudes from magic up are multiples of the step already; Inf and
// NaN come out as they went in.
LOWP_HD float round_nearest_step(float a, const Step& s) {
  return a >= s.magic ? a : round_nearest_below_magic(a, s);
}

// |x| (below magic) rounded down to the step, then up by one step if
// rbits < floor(2^32 * frac), where frac = (|x| - down) / step: the rule of round_to_step,
// with exact float arithmetic.
LOWP_HD float round_stochastic_below_magic(float a, const Step& s, uint32_t rbits) {
  const float nearest = round_nearest_below_magic(a, s);
  const float down = nearest > a ? add_rn(nearest, -s.size) : nearest;
  float scaled = (add_rn(a, -down) * s.scale_a) * s.scale_b;
  scaled = scaled < 4294967296.0f ? scaled : 0.0f;  // (NaN or beyond: inputs set aside by the caller)
  const uint32_t threshold = static_cast<uint32_t>(scaled);  // (one instruction with AVX-512)
  return rbits < threshold ? add_rn(down, s.size) : down;
}

LOWP_HD float round_stochastic_step(float a, const Step& s, uint32_t rbits) {
  const float rounded = round_stochastic_below_magic(a, s, rbits);
  return a >= s.magic ? a : rounded;
}

// |x| (bits a) rounded to a custom float with p.man mantissa bits, to nearest even (rbits
// unused) or stochastically. From the smallest normal up, that is float32 with `cut` low
// bits cleared after adding an increment: for nearest even, half a unit of the cut (minus
// one, plus the last kept bit); for stochastic rounding, unit - 1 - (rbits' top cut bits),
// which carries exactly when those bits are below the cut-off remainder. A carry moves into
// the exponent as it should. Below, the step is constant: `small`, the step there.
template <Rounding R>
LOWP_HD uint32_t float_round(const FormatParams& p, uint32_t a, const Step& small, uint32_t rbits) {
  const uint32_t cut = static_cast<uint32_t>(23 - p.man);
  const uint32_t unit_minus_one = (1u << cut) - 1u;
  uint32_t increment;
  float below;
  if (R == Rounding::Stochastic) {
    increment = unit_minus_one - ((rbits >> 1) >> (31 - cut));  // two shifts: cut may be 0
    below = round_stochastic_below_magic(float_of(a), small, rbits);  // used only below 2^emin < magic
  } else {
    // The last kept bit of the significand; with no mantissa bits, the implicit 1.
    const uint32_t last_kept = ((a >> cut) & (cut && cut < 23 ? 1u : 0u)) | (cut == 23 ? 1u : 0u);
    increment = (unit_minus_one >> 1) + last_kept;
    below = round_nearest_below_magic(float_of(a), small);  // used only below 2^emin < magic
  }
  const uint32_t normal = (a + increment) & ~unit_minus_one;
  return a < static_cast<uint32_t>(p.emin + 127) << 23 ? bits_of(below) : normal;
}

// Whether quantize_float_scaled_fast gives quantize_float_scaled's result in a block with
// scale s: scales within 2^-60..2^60 and element steps of at least 2^-30 (so the remainder
// below is exact wherever its sign matters). Stochastic rounding uses the remainder's value
// and more bits: scales from 2^-40 (the remainder is then exact wherever it is used), element
// steps up to 2^30 and at most 2^14 steps per binade (14 mantissa bits; fixed point: 2^14
// steps below the largest element's binade), so that floor(E) below is exact in float32.
template <Rounding R>
LOWP_HD bool float_scaled_fast_applies(const FormatParams& p, float s) {
  const bool fixed = p.element == Kind::Fixed;
  const int smallest_step = fixed ? p.e_q : float_small_step_exponent(p);
  if (R != Rounding::Stochastic) return s >= 0x1p-60f && s <= 0x1p60f && smallest_step >= -30;
  const int largest_step = fixed ? p.e_q : p.element_emax - p.man;
  return s >= 0x1p-40f && s <= 0x1p60f && smallest_step >= -30 && largest_step <= 30 &&
         p.element_emax - largest_step <= 14;
}

// The stochastic rounding of quantize_float_scaled in float32 operations, where
// float_scaled_fast_applies: the exact quotient Q = |x| / s is y + rest / s, with y =
// float32(|x| / s) and rest = |x| - y * s exact (one fused multiply-add). With lo = k * step
// the grid value at or below Q, the threshold floor(2^32 (Q - lo) / step) is
//   D + floor(E),  D = 2^32 (y - lo) / step,  E = 2^32 (rest / s) / step,  |E| <= ulp(y) 2^31 / step,
// where D is an integer (y's last bit is at least 2^-32 steps: wherever y >= step 2^-9); below
// that, y's bits past 2^-32 steps are the floor and |E| is under half of their last place,
// so the threshold is floor(D) + (floor(E) where D is an integer, else 0). floor(E) is
// float32(E) rounded down, less one where that lies above E: the sign of c * s - 2^32 rest /
// step, exact by one fused multiply-add, tells. A negative threshold (y on the grid, Q just
// below) means lo is one step lower, and the threshold 2^32 more: what uint32 wrap-around
// gives. The step is the one around y, which is Q's: y = 2^j would need Q in [2^j - 2^(j-25),
// 2^j), but |x| = Q * s is a float32, and the float32 below 2^j * s lies 2^-24 of it further.
LOWP_HD float quantize_float_scaled_stochastic(const FormatParams& p, float x, float s, uint32_t rbits) {
  const uint32_t u = bits_of(x);
  const uint32_t sign = u & kSignBit;
  const uint32_t a_bits = u ^ sign;
  const float a = float_of(a_bits);
  const float y = div_rn(a, s);
  const float rest = fma_of(-y, s, a);
  const float top = p.element_max;
  const bool saturate = !(y < top || (y == top && rest < 0.0f));  // Q >= top, Inf and NaN included
  const float yc = saturate ? 0.0f : y, rc = saturate ? 0.0f : rest;  // finite stand-ins
  const int eb = static_cast<int>(bits_of(yc) >> 23) - 127;  // Q's binade too (see above)
  // (float_step_exponent's selects in this form, and a mask, not a select on the kind: with
  // those the loop does not vectorise, measured 6x slower)
  const int fixed_mask = p.element == Kind::Fixed ? -1 : 0;
  const int float_step = eb < p.emin ? (p.subnormals ? p.emin - p.man : p.emin) : eb - p.man;
  const int e_step = (p.e_q & fixed_mask) | (float_step & ~fixed_mask);
  const float steps = mul_rn(yc, pow2_normal(-e_step));  // y / step, exact, below 2^15
  const int32_t k = static_cast<int32_t>(steps);
  const float fraction = mul_rn(add_rn(steps, -static_cast<float>(k)), 4294967296.0f);  // exact, below 2^32
  const uint32_t d = static_cast<uint32_t>(fraction);                                   // floor(D)
  const float big_rest = mul_rn(mul_rn(rc, 4294967296.0f), pow2_normal(-e_step));      // 2^32 rest / step, exact
  const float e = div_rn(big_rest, s);  // |E| < 2^23
  float floor_e = floor_of(e);
  floor_e = add_rn(floor_e, fma_of(floor_e, s, -big_rest) > 0.0f ? -1.0f : 0.0f);  // (exact: below 2^23)
  const bool integer = static_cast<float>(d) == fraction;
  const uint32_t threshold = d + (integer ? static_cast<uint32_t>(static_cast<int32_t>(floor_e)) : 0u);
  const int32_t below = d == 0u && integer && floor_e < 0.0f ? 1 : 0;  // lo one step lower
  const int32_t q_steps = k - below + (rbits < threshold ? 1 : 0);
  const float q = saturate ? top : mul_rn(static_cast<float>(q_steps), pow2_normal(e_step));
  const uint32_t mag = bits_of(mul_rn(q, s));
  return a_bits > kInfBits ? x : float_of(sign | mag);  // NaN stays NaN
}

// quantize_float_scaled's result in float32 operations, where float_scaled_fast_applies:
// y = float32(|x| / s), and the remainder |x| - y * s, exact by one fused multiply-add (the
// remainder of a correctly rounded quotient is a float32), says on which side of y the exact
// quotient lies. That sign is all that rounding y to the element's grid, much coarser than
// y's last bit, can miss: where y lands on a midpoint or on the grid itself (round_to_step's
// sticky). Then q * s in one float32 multiplication: exact, rounded once.
// The specials need no case of their own but NaN's: +-0 gives y = 0, so +-0; +-Inf gives
// y = Inf, which saturates to element_max * s, what Inf becomes (float_block_scale's inf_mag,
// as s > 0 here).
// (Stochastic rounding: quantize_float_scaled_stochastic.)
template <Rounding R>
LOWP_HD float quantize_float_scaled_fast(const FormatParams& p, float x, float s, uint32_t rbits) {
  if (R == Rounding::Stochastic) return quantize_float_scaled_stochastic(p, x, s, rbits);
  const uint32_t u = bits_of(x);
  const uint32_t sign = u & kSignBit;
  const uint32_t a_bits = u ^ sign;
  const float a = float_of(a_bits);
  const float y = div_rn(a, s);
  const float rest = fma_of(-y, s, a);  // NaN where y is Inf: then y > top below
  const uint32_t above = rest > 0.0f, below = rest < 0.0f;
  const uint32_t y_bits = bits_of(y);
  const uint32_t top = bits_of(p.element_max);
  uint32_t q;
  bool saturate;
  if (R == Rounding::Nearest) {
    // the exact quotient rounded to odd on float32's bits (y one step toward zero where it lies
    // below y, the last bit set where inexact), then to nearest even on the element's grid by
    // the FPU's shortcuts: 24 bits >= the element's + 2, so that is the correct rounding of the
    // exact quotient (as in add_rounded_nearest_odd). Past the largest element it saturates.
    const uint32_t odd = (y_bits - below) | (above | below);
    const Step small = make_step(p.element == Kind::Fixed ? p.e_q : float_small_step_exponent(p));
    q = p.element == Kind::Fixed ? bits_of(round_nearest_step(float_of(odd), small))
                                 : float_round<Rounding::Nearest>(p, odd, small, 0u);
    saturate = q > top;
  } else {
    // (a mask, not a select on the loop-invariant kind, which does not vectorise)
    const int fixed_mask = p.element == Kind::Fixed ? -1 : 0;
    const int e_q = (p.e_q & fixed_mask) | (float_step_exponent(p, y_bits) & ~fixed_mask);
    q = round_to_step<R>(y_bits, e_q, sign >> 31, 0u, above, below);
    // the exact quotient at or past the largest element: every mode saturates there
    saturate = y_bits > top || (y_bits == top && !below) || q > top;
  }
  const uint32_t mag = bits_of(mul_rn(float_of(saturate ? top : q), s));
  return a_bits > kInfBits ? x : float_of(sign | mag);  // NaN stays NaN
}

// apply_range for the two modes above, which round away from zero when they round up: a
// magnitude beyond the largest finite one overflows to Inf where the format has Inf codes
// and overflow="inf", else saturates. The comparisons are on floats, where NaN passes.
struct Range {
  float max_pos, max_neg;    // largest finite magnitudes of each sign
  float past_pos, past_neg;  // what magnitudes beyond them become
};

LOWP_HD Range make_range(float max_pos, float max_neg, bool overflow_inf) {
  const float inf = float_of(kInfBits);
  return Range{max_pos, max_neg, overflow_inf ? inf : max_pos, overflow_inf ? inf : max_neg};
}

LOWP_HD float apply_range_rounding_up(uint32_t u, uint32_t mag, const Range& range) {
  const uint32_t sign = u & kSignBit;
  const uint32_t a = u ^ sign;
  const float m = float_of(a >= kInfBits ? a : mag);  // Inf and NaN as they came
  const bool negative = static_cast<int32_t>(u) < 0;  // a sign test: a blend keyed on the sign bit
  const float max_mag = negative ? range.max_neg : range.max_pos;
  const float past = negative ? range.past_neg : range.past_pos;
  return float_of(sign | bits_of(m > max_mag ? past : m));
}

// The same for formats that saturate (fixed point, block floating point): a clamp of the
// signed value, as min and max (which pass NaN through).
LOWP_HD float apply_range_saturating(uint32_t u, uint32_t mag, const Range& range) {
  const uint32_t a = u & ~kSignBit;
  const float v = float_of((u & kSignBit) | (a >= kInfBits ? a : mag));  // Inf and NaN as they came
  const float below_top = range.max_pos < v ? range.max_pos : v;
  return -range.max_neg > below_top ? -range.max_neg : below_top;
}


// ---- low-precision accumulation: one addition rounded once -------------------------------
// (lightning_lowp/accumulation_reference.py is the contract; accumulate_cpu.cpp the kernel.)

LOWP_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// floor(+-y * 2^c) modulo 2^32, for y = |e| >= 0 a float32, -95 <= c <= 181 and the value
// within [-2^31, 2^31] (the exact share of e in a stochastic threshold): floor(y * 2^c), or
// with `below` (the value -y * 2^c), -ceil(y * 2^c), as uint32 (two's complement). The
// scaling by powers of two is exact wherever the product is at least 2^-126; below that it
// may round, but there the floor is 0 and the ceiling 1 (y > 0) anyway. In uint32 and int32
// only, so that it vectorises with AVX2.
LOWP_HD uint32_t floor_scaled(float y, int c, uint32_t below) {
  const int c1 = c > 127 ? c - 64 : c;
  const float z = mul_rn(mul_rn(y, pow2_normal(c1)), pow2_normal(c > 127 ? 64 : 0));
  const bool big = z >= 2147483648.0f;  // at most 2^31: exactly 2^31
  const int32_t t = static_cast<int32_t>(big ? 0.0f : z);  // z >= 0: truncation is floor
  const uint32_t fl = big ? kSignBit : static_cast<uint32_t>(t);
  // z from 2^23 on is an integer, and so exactly float(t)
  const uint32_t fraction = static_cast<uint32_t>(z > static_cast<float>(t)) & static_cast<uint32_t>(z < 2147483648.0f);
  const uint32_t cl = fl + fraction + (static_cast<uint32_t>(fl == 0u) & static_cast<uint32_t>(bits_of(y) != 0u));
  return below ? 0u - cl : fl;
}

// The end of one rounded addition (add_rounded and its fast path): the rounded magnitude
// `mag` of s = fl32(acc + p) (bits u) put in the format's range, as apply_range, and the
// special cases. s = +-Inf from finite operands: the exact sum is beyond float32, so beyond
// f's range (Inf where f overflows to Inf and the mode rounds away, else f's largest value).
// NaN / Inf operands: fl32(acc + p), Inf saturating where f has no Inf. An exact zero sum: s.
// Selects on the loop-invariant overflow_inf are written as masks: GCC does not vectorise them.
LOWP_HD float finish_sum(uint32_t mag, uint32_t u, bool operands_finite, const FormatParams& f,
                         uint32_t round_away) {
  const uint32_t sign = u & kSignBit;
  const uint32_t a_raw = u ^ sign;
  const uint32_t max_bits = bits_of(sign ? f.max_neg : f.max_pos);
  const uint32_t inf_mask = 0u - static_cast<uint32_t>(f.overflow_inf);
  const uint32_t past = max_bits ^ ((max_bits ^ kInfBits) & inf_mask & (0u - round_away));
  const uint32_t rounded = sign | (mag > max_bits ? past : mag);
  const uint32_t keep_mask = (0u - static_cast<uint32_t>(a_raw > kInfBits)) | inf_mask;
  const uint32_t special = (u & keep_mask) | ((sign | max_bits) & ~keep_mask);
  const uint32_t zero_mask = 0u - static_cast<uint32_t>(a_raw == 0u);
  const uint32_t overflow_mask = 0u - static_cast<uint32_t>(a_raw == kInfBits);
  const uint32_t finite_mask = 0u - static_cast<uint32_t>(operands_finite);
  uint32_t r = (rounded & ~overflow_mask) | ((sign | past) & overflow_mask);
  r = (r & ~zero_mask) | (u & zero_mask);
  return float_of((r & finite_mask) | (special & ~finite_mask));
}

// The error e of s = fl32(acc + p), so that s + e = acc + p exactly where s is finite
// (Knuth's TwoSum: no ordering of the operands needed).
LOWP_HD float two_sum_error(float acc, float p, float s) {
  const float bb = sub_rn(s, acc);
  return add_rn(sub_rn(acc, sub_rn(s, bb)), sub_rn(p, bb));
}

// acc + p as add_rounded and its fast path see it: TwoSum's s = fl32(acc + p) (bits u) and
// its error e (s + e is the exact sum when s is finite), and where the exact magnitude lies
// against |s|. For s finite and nonzero; elsewhere stand-ins (finish_sum sets the result).
// Masks on integers throughout: mixed bool types stop the vectoriser.
struct ExactSum {
  uint32_t u;         // bits of s
  uint32_t negative;  // s's sign bit
  uint32_t a;         // |s|'s bits (1.0 where s is 0 or not finite)
  uint32_t e_bits;    // e's bits (0 where s is 0 or not finite)
  uint32_t nonzero_e, below, above;  // e != 0; the exact magnitude a little below / above |s|
  bool operands_finite;
};

LOWP_HD ExactSum exact_sum(float acc, float p) {
  const float s = add_rn(acc, p);
  const float e_raw = two_sum_error(acc, p, s);
  ExactSum t;
  t.u = bits_of(s);
  t.negative = t.u >> 31;
  const uint32_t a_raw = t.u & ~kSignBit;
  t.operands_finite = ((bits_of(acc) & ~kSignBit) < kInfBits) & ((bits_of(p) & ~kSignBit) < kInfBits);
  const uint32_t live_mask = 0u - static_cast<uint32_t>(a_raw - 1u < kInfBits - 1u);
  t.a = (a_raw & live_mask) | (0x3f800000u & ~live_mask);
  t.e_bits = bits_of(e_raw) & live_mask;
  t.nonzero_e = (t.e_bits & ~kSignBit) != 0u;
  t.below = t.nonzero_e & ((t.e_bits >> 31) ^ t.negative);
  t.above = t.nonzero_e ^ t.below;
  return t;
}

// acc + p rounded once, from the exact sum, to the float format f in mode R (acc on f's
// grid, p any float32; rbits: 32 random bits, Stochastic only). Exactly
// accumulation_reference._add:
//   * TwoSum gives s = fl32(acc + p) and the error e with s + e the exact sum (when s is
//     finite); |e| is at most half of s's last place, so it only says whether the exact
//     magnitude lies a little above or below |s| (round_to_step's above / below), except
//     for stochastic rounding, whose threshold floor(2^32 * frac) takes e's exact share;
//   * the step is the one of the exact value's binade: just below a power of two |s|, that
//     is the binade below (with a finer step, or, under a format's smallest normal without
//     subnormals, a coarser one);
//   * where f's grid is float32's own around the sum (23 mantissa bits), the neighbours are
//     |s|'s float32 neighbours, taken on the bits;
//   * an exact zero sum is s itself (+0, or -0 for -0 + -0, as float32 rounds it); a finite
//     sum beyond float32 (s = +-Inf) is beyond f's range: Inf or f's largest value as for a
//     rounding; NaN / Inf operands give fl32(acc + p), Inf saturating where f has no Inf.
template <Rounding R>
LOWP_HD float add_rounded(float acc, float p, const FormatParams& f, uint32_t rbits) {
  const ExactSum t = exact_sum(acc, p);
  const uint32_t u = t.u, negative = t.negative, a = t.a, e_bits = t.e_bits;
  const uint32_t nonzero_e = t.nonzero_e, below = t.below, above = t.above;
  const bool operands_finite = t.operands_finite;
  // The exact magnitude lies in [a - 1, a + 1] (bits); a - below is in its binade.
  const int e_q = float_step_exponent(f, a - below);
  const uint32_t biased = a >> 23;
  const uint32_t m = (a & 0x7fffffu) | (biased ? 0x800000u : 0u);
  const int e_lsb = max_int(static_cast<int>(biased), 1) - 150;
  const int drop = e_q - e_lsb;  // >= -1; <= 0 only where f's grid is float32's
  uint32_t mag;
  if (R == Rounding::Stochastic) {
    // threshold = floor(2^32 * frac) = rem * 2^(32 - drop) + floor(+-|e| * 2^(32 - e_q)), and
    // where that is negative (rem = 0, e below) the lower neighbour is one step down and
    // 2^32 more: the sum modulo 2^32. e != 0 only for drop <= 25 (a rounded sum is no smaller
    // than half its larger operand, itself on the grid or coarser than half a step), where
    // rem * 2^(32 - drop) is 0 exactly when rem is.
    const int d = min_int(max_int(drop, 0), 25);
    const uint32_t rem = m & ((1u << d) - 1u);
    const uint32_t fine = rem << min_int(max_int(32 - drop, 0), 31);
    const uint32_t tiny = m >> min_int(max_int(drop - 32, 0), 31);
    const uint32_t positive_drop = 0u - static_cast<uint32_t>(drop > 0);
    const uint32_t scaled = (drop <= 32 ? fine : tiny) & positive_drop;
    const uint32_t threshold = scaled + floor_scaled(float_of(e_bits & ~kSignBit), 32 - e_q, below);
    const uint32_t borrow = below & static_cast<uint32_t>(scaled == 0u);
    const uint32_t inc = static_cast<uint32_t>(rbits < threshold);
    const uint32_t on_grid = a - borrow + inc;  // drop <= 0: float32's neighbours
    const uint32_t coarse = bits_of(scale_pow2((m >> d) - borrow + inc, min_int(e_q, 127)));
    mag = drop <= 0 ? on_grid : coarse;
  } else {
    // drop <= 0: s = RN(exact) is f's nearest; the other modes move to the float32 neighbour
    // on e's side where they round that way.
    const float step = scale_pow2(1u, max_int(e_q, -149));
    const float e_mag = float_of(e_bits & ~kSignBit);
    const uint32_t tie = above & static_cast<uint32_t>(add_rn(e_mag, e_mag) == step);
    uint32_t inc = 0u;  // relative to a - below
    if (R == Rounding::Nearest) inc = below;
    if (R == Rounding::NearestAway) inc = below | tie;
    if (R == Rounding::Down) inc = negative & nonzero_e;
    if (R == Rounding::Up) inc = (negative ^ 1u) & nonzero_e;
    const uint32_t on_grid = a - below + inc;
    mag = drop <= 0 ? on_grid : round_to_step<R>(a, e_q, negative, rbits, above, below);
  }
  return finish_sum(mag, u, operands_finite, f, may_round_away<R>(negative));
}

// add_rounded<Nearest> in fewer operations, for formats with at most 22 mantissa bits (so
// that f's step is coarser than s's last bit wherever s is normal for f): the same bits.
// s = fl32(acc + p) rounded to nearest even on f's grid (the bit trick of float_round from
// f's smallest normal up, the magic-number addition below it) is the exact sum's nearest
// except where s itself lies on a midpoint of f's grid and e != 0: there the exact sum is on
// e's side of the midpoint. (Elsewhere |e|, under half of s's last bit, cannot cross a
// midpoint or a grid point that decides.) `small`: make_step(float_small_step_exponent(f)).
LOWP_HD float add_rounded_nearest_fast(float acc, float p, const FormatParams& f, const Step& small) {
  const ExactSum t = exact_sum(acc, p);
  const uint32_t u = t.u, a = t.a, nonzero_e = t.nonzero_e, above = t.above;
  const bool operands_finite = t.operands_finite;
  // from f's smallest normal up: clear `cut` bits after adding half a unit (minus one, plus
  // the last kept bit); on a midpoint with e != 0, e's side
  const uint32_t cut = static_cast<uint32_t>(23 - f.man);  // 1..23
  const uint32_t unit_minus_one = (1u << cut) - 1u;
  const uint32_t last_kept = ((a >> cut) & (cut < 23 ? 1u : 0u)) | (cut == 23 ? 1u : 0u);
  const uint32_t even = (a + (unit_minus_one >> 1) + last_kept) & ~unit_minus_one;
  const uint32_t midpoint = static_cast<uint32_t>((a & unit_minus_one) == ((unit_minus_one >> 1) + 1u)) & nonzero_e;
  const uint32_t normal = midpoint ? (a & ~unit_minus_one) + (above << cut) : even;
  // below it: the constant step; |s| +- half a step is exact there (f has <= 22 mantissa bits)
  const float mag_f = float_of(a);
  const float rounded_small = round_nearest_below_magic(mag_f, small);
  const float half = mul_rn(small.size, 0.5f);
  const float off = sub_rn(mag_f, rounded_small);
  const uint32_t midpoint_small = static_cast<uint32_t>((off == half) | (off == -half)) & nonzero_e;
  const float sided = above ? add_rn(mag_f, half) : sub_rn(mag_f, half);
  const uint32_t low = bits_of(midpoint_small ? sided : rounded_small);
  const uint32_t mag = a < static_cast<uint32_t>(f.emin + 127) << 23 ? low : normal;
  return finish_sum(mag, u, operands_finite, f, 1u);  // nearest rounds away from zero past the range
}

// add_rounded<Nearest> in the fewest operations, for formats with at most 21 mantissa bits
// and a smallest step of at least 2^-147: the exact sum rounded to odd on float32's grid
// (|s|, one step toward zero where the exact sum lies below it, with the last bit set where
// it is inexact) keeps two bits below f's last one and a sticky bit, so rounding it to
// nearest even on f's grid rounds the exact sum (the round-to-odd theorem, Boldo and
// Melquiond 2008): on the bits from f's smallest normal up, by the magic-number addition
// below it. Past f's range as finish_sum does for nearest; Inf and NaN as add_rounded.
struct NearestOdd {
  uint32_t cut;                 // 23 - man: float32 bits below f's last one (from f's smallest normal up)
  Step small;                   // f's step below its smallest normal
  uint32_t normal_bits;         // bits of 2^emin
  uint32_t max_pos, max_neg;    // bits of f's largest finite magnitudes
  uint32_t past_pos, past_neg;  // what a magnitude beyond them becomes: Inf's bits, or theirs
};

LOWP_HD NearestOdd make_nearest_odd(const FormatParams& f) {
  NearestOdd k;
  k.cut = static_cast<uint32_t>(23 - f.man);
  k.small = make_step(float_small_step_exponent(f));
  k.normal_bits = static_cast<uint32_t>(f.emin + 127) << 23;
  k.max_pos = bits_of(f.max_pos);
  k.max_neg = bits_of(f.max_neg);
  k.past_pos = f.overflow_inf ? kInfBits : k.max_pos;
  k.past_neg = f.overflow_inf ? kInfBits : k.max_neg;
  return k;
}

LOWP_HD float add_rounded_nearest_odd(float acc, float p, const NearestOdd& k) {
  const float s = add_rn(acc, p);
  const float e = two_sum_error(acc, p, s);
  const uint32_t u = bits_of(s), e_bits = bits_of(e);
  const uint32_t sign = u & kSignBit, a_raw = u ^ sign;
  const uint32_t inexact = static_cast<uint32_t>((e_bits & ~kSignBit) != 0u);
  const uint32_t below = inexact & ((e_bits ^ u) >> 31);
  const uint32_t odd = (a_raw - below) | inexact;  // the exact magnitude rounded to odd
  const uint32_t unit_minus_one = (1u << k.cut) - 1u;
  const uint32_t even = (odd + (unit_minus_one >> 1) + ((odd >> k.cut) & 1u)) & ~unit_minus_one;
  const uint32_t low = bits_of(round_nearest_below_magic(float_of(odd), k.small));
  const uint32_t rounded = odd < k.normal_bits ? low : even;
  const uint32_t max_bits = sign ? k.max_neg : k.max_pos, past = sign ? k.past_neg : k.past_pos;
  const uint32_t in_range = rounded > max_bits ? past : rounded;
  // s = +-Inf (Inf operands, or a finite sum past float32's range) is past f's range; NaN stays
  const uint32_t mag = a_raw > kInfBits ? a_raw : (a_raw == kInfBits ? past : in_range);
  return float_of(sign | mag);
}

LOWP_HD bool nearest_odd_applies(const FormatParams& f) {
  return f.man <= 21 && float_small_step_exponent(f) >= -147;
}

// Whether f is IEEE binary16 (fp16, float(5,10)): the format that processors convert to.
LOWP_HD bool is_binary16(const FormatParams& f) {
  return f.kind == Kind::Float && f.man == 10 && f.emin == -14 && f.subnormals && f.overflow_inf &&
         f.max_pos == 65504.0f && f.max_neg == 65504.0f;
}

// Whether f has float32's range: 8 exponent bits with subnormals and Inf (bf16, float(8,m)),
// so that its grid is float32's bits with the low 23 - man cleared, all the way down.
LOWP_HD bool has_float32_range(const FormatParams& f) {
  const uint32_t largest = kInfBits - (1u << (23 - f.man));
  return f.emin == -126 && f.subnormals && f.overflow_inf && bits_of(f.max_pos) == largest &&
         bits_of(f.max_neg) == largest;
}

// add_rounded_nearest_odd for a format with float32's range (has_float32_range, man <= 21):
// ties to even on the bits of the exact sum rounded to odd, sign and all (the sign bit is not
// reached: the largest magnitude rounds to Inf's bits); overflow of the sum rounds to Inf as
// the format does, and Inf and NaN pass.
LOWP_HD float add_rounded_nearest_odd_wide(float acc, float p, uint32_t cut) {
  const float s = add_rn(acc, p);
  const float e = two_sum_error(acc, p, s);
  const uint32_t u = bits_of(s), e_bits = bits_of(e);
  const uint32_t inexact = static_cast<uint32_t>((e_bits & ~kSignBit) != 0u);
  const uint32_t below = inexact & ((e_bits ^ u) >> 31);
  const uint32_t odd = (u - below) | inexact;  // sign and magnitude: u - 1 is one step toward zero
  const uint32_t unit_minus_one = (1u << cut) - 1u;
  const uint32_t even = (odd + (unit_minus_one >> 1) + ((odd >> cut) & 1u)) & ~unit_minus_one;
  return (u & ~kSignBit) < kInfBits ? float_of(even) : s;
}

// add_rounded<Stochastic> for a format with float32's range (has_float32_range, man <= 21),
// whose grid is float32's bits with the low `cut` cleared in every binade: the grid point at
// or below the exact magnitude X = |s| + e is base = (|s| - below) with those bits cleared (one
// float below |s| first where X lies just below it, which may be the binade below), and
// floor(2^32 * (X - base) / step) = (|s| - base) * 2^(32 - cut) + floor(e * 2^(32 - e_q)) modulo
// 2^32 (the first term is 2^32, i.e. 0, exactly where X lies just below a grid point). Zeros,
// Inf and NaN give s, as add_rounded does for this kind of format.
LOWP_HD float add_rounded_stochastic_wide(float acc, float p, uint32_t cut, uint32_t rbits) {
  const float s = add_rn(acc, p);
  const float e = two_sum_error(acc, p, s);
  const uint32_t u = bits_of(s), e_bits = bits_of(e);
  const uint32_t sign = u & kSignBit, a = u ^ sign;
  const uint32_t e_mag_bits = e_bits & ~kSignBit;
  const uint32_t inexact = static_cast<uint32_t>(e_mag_bits != 0u);
  const uint32_t below = inexact & ((e_bits ^ u) >> 31);
  const uint32_t at = a - below;  // in X's binade
  const uint32_t base = at & ~((1u << cut) - 1u);
  const int e_q = max_int(static_cast<int>(at >> 23), 1) - 150 + static_cast<int>(cut);
  // z = |e| * 2^(32 - e_q) < 2^(31 - cut), in two exact steps (the exponent may pass 127)
  const int c = 32 - e_q, c1 = min_int(c, 127);
  const float z = mul_rn(mul_rn(float_of(e_mag_bits), pow2_normal(c1)), pow2_normal(c - c1));
  const int32_t z_floor = static_cast<int32_t>(z);  // z >= 0: truncation is floor
  const uint32_t z_up = static_cast<uint32_t>(z > static_cast<float>(z_floor));
  const uint32_t below_mask = 0u - below;  // (masks rather than selects: the loops vectorise)
  const uint32_t e_part = ((0u - (static_cast<uint32_t>(z_floor) + z_up)) & below_mask) |
                          (static_cast<uint32_t>(z_floor) & ~below_mask);
  const uint32_t threshold = ((a - base) << (32u - cut)) + e_part;
  const uint32_t mag = base + (static_cast<uint32_t>(rbits < threshold) << cut);
  const uint32_t live = 0u - static_cast<uint32_t>(a - 1u < kInfBits - 1u);  // not zero, Inf or NaN
  return float_of(((sign | mag) & live) | (u & ~live));
}

// The tensor-core accumulator (lightning_lowp.accumulators.AlignedSum; the contract is
// accumulation_reference.reference_aligned_matmul). Per group of products, the accumulator
// and the products are aligned to the largest exponent among them, each truncated toward
// zero to `bits` bits from that exponent down, summed exactly and stored into float32.

// The exponent floor(log2|x|) of a nonzero finite float; kNoExponent for zeros, Inf and NaN
// (which take no part in the alignment).
// Written with masks, so that the CPU loops over it vectorise (a select or a count of leading
// zeros does not): a subnormal's exponent is that of its bits read as an integer and converted
// to float (exactly), less 149.
constexpr int kNoExponent = -1000;
LOWP_HD int aligned_exponent(float x) {
  const uint32_t a = bits_of(x) & ~kSignBit;
  const int biased = static_cast<int>(a >> 23);
  const int subnormal = static_cast<int>(bits_of(static_cast<float>(static_cast<int32_t>(a))) >> 23) - 127 - 149;
  const int normal = -static_cast<int>(biased != 0);
  const int e = ((biased - 127) & normal) | (subnormal & ~normal);
  const int none = -static_cast<int>(a - 1u >= kInfBits - 1u);  // zero, Inf or NaN
  return (kNoExponent & none) | (e & ~none);
}

// x truncated toward zero to a multiple of 2^q, exactly (a float: the bits below 2^q of its
// significand cleared; the sign kept, so a negative x under 2^q becomes -0). Zeros, Inf and
// NaN pass unchanged.
LOWP_HD float truncate_to_step(float x, int q) {
  const uint32_t u = bits_of(x), a = u & ~kSignBit;
  const uint32_t biased = a >> 23;
  const int cut = q - (max_int(static_cast<int>(biased), 1) - 150);  // bits of a below 2^q
  const uint32_t kept = cut >= 24 ? 0u : a & (0xffffffffu << max_int(cut, 0));
  const uint32_t normal_gone = static_cast<uint32_t>(biased != 0u && cut > 23);
  const uint32_t mag = (a >= kInfBits || cut <= 0) ? a : (normal_gone ? 0u : kept);
  return float_of((u & kSignBit) | mag);
}

// The exact sum s (a double) stored into float32, rounded to nearest even or toward zero.
template <bool TowardZero>
LOWP_HD float store_float32(double s) {
#if defined(__CUDA_ARCH__)
  return TowardZero ? __double2float_rz(s) : __double2float_rn(s);
#else
  const float f = static_cast<float>(s);  // to nearest even (Inf past the range)
  if (!TowardZero) return f;
  const double f_mag = f < 0.0f ? -static_cast<double>(f) : static_cast<double>(f);
  const double s_mag = s < 0.0 ? -s : s;
  // One float32 step toward zero where nearest rounded the magnitude up (Inf: to the largest).
  return f_mag > s_mag ? float_of(bits_of(f) - 1u) : f;
#endif
}

}  // namespace lowp
