// What the packed products' bodies share (`qlinear.cpp`: AMX tiles; `qlinear_dot.cpp`:
// AVX512-BF16 dot products; `qlinear_fma.cpp`: AVX-512F or AVX2 FMA) and the attention and LoRA
// kernels: the ISA tests they build on, the bf16 pair dot product, the 16-lane bf16 load and store of
// the epilogue, and the int8 -> bf16 widening of packed weights.
#pragma once

#include "common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SHOAL_AVX2 1
#else
#define SHOAL_AVX2 0
#endif

#if SHOAL_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__)
#define SHOAL_AVX512 1
#else
#define SHOAL_AVX512 0
#endif

#if SHOAL_AVX512 && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define SHOAL_DPBF16 1
#else
#define SHOAL_DPBF16 0
#endif

#if SHOAL_DPBF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define SHOAL_AMX 1  // AMX-BF16 tiles (qlinear.cpp)
#else
#define SHOAL_AMX 0
#endif

#if SHOAL_AMX && defined(__AMX_INT8__)
#define SHOAL_AMX_INT8 1  // AMX-INT8 tiles (q4linear_amx.cpp)
#else
#define SHOAL_AMX_INT8 0
#endif

#if SHOAL_AMX
namespace shoal {
struct TileConfig {  // LDTILECFG's 64-byte operand (palette 1)
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
}  // namespace shoal
#endif

#if SHOAL_AVX2
#include <cpuid.h>

namespace shoal {
// AMD's CPUID family (0x19: Zen 3 and Zen 4, 0x1a: Zen 5), 0 on other vendors
inline unsigned amd_family() {
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541u) return 0;  // "Auth"(enticAMD)
  __get_cpuid(1, &a, &b, &c, &d);
  return ((a >> 8) & 0xf) == 0xf ? 0xf + ((a >> 20) & 0xff) : (a >> 8) & 0xf;
}
// The memory-bound kernels' reads ahead (the LoRA slots, decode attention's keys and values) go
// into L2 on AMD Zen 4 (family 0x19 with AVX-512), where into L1 they ran slower (lora_bodies.h,
// attention.cpp); into L1 elsewhere unless said. Set at run time by `shoal_fetch_l2` (benchmarks
// compare the levels on one CPU in one process).
inline bool fetch_kv_l2 = amd_family() == 0x19;
}  // namespace shoal
#endif

namespace shoal {
#if SHOAL_AVX512
// acc + a.lo * b.lo + a.hi * b.hi in each 32-bit lane of bf16 pairs: VDPBF16PS (AVX512-BF16),
// else two fused multiply-adds on the widened halves (other roundings; both exact products)
inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
#if SHOAL_DPBF16
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
#else
  const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)),
                        _mm512_castsi512_ps(_mm512_and_si512(b, hi)), acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)),
                         _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
#endif
}

// VDPBF16PS's bits by two FMAs a lane, the odd pair element first, then the even one, with
// MXCSR's FTZ and DAZ set (the instruction flushes denormal inputs and results): the same bits on
// 256M lanes of random bits (NaN, inf, denormals), tiny and all exponents (Xeon with AMX). There
// the instruction is slow (zmm: one per 2.1 cycles, latency 8; FMAs: two a cycle), so kernels whose
// dot products bound them use the FMAs inside this scope. The asm keeps the compiler's memory
// accesses, and so the arithmetic on them, on their side of the switch; results must be pinned
// (`pin`) before the scope ends.
struct FlushDenormals {
  unsigned saved;
  FlushDenormals() {
    __asm__ volatile("stmxcsr %0" : "=m"(saved) : : "memory");
    unsigned on = saved | 0x8040u;  // FTZ | DAZ
    __asm__ volatile("ldmxcsr %0" : : "m"(on) : "memory");
  }
  ~FlushDenormals() { __asm__ volatile("ldmxcsr %0" : : "m"(saved) : "memory"); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};
inline void pin(__m512& v) { __asm__ volatile("" : "+v"(v) : : "memory"); }  // v computed here
#endif

// 16 outputs of a row from its fp32 sums: y = s * scale + bias (either may be null), rounded to
// bf16 unless y is fp32 (f32)
inline void put16(const float* s, const bf16_t* scale, const bf16_t* bias, void* y, bool f32) {
  for (int j = 0; j < 16; ++j) {
    float v = s[j];
    if (scale) v *= bf2f(scale[j]);
    if (bias) v += bf2f(bias[j]);
    if (f32)
      static_cast<float*>(y)[j] = v;
    else
      static_cast<bf16_t*>(y)[j] = f2bf(v);
  }
}
}  // namespace shoal

