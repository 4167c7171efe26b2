// The names under which Python and C++ agree on every setting that crosses between them.
//
// The operators take a format as (kind, params) and a rounding mode as small integers, the
// cheapest things to pass through the dispatcher. Their meaning is fixed here, once: each
// enum's values in order, and the parameter list of each kind of format by name. The module
// lightning_lowp._C exports these lists and lightning_lowp.ops checks at import that Python
// builds its arguments from the same vocabulary, so the two sides cannot drift apart.
#pragma once

#include <cstdint>

#include "rounding.h"

namespace lowp {

// Names of Rounding's values (rounding.h), in order.
constexpr const char* kRoundingNames[] = {"nearest", "nearest_away", "toward_zero", "down", "up", "stochastic"};
// Names of Kind's values (rounding.h), in order.
constexpr const char* kKindNames[] = {"fixed", "float", "block", "scaled"};
// Names of ScaleRule's values (rounding.h), in order.
constexpr const char* kScaleRuleNames[] = {"floor", "ceil", "even", "rceil"};
// Names of ScaleKind's values (rounding.h), in order: what a scaled format's block scale is.
constexpr const char* kScaleKindNames[] = {"e8m0", "fp8_e4m3", "fp32"};

// What a float format's top exponent code means (FloatingPoint.specials).
enum class Specials : int64_t { Ieee = 0, Fn = 1, None = 2 };
constexpr const char* kSpecialsNames[] = {"ieee", "fn", "none"};

// What happens past a float format's largest finite value (FloatingPoint.overflow).
enum class Overflow : int64_t { Inf = 0, Saturate = 1 };
constexpr const char* kOverflowNames[] = {"inf", "saturate"};

// The params list of each kind: the index of each named parameter, then the names in order.
enum FixedParam { kFixedWl, kFixedFl, kFixedClamp, kFixedSymmetric, kFixedParamCount };
constexpr const char* kFixedParamNames[] = {"wl", "fl", "clamp", "symmetric"};

enum FloatParam { kFloatExp, kFloatMan, kFloatSubnormals, kFloatSpecials, kFloatOverflow, kFloatParamCount };
constexpr const char* kFloatParamNames[] = {"exp", "man", "subnormals", "specials", "overflow"};

enum BlockParam { kBlockWl, kBlockDim, kBlockSize, kBlockParamCount };
constexpr const char* kBlockParamNames[] = {"wl", "dim", "block_size"};

// A scaled format: its element's kind (fixed or float) and fields (those of the other kind
// are 0; the element saturates), the blocks (block_size k > 0: runs of k along dim;
// kScaledWholeTensor; kScaledRow: all of dim), the rule of a power-of-two scale
// (scale_rounding; ignored by float scales, which round to nearest), what the scale is
// (scale: a ScaleKind) and whether a float32 tensor scale sits above E4M3 block scales
// (tensor_scale: NVFP4), and tile_rows: 1 for runs, r for (r, block_size) tiles over the
// last two dims.
enum ScaledParam {
  kScaledElementKind,
  kScaledWl,
  kScaledFl,
  kScaledSymmetric,
  kScaledExp,
  kScaledMan,
  kScaledSubnormals,
  kScaledSpecials,
  kScaledDim,
  kScaledBlockSize,
  kScaledScaleRounding,
  kScaledScale,
  kScaledTensorScale,
  kScaledTileRows,
  kScaledParamCount
};
constexpr const char* kScaledParamNames[] = {"element_kind", "wl",         "fl",        "symmetric",
                                             "exp",          "man",        "subnormals", "specials",
                                             "dim",          "block_size", "scale_rounding",
                                             "scale",        "tensor_scale", "tile_rows"};
constexpr int64_t kScaledWholeTensor = 0;
constexpr int64_t kScaledRow = -1;

template <typename T, size_t N>
constexpr size_t count_of(T (&)[N]) {
  return N;
}

static_assert(count_of(kRoundingNames) == static_cast<size_t>(Rounding::Stochastic) + 1, "one name per Rounding");
static_assert(count_of(kKindNames) == static_cast<size_t>(Kind::Scaled) + 1, "one name per Kind");
static_assert(count_of(kScaleRuleNames) == static_cast<size_t>(ScaleRule::Rceil) + 1, "one name per ScaleRule");
static_assert(count_of(kScaleKindNames) == static_cast<size_t>(ScaleKind::Fp32) + 1, "one name per ScaleKind");
static_assert(count_of(kSpecialsNames) == static_cast<size_t>(Specials::None) + 1, "one name per Specials");
static_assert(count_of(kOverflowNames) == static_cast<size_t>(Overflow::Saturate) + 1, "one name per Overflow");
static_assert(count_of(kFixedParamNames) == kFixedParamCount, "one name per fixed-point parameter");
static_assert(count_of(kFloatParamNames) == kFloatParamCount, "one name per floating-point parameter");
static_assert(count_of(kBlockParamNames) == kBlockParamCount, "one name per block floating-point parameter");
static_assert(count_of(kScaledParamNames) == kScaledParamCount, "one name per scaled-format parameter");

}  // namespace lowp
