// Shared helpers of the CPU kernels: bfloat16 <-> float, loads and stores by element type,
// rounding to a dtype, and a vectorizable exp. Element type per tensor: 0 = float32,
// 1 = bfloat16 (raw uint16 bits).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace shoal {

typedef uint16_t bf16_t;

// (bit casts with __builtin_bit_cast: memcpy in these helpers kept GCC from vectorizing loops)
inline float bf2f(bf16_t x) { return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16); }

inline bf16_t f2bf(float f) {  // round to nearest even, like PyTorch's float -> bfloat16
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16_t>(u >> 16);
}

template <typename T> inline float ld(const T* p, int64_t i);
template <> inline float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float ld<bf16_t>(const bf16_t* p, int64_t i) { return bf2f(p[i]); }
template <typename T> inline void st(T* p, int64_t i, float v);
template <> inline void st<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline void st<bf16_t>(bf16_t* p, int64_t i, float v) { p[i] = f2bf(v); }
// the value as the tensor's dtype would hold it (identity for float32)
template <typename T> inline float rnd(float v) { return v; }
template <> inline float rnd<bf16_t>(float v) { return bf2f(f2bf(v)); }

// exp(x) for x <= 0 (softmax, SiLU): Cephes' expf polynomial, branch-free so loops vectorize;
// relative error ~1e-7. Inputs below -87 give ~1e-38 instead of 0.
inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |x / ln 2| < 2^22; floor() kept
  // GCC from vectorizing)
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;
  return p * __builtin_bit_cast(float, static_cast<uint32_t>(e) << 23);
}

}  // namespace shoal
