// fp16 / bf16 <-> fp32 conversions written out by hand (no torch or compiler half types),
// so that the extension builds with any toolchain and links nothing but the C++ runtime.
//
// Everything is in an anonymous namespace on purpose: this header is included by
// translation units compiled for different instruction sets, and each must keep its own
// copy (see cpu_common.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace seekr {
namespace {

struct f16_t {
  uint16_t x;
};
struct bf16_t {
  uint16_t x;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Exact: every fp16 value is representable in fp32.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t bits;
  if (em >= 0x7c00u) {  // inf / nan (payload kept)
    bits = 0x7f800000u | ((em & 0x3ffu) << 13);
  } else if (em >= 0x0400u) {  // normal: rebias the exponent 15 -> 127
    bits = (em << 13) + ((127u - 15u) << 23);
  } else {  // zero or subnormal: em * 2^-24 is exact in fp32
    bits = float_to_bits(static_cast<float>(em) * 5.9604644775390625e-08f);
  }
  return bits_to_float(bits | sign);
}

// Round to nearest, ties to even; overflow gives inf, nan stays nan.
inline uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (x < 0x38800000u) {
    // Below the smallest normal fp16 (2^-14): adding 0.5 lines the fp16 subnormal grid up
    // with fp32's last mantissa bits, and the FPU does the rounding (ties to even).
    const float a = bits_to_float(x) + 0.5f;
    return sign | static_cast<uint16_t>(float_to_bits(a) - 0x3f000000u);
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;
  return sign | static_cast<uint16_t>(x >> 13);
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

// double -> float rounded to odd: narrowing that to fp16/bf16 with ties-to-even then gives
// the correctly rounded result of double -> fp16/bf16 (no double rounding).
inline float double_to_float_odd(double d) {
  float f = static_cast<float>(d);
  if (std::isfinite(d) && static_cast<double>(f) != d) {
    uint32_t b = float_to_bits(f);
    if (std::fabs(static_cast<double>(f)) > std::fabs(d)) b -= 1;  // truncate toward zero
    f = bits_to_float(b | 1u);
  }
  return f;
}

template <class Acc>
inline Acc load_as(const float* p) { return static_cast<Acc>(*p); }
template <class Acc>
inline Acc load_as(const double* p) { return static_cast<Acc>(*p); }
template <class Acc>
inline Acc load_as(const f16_t* p) { return static_cast<Acc>(half_to_float(p->x)); }
template <class Acc>
inline Acc load_as(const bf16_t* p) { return static_cast<Acc>(bf16_to_float(p->x)); }

inline void store_from(float* p, double v) { *p = static_cast<float>(v); }
inline void store_from(double* p, double v) { *p = v; }
inline void store_from(f16_t* p, double v) { p->x = float_to_half(double_to_float_odd(v)); }
inline void store_from(bf16_t* p, double v) { p->x = float_to_bf16(double_to_float_odd(v)); }
inline void store_from(float* p, float v) { *p = v; }
inline void store_from(double* p, float v) { *p = v; }
inline void store_from(f16_t* p, float v) { p->x = float_to_half(v); }
inline void store_from(bf16_t* p, float v) { p->x = float_to_bf16(v); }

}  // namespace
}  // namespace seekr
