// The vector bodies of `lora.cpp`'s BGMV kernel (AVX-512): 16-lane loads and stores by element
// type, the shrink and expand loops for bf16 pairs and for fp32 lanes, and int8 slot helpers.
// Semantics: lora.cpp.
#pragma once

#include <type_traits>

#include "widen.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
namespace shoal::lora {

template <typename TW>
inline __m512 load16(const TW* p, __mmask16 m);
template <>
inline __m512 load16<float>(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
template <>
inline __m512 load16<bf16_t>(const bf16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

template <>
inline __m512 load16<int8_t>(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// o[0..16) (masked) = delta (accumulate 0) or T(o + T(delta)) (accumulate 1)
template <typename T>
inline void store_delta(T* o, __m512 d, __mmask16 m, int accumulate);
template <>
inline void store_delta<float>(float* o, __m512 d, __mmask16 m, int accumulate) {
  _mm512_mask_storeu_ps(o, m, accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), d) : d);
}
template <>
inline void store_delta<bf16_t>(bf16_t* o, __m512 d, __mmask16 m, int accumulate) {
  __m256i r = to_bf16(d);  // (widen.h: rounded as f2bf)
  if (accumulate) {
    const __m512 dr = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16));  // T(delta)
    r = to_bf16(_mm512_add_ps(load16<bf16_t>(o, m), dr));
  }
  _mm256_mask_storeu_epi16(o, m, r);
}

// bf16 slots on bf16 inputs: the weights are used as stored, two bf16 values a 32-bit lane (the
// widening to fp32 one vector at a time bounded the generic body: with one layer's slots in
// cache a token took ~5 us a layer).
// shrink: c[t][j] = T32(x_t . a[j]) * scale for j < RG, a's rows k apart: per (t, j) one chain
// of `dot2` over k in steps of 32 (lane l takes the pair e0 + 2l, e0 + 2l + 1, a tail masked to
// zeros), then _mm512_reduce_add_ps; RG ranks at once so NB * RG chains run side by side. pa (to
// pa_end) advances RG lines of prefetch a step.
// 32 weights as bf16 pairs in 32-bit lanes (lanes past the mask zero): bf16 slots as stored;
// int8 slots widened in registers to the same values `widen_i8` stores (so reading a widened
// copy or the int8 rows gives the same bits)
// whole: all 32 lanes, read by a plain load. Blocks of 2-4 tokens (prefill runs) read their whole
// steps so in the shrink and the expand below, masks only for a tail; one-token blocks (decode
// rows) keep one masked loop (two loops there cost their expand 5-15%). On an AMD EPYC Zen 5 the
// masked loads held the runs back: `bench/lora_kernel.py`'s 512-token run of one slot, builds
// alternated three times, bf16 slots 16.4-20.2 -> 13.7-14.9 ms (the expand's loads alone: 15.5-16.9),
// int8 slots 17.1-18.4 -> 14.0-15.5; 32 decode rows on 32 slots unchanged (5.2-5.9 ms either way).
// The same bits (the same values reach the same instructions).
template <bool whole = false>
inline __m512i pairs32(const bf16_t* p, __mmask32 m) {
  return whole ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(m, p);
}
template <bool whole = false>
inline __m512i pairs32(const int8_t* p, __mmask32 m) {
  const __m256i b = whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi8(m, p);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  // the upper halves (the exact bf16 values) of 0-15's then 16-31's floats: 16-bit word 2w + 1
  const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                       27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_permutex2var_epi16(_mm512_castps_si512(lo), odd, _mm512_castps_si512(hi));
}

// The next block's slot weights are prefetched by the bodies: into L2 on Xeons with AMX and on
// AMD Zen 4 (CPUID family 0x19), into L1 elsewhere. 32 tokens on 32 slots, 30 layers of the four
// groups from memory, in-process timing, us a layer, alternated three times (Xeon with AMX, 2
// threads): bf16 slots 252-267 into L1, 221-232 into L2; int8 slots 169-171 into L1, 163-169 into
// L2; two lines a step into L2 instead of one (bf16): 254-261. On an AMD EPYC Zen 5 the other
// way: the adapters' cost in a 32-row decode step of the engine (`bench/lora_dtype_steps.py`'s
// workload, alternated three times), bf16 slots 4.47-4.77 ms into L2, 3.85-4.22 into L1,
// 3.87-4.72 non-temporal. On a Zen 4 (slots slot-major) the first way again: the four LoRA calls
// of that step, builds alternated twice, bf16 slots 6.55-6.71 ms into L1, 5.19-5.34 into L2.
inline bool fetch_slot_l2 = SHOAL_AMX || amd_family() == 0x19;
inline void prefetch_slot(const char* p) {
  if (fetch_slot_l2)
    _mm_prefetch(p, _MM_HINT_T1);
  else
    _mm_prefetch(p, _MM_HINT_T0);
}

