// The float32 shortcuts for elements of blocks with float scales (rounding.h:
// quantize_float_scaled_fast, quantize_float_scaled_stochastic) against the float64 path they
// stand in for (quantize_float_scaled, which the Python tests hold to the reference), bit for
// bit, in every rounding mode. Stochastic rounding is checked where it can go wrong by one:
// at each value's exact threshold T (up iff the random bits are below T), which bisection on
// the float64 path finds, and one either side. Random bits drawn by the kernels would meet
// a threshold's neighbourhood once in 2^31 draws.
//
// Built and run by test_rounding_shortcuts.py; prints a summary, exits 1 on a difference.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "rounding.h"

using namespace lowp;

namespace {

FormatParams float_element(int exp, int man, float max_value) {
  FormatParams p{};
  p.kind = Kind::Scaled;
  p.element = Kind::Float;
  p.emin = 2 - (1 << (exp - 1));
  p.man = man;
  p.subnormals = true;
  p.element_max = max_value;
  p.element_emax = static_cast<int>(std::floor(std::log2(max_value)));
  p.element_mbits = man;
  p.scale = ScaleKind::Fp32;
  return p;
}

FormatParams fixed_element(int wl, int fl) {
  FormatParams p{};
  p.kind = Kind::Scaled;
  p.element = Kind::Fixed;
  p.e_q = -fl;
  p.element_max = std::ldexp(static_cast<float>((1 << (wl - 1)) - 1), -fl);
  p.element_emax = static_cast<int>(std::floor(std::log2(p.element_max)));
  p.element_mbits = wl - 2;
  p.scale = ScaleKind::Fp32;
  return p;
}

// Values around the grid of the element times s: grid-like values times s and their float32
// neighbours, powers of two times s, tiny quotients, plain values, and the specials.
float sample(std::mt19937_64& g, float s) {
  const auto toward = [&](float v) { return std::nextafter(v, (g() & 1) ? INFINITY : 0.0f); };
  float x;
  switch (g() % 5) {
    case 0:
      x = toward(static_cast<float>(std::ldexp(static_cast<double>(g() % 64), static_cast<int>(g() % 12) - 8) * s));
      if (g() & 1) x = toward(x);
      break;
    case 1:
      x = static_cast<float>(s * std::ldexp(1.0 + (g() % 1024) / 1024.0, -static_cast<int>(g() % 40) - 1));
      break;
    case 2:
      x = static_cast<float>(std::ldexp(1.0, static_cast<int>(g() % 30) - 20) * s);
      if (g() & 1) x = toward(x);
      break;
    case 3:
      x = static_cast<float>(s * std::ldexp((g() % 100000) / 100000.0, static_cast<int>(g() % 20) - 10));
      break;
    default: {
      const uint32_t specials[] = {0u, kInfBits, 0x7fc00000u, 1u, 0x00800000u};
      x = float_of(specials[g() % 5]);
    }
  }
  return (g() & 1) ? -x : x;
}

template <Rounding R>
bool same(const FormatParams& p, float x, float s, uint32_t rbits, long* checked) {
  const float inf_mag = static_cast<float>(static_cast<double>(p.element_max) * s);
  const float fast = quantize_float_scaled_fast<R>(p, x, s, rbits);
  const float exact = quantize_float_scaled<R>(p, x, s, inf_mag, rbits);
  ++*checked;
  if (bits_of(fast) == bits_of(exact) || (std::isnan(fast) && std::isnan(exact))) return true;
  std::printf("mode %d s=%a x=%a rbits=%08x: shortcut %a, float64 path %a\n", static_cast<int>(R), s, x, rbits,
              fast, exact);
  return false;
}

// The smallest rbits that rounds down (the threshold), by bisection on the float64 path.
uint64_t threshold_of(const FormatParams& p, float x, float s) {
  const float inf_mag = static_cast<float>(static_cast<double>(p.element_max) * s);
  const uint32_t down = bits_of(quantize_float_scaled<Rounding::Stochastic>(p, x, s, inf_mag, 0xffffffffu));
  uint64_t lo = 0, hi = 1ull << 32;
  while (lo < hi) {
    const uint64_t mid = (lo + hi) / 2;
    const uint32_t v = bits_of(quantize_float_scaled<Rounding::Stochastic>(p, x, s, inf_mag, static_cast<uint32_t>(mid)));
    if (v != down) lo = mid + 1; else hi = mid;
  }
  return lo;
}

}  // namespace

int main() {
  const std::pair<const char*, FormatParams> formats[] = {
      {"fp4_e2m1", float_element(2, 1, 6.0f)},      {"fp6_e2m3", float_element(2, 3, 7.5f)},
      {"fp6_e3m2", float_element(3, 2, 28.0f)},     {"fp8_e4m3", float_element(4, 3, 448.0f)},
      {"fp8_e5m2", float_element(5, 2, 57344.0f)},  {"fixed(8,6)", fixed_element(8, 6)},
      {"float(5,10)", float_element(5, 10, 65504.0f)}};
  std::mt19937_64 g(2026);
  long checked = 0, differ = 0, stochastic_blocks = 0;
  for (const auto& [name, p] : formats) {
    for (int block = 0; block < 3000; ++block) {
      // a scale with a random significand over the range the shortcuts take
      const float s = std::ldexp(1.0f + static_cast<float>(g() % (1u << 23)) * 0x1p-23f, static_cast<int>(g() % 100) - 45);
      const bool nearest_like = float_scaled_fast_applies<Rounding::Nearest>(p, s);
      const bool stochastic = float_scaled_fast_applies<Rounding::Stochastic>(p, s);
      stochastic_blocks += stochastic;
      for (int i = 0; i < 32; ++i) {
        const float x = sample(g, s);
        if (nearest_like) {
          differ += !same<Rounding::Nearest>(p, x, s, 0u, &checked);
          differ += !same<Rounding::NearestAway>(p, x, s, 0u, &checked);
          differ += !same<Rounding::TowardZero>(p, x, s, 0u, &checked);
          differ += !same<Rounding::Down>(p, x, s, 0u, &checked);
          differ += !same<Rounding::Up>(p, x, s, 0u, &checked);
        }
        if (stochastic) {
          const uint64_t t = threshold_of(p, x, s);
          for (const uint64_t r : {t - 1, t, t + 1, uint64_t{0}, uint64_t{0xffffffff}, uint64_t{g()}}) {
            differ += !same<Rounding::Stochastic>(p, x, s, static_cast<uint32_t>(r), &checked);
          }
        }
      }
      if (differ > 20) break;
    }
    std::printf("%s: through %ld checks\n", name, checked);
  }
  std::printf("%ld of %ld results differ (%ld blocks with stochastic shortcuts)\n", differ, checked, stochastic_blocks);
  return differ != 0 || stochastic_blocks == 0;
}