#if SHOAL_AVX512
namespace shoal {

inline __m512 load16(const bf16_t* p) {  // 16 bf16 -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p))), 16));
}

// round to nearest even, NaN kept quiet (common.h's f2bf). With AVX512-BF16 by VCVTNEPS2BF16,
// which rounds so and quiets NaN so but flushes denormal inputs: those lanes (exponent 0, zeros
// too) are lifted by the smallest normal (exponent field 1: the same low 16 bits to round),
// converted, and the lift's bit taken off the result. Equal to the integer steps below on all 2^32
// inputs (checked); per 16 values in an L1 loop on the Xeon with AMX 3.3 cycles against 5.4.
inline __m256i to_bf16(__m512 v) {
#if SHOAL_DPBF16
  const __m512i u = _mm512_castps_si512(v);
  const __mmask16 sub = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000));
  const __m512 lifted = _mm512_castsi512_ps(_mm512_mask_add_epi32(u, sub, u, _mm512_set1_epi32(0x00800000)));
  const __m256i r = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(lifted));
  return _mm256_mask_sub_epi16(r, sub, r, _mm256_set1_epi16(0x80));
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
#endif
}

// the epilogue of 16 outputs: y[0, 16) = v * scale + bias (either may be null), rounded to bf16
// unless y is fp32 (f32)
inline void store16(__m512 v, const bf16_t* scale, const bf16_t* bias, void* y, bool f32) {
  if (scale) v = _mm512_mul_ps(v, load16(scale));
  if (bias) v = _mm512_add_ps(v, load16(bias));
  if (f32)
    _mm512_storeu_ps(static_cast<float*>(y), v);
  else
    _mm256_storeu_si256(static_cast<__m256i*>(y), to_bf16(v));
}

}  // namespace shoal
#endif  // SHOAL_AVX512

#if SHOAL_DPBF16
namespace shoal {

// bf16 bits of 0..127, high and low bytes: the widening is two table lookups (vpermi2b)
struct Bf16Bytes {
  alignas(64) uint8_t hi[128];
  alignas(64) uint8_t lo[128];
  Bf16Bytes() {
    for (int a = 0; a < 128; ++a) hi[a] = f2bf(static_cast<float>(a)) >> 8, lo[a] = f2bf(static_cast<float>(a)) & 0xff;
  }
};

inline const Bf16Bytes& bf16_bytes() {
  static const Bf16Bytes table;
  return table;
}

// 64 packed int8 (one group of the packed order) -> 64 bf16, exact (|q| <= 127 fits bf16's
// mantissa): `v0` = values 0-31 of the group, `v1` = values 32-63, i.e. two 64-byte lines of the
// bf16 B order. |q| looks up the high and low bytes of bf16(|q|), q's sign bit is or-ed into the
// high byte, and the byte interleave (unpacklo/hi, per 128-bit lane) gives the 16-bit values;
// `shoal_qpack` stored each group in the order that interleave undoes (`group_order`). 1.45x
// faster than widening through fp32 (measured on AMX, 121 products a step: 10.2-11.7 -> 6.9-8.1
// ms at one row).
struct Widener {
  __m512i h0, h1, l0, l1, sign;
  Widener()
      : h0(_mm512_load_si512(bf16_bytes().hi)), h1(_mm512_load_si512(bf16_bytes().hi + 64)),
        l0(_mm512_load_si512(bf16_bytes().lo)), l1(_mm512_load_si512(bf16_bytes().lo + 64)),
        sign(_mm512_set1_epi8(static_cast<char>(0x80))) {}
  inline void operator()(const int8_t* src, __m512i& v0, __m512i& v1) const {
    const __m512i q = _mm512_loadu_si512(src);
    const __m512i a = _mm512_abs_epi8(q);
    __m512i hi = _mm512_permutex2var_epi8(h0, a, h1);
    const __m512i lo = _mm512_permutex2var_epi8(l0, a, l1);
    hi = _mm512_ternarylogic_epi32(hi, q, sign, 0xF8);  // hi | (q & 0x80)
    v0 = _mm512_unpacklo_epi8(lo, hi);
    v1 = _mm512_unpackhi_epi8(lo, hi);
  }
};

// one packed block: 512 int8 -> 512 bf16 in the B order (dst 64-byte aligned)
inline void widen_block(const Widener& wd, const int8_t* src, bf16_t* dst) {
  for (int i = 0; i < 512; i += 64) {
    __m512i v0, v1;
    wd(src + i, v0, v1);
    _mm512_store_si512(reinterpret_cast<__m512i*>(dst + i), v0);
    _mm512_store_si512(reinterpret_cast<__m512i*>(dst + i + 32), v1);
  }
}

}  // namespace shoal
#endif  // SHOAL_DPBF16