// Xeons with AMX: `shrink_bf`'s bits by FMAs (see FlushDenormals), each pair of weights widened
// to its two fp32 values: int8 slots straight from the bytes (as bf16 pairs they cost 5 port-5
// uops a row step there, then a slow VDPBF16PS; a 32-value row step, one thread, in isolation:
// 7.7 -> 4.8 cycles), bf16 slots by a mask and a shift. 32 rows on 32 slots, 30 layers of the four
// groups, one process (`lorab`, kernel calls only, 400 MB read between steps, alternated three
// times): int8 slots 6.85-7.63 -> 6.54-7.12 ms; bf16 slots the same (8.7-9.6 ms); 512 tokens in
// blocks of 4, bf16 slots: 34.5-34.8 -> 32.5-33.6 ms.
inline void pair_halves(const int8_t* p, __mmask32 m, __m512& odd, __m512& even) {
  // 32 int8 as 16 words, sign-extended: lane l holds a[2l + 1] a[2l] in bits 15..0
  const __m512i w = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi8(m, p));
  odd = _mm512_cvtepi32_ps(_mm512_srai_epi32(w, 8));
  even = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 24), 24));
}
inline void pair_halves(const bf16_t* p, __mmask32 m, __m512& odd, __m512& even) {
  const __m512i v = _mm512_maskz_loadu_epi16(m, p);
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u))));
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

template <int NB, int RG, typename TW>
inline void shrink_fma(const bf16_t* const* xr, const TW* a, int64_t k, float scale, float* c, int64_t ldc,
                       const char*& pa, const char* pa_end) {
  __m512 acc[NB][RG];
  const char* p = pa;
  {
    const FlushDenormals ftz;
    for (int t = 0; t < NB; ++t)
      for (int j = 0; j < RG; ++j) acc[t][j] = _mm512_setzero_ps();
    for (int64_t e0 = 0; e0 < k; e0 += 32) {
      const __mmask32 m = k - e0 >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << (k - e0)) - 1);
      for (int j = 0; j < RG; ++j)
        if (p < pa_end) prefetch_slot(p), p += 64;
      __m512 xo[NB], xe[NB];  // lane l: x[e0 + 2l + 1], x[e0 + 2l]
      for (int t = 0; t < NB; ++t) pair_halves(xr[t] + e0, m, xo[t], xe[t]);
      for (int j = 0; j < RG; ++j) {
        __m512 ao, ae;
        pair_halves(a + j * k + e0, m, ao, ae);
        for (int t = 0; t < NB; ++t) acc[t][j] = _mm512_fmadd_ps(xe[t], ae, _mm512_fmadd_ps(xo[t], ao, acc[t][j]));
      }
    }
    for (int t = 0; t < NB; ++t)
      for (int j = 0; j < RG; ++j) pin(acc[t][j]);
  }
  pa = p;
  for (int t = 0; t < NB; ++t)
    for (int j = 0; j < RG; ++j) c[t * ldc + j] = _mm512_reduce_add_ps(acc[t][j]) * scale;
}

template <int NB, int RG, typename TW>
inline void shrink_bf(const bf16_t* const* xr, const TW* a, int64_t k, float scale, float* c, int64_t ldc,
                      const char*& pa, const char* pa_end) {
#if SHOAL_AMX
  shrink_fma<NB, RG>(xr, a, k, scale, c, ldc, pa, pa_end);
#else
  __m512 acc[NB][RG];
  for (int t = 0; t < NB; ++t)
    for (int j = 0; j < RG; ++j) acc[t][j] = _mm512_setzero_ps();
  const char* p = pa;  // in a register (through the reference: a store and a load a step)
  // K steps [e0, e1); whole: all 32 values inside k, plain loads (blocks of 2-4 tokens: see pairs32)
  auto steps = [&](int64_t e0, int64_t e1, auto whole) {
    for (; e0 < e1; e0 += 32) {
      const __mmask32 m = k - e0 >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << (k - e0)) - 1);
      for (int j = 0; j < RG; ++j)
        if (p < pa_end) prefetch_slot(p), p += 64;
      __m512i xv[NB];
      for (int t = 0; t < NB; ++t)
        xv[t] = decltype(whole)::value ? _mm512_loadu_si512(xr[t] + e0) : _mm512_maskz_loadu_epi16(m, xr[t] + e0);
      for (int j = 0; j < RG; ++j) {
        const __m512i wv = pairs32<decltype(whole)::value>(a + j * k + e0, m);
        for (int t = 0; t < NB; ++t) acc[t][j] = dot2(acc[t][j], xv[t], wv);
      }
    }
  };
  if constexpr (NB > 1) {
    steps(0, k / 32 * 32, std::true_type{});
    steps(k / 32 * 32, k, std::false_type{});
  } else {
    steps(0, k, std::false_type{});
  }
  pa = p;
  for (int t = 0; t < NB; ++t)
    for (int j = 0; j < RG; ++j) c[t * ldc + j] = _mm512_reduce_add_ps(acc[t][j]) * scale;
#endif
}

// expand and add: out_t[e] (+)= T(sum_r c[t][r] * b[r][e]), each element's FMA chain over r in
// order (the generic body's arithmetic), U steps of 32 elements at once: a step's 32 bf16 split
// into even and odd elements as fp32 by a shift and a mask, their sums put back in order at the
// end. pb (to pb_end) advances U lines of prefetch a rank.
template <int NB, int U>
inline void expand_bf(const float* c, int64_t rank, const bf16_t* b, int64_t w, bf16_t* const* out, int accumulate,
                      const char*& pb, const char* pb_end) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t e0 = 0; e0 < w; e0 += 32 * U) {
    __mmask32 m[U];
    for (int u = 0; u < U; ++u) {
      const int64_t left = w - e0 - 32 * u;
      m[u] = left >= 32 ? __mmask32(0xffffffffu) : left <= 0 ? __mmask32(0) : __mmask32((1u << left) - 1);
    }
    __m512 ev[NB][U], od[NB][U];
    for (int t = 0; t < NB; ++t)
      for (int u = 0; u < U; ++u) ev[t][u] = od[t][u] = _mm512_setzero_ps();
    // the FMA chains over the ranks; whole: all U steps inside w, B's rows read by plain loads
    // (blocks of 2-4 tokens: see pairs32)
    auto ranks = [&](auto whole) {
      for (int64_t r = 0; r < rank; ++r) {
        for (int u = 0; u < U; ++u)
          if (pb < pb_end) prefetch_slot(pb), pb += 64;
        __m512 cr[NB];
        for (int t = 0; t < NB; ++t) cr[t] = _mm512_set1_ps(c[t * rank + r]);
        for (int u = 0; u < U; ++u) {
          const bf16_t* bp = b + r * w + e0 + 32 * u;
          const __m512i bv = decltype(whole)::value ? _mm512_loadu_si512(bp) : _mm512_maskz_loadu_epi16(m[u], bp);
          const __m512 be = _mm512_castsi512_ps(_mm512_slli_epi32(bv, 16));  // elements 2l
          const __m512 bo = _mm512_castsi512_ps(_mm512_and_si512(bv, hi));   // elements 2l + 1
          for (int t = 0; t < NB; ++t) {
            ev[t][u] = _mm512_fmadd_ps(cr[t], be, ev[t][u]);
            od[t][u] = _mm512_fmadd_ps(cr[t], bo, od[t][u]);
          }
        }
      }
    };
    if (NB > 1 && e0 + 32 * U <= w)
      ranks(std::true_type{});
    else
      ranks(std::false_type{});
    for (int u = 0; u < U; ++u) {
      const __mmask16 m0 = static_cast<__mmask16>(m[u]), m1 = static_cast<__mmask16>(m[u] >> 16);
      for (int t = 0; t < NB; ++t) {
        bf16_t* o = out[t] + e0 + 32 * u;
        if (m0) store_delta(o, _mm512_permutex2var_ps(ev[t][u], lo_idx, od[t][u]), m0, accumulate);
        if (m1) store_delta(o + 16, _mm512_permutex2var_ps(ev[t][u], hi_idx, od[t][u]), m1, accumulate);
      }
    }
  }
}

// lanes [0, n) of 16 (n <= 0: none)
inline __mmask16 tail16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// Other slot types (fp32, int8; bf16 slots on fp32 inputs), weights widened to fp32 16 at a time.
// shrink: c[t][j] = T32(x_t . a[j]) * scale for j < RG (x_t in fp32 at xf + t * kp, a's rows k
// apart): per (t, j) one FMA chain over k in order (lane l takes e = l mod 16, a tail masked),
// then _mm512_reduce_add_ps; RG ranks at once. pa (to pa_end) advances (RG + 1) / 2 lines a step.
template <int NB, int RG, typename TW>
inline void shrink_fp(const float* xf, int64_t kp, const TW* a, int64_t k, float scale, float* c, int64_t ldc,
                      const char*& pa, const char* pa_end) {
  __m512 acc[NB][RG];
  for (int t = 0; t < NB; ++t)
    for (int j = 0; j < RG; ++j) acc[t][j] = _mm512_setzero_ps();
  for (int64_t e0 = 0; e0 < k; e0 += 16) {
    const __mmask16 m = tail16(k - e0);
    for (int j = 0; j < (RG + 1) / 2; ++j)
      if (pa < pa_end) prefetch_slot(pa), pa += 64;
    __m512 xv[NB];
    for (int t = 0; t < NB; ++t) xv[t] = _mm512_loadu_ps(xf + t * kp + e0);
    for (int j = 0; j < RG; ++j) {
      const __m512 wv = load16(a + j * k + e0, m);
      for (int t = 0; t < NB; ++t) acc[t][j] = _mm512_fmadd_ps(xv[t], wv, acc[t][j]);
    }
  }
  for (int t = 0; t < NB; ++t)
    for (int j = 0; j < RG; ++j) c[t * ldc + j] = _mm512_reduce_add_ps(acc[t][j]) * scale;
}

// expand and add: out_t[e] (+)= T(sum_r c[t][r] * b[r][e]), each element's FMA chain over r in
// order, EU vectors of 16 elements at once. pb (to pb_end) advances EU / 2 lines a rank.
template <int NB, int EU, typename T, typename TW>
inline void expand_fp(const float* c, int64_t rank, const TW* b, int64_t w, T* const* out, int accumulate,
                      const char*& pb, const char* pb_end) {
  for (int64_t e0 = 0; e0 < w; e0 += 16 * EU) {
    __mmask16 m[EU];
    for (int u = 0; u < EU; ++u) m[u] = tail16(w - e0 - 16 * u);
    __m512 acc[NB][EU];
    for (int t = 0; t < NB; ++t)
      for (int u = 0; u < EU; ++u) acc[t][u] = _mm512_setzero_ps();
    for (int64_t r = 0; r < rank; ++r) {
      for (int u = 0; u < EU / 2; ++u)
        if (pb < pb_end) prefetch_slot(pb), pb += 64;
      __m512 cr[NB];
      for (int t = 0; t < NB; ++t) cr[t] = _mm512_set1_ps(c[t * rank + r]);
      for (int u = 0; u < EU; ++u) {
        const __m512 bv = load16(b + r * w + e0 + 16 * u, m[u]);
        for (int t = 0; t < NB; ++t) acc[t][u] = _mm512_fmadd_ps(cr[t], bv, acc[t][u]);
      }
    }
    for (int t = 0; t < NB; ++t)
      for (int u = 0; u < EU; ++u)
        if (m[u]) store_delta(out[t] + e0 + 16 * u, acc[t][u], m[u], accumulate);
  }
}

// int8 slot rows -> bf16 (exact: integers of at most 8 bits), 16 at a time
inline void widen_i8(const int8_t* src, int64_t n, bf16_t* dst) {
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) {
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + e),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16)));
  }
  for (; e < n; ++e) dst[e] = f2bf(static_cast<float>(src[e]));
}

// int8 slots: c[t][r] = ((c[t][r] * a_scale[r]) * scale) * b_scale[r], slot s's row scales at
// asc + s * a_rows, bsc + s * b_rows (c came from the int8 values, scale 1)
inline void scale_rows(float* c, int nb, int64_t rank, int64_t s, int64_t a_rows, int64_t b_rows, int64_t asc,
                       int64_t bsc, float scale) {
  const float* as = reinterpret_cast<const float*>(asc) + s * a_rows;
  const float* bs = reinterpret_cast<const float*>(bsc) + s * b_rows;
  for (int t = 0; t < nb; ++t)
    for (int64_t r = 0; r < rank; ++r) c[t * rank + r] = ((c[t * rank + r] * as[r]) * scale) * bs[r];
}

}  // namespace shoal::lora
#endif
