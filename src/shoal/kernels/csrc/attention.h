// What the two attention kernels share (`attention.cpp`: decode rows; `prefill_attention.cpp`:
// prompt chunks): a 16-lane exp, the head-size dispatch and a bf16 widening (the pair dot product
// `dot2` is widen.h's).
#pragma once

#include <type_traits>

#include "widen.h"

#if SHOAL_AVX512
namespace shoal {

// exp(x) for x <= 0 in 16 lanes: common.h's exp_neg, step for step
inline __m512 exp_neg16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 big = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), big), big);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  r = _mm512_add_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// f(std::integral_constant<int, D>{}) for head size d: 64, else 128 (callers check d first)
template <typename F>
inline void by_head_size(int64_t d, F&& f) {
  if (d == 64)
    f(std::integral_constant<int, 64>{});
  else
    f(std::integral_constant<int, 128>{});
}

// 16 fp32 lanes at p, those off in k read as `off` / not written: plain loads and stores when all
// are on (masked ones with every lane on are slower on an AMD EPYC Zen 5; the same values)
inline __m512 load_lanes(const float* p, __mmask16 k, __m512 off = _mm512_setzero_ps()) {
  return k == __mmask16(0xffff) ? _mm512_loadu_ps(p) : _mm512_mask_loadu_ps(off, k, p);
}
inline void store_lanes(float* p, __mmask16 k, __m512 v) {
  if (k == __mmask16(0xffff))
    _mm512_storeu_ps(p, v);
  else
    _mm512_mask_storeu_ps(p, k, v);
}

// a line of keys or values read ahead by decode attention: into L2 on AMD Zen 4 (`fetch_kv_l2`), into
// L1 elsewhere. A 32-row decode step's attention (SmolLM2-135M, 30 layers, bf16 cache, the
// one-call decode's timer, builds alternated twice), Zen 4: 6.29-6.45 ms into L1, 5.11-5.22 into
// L2 (16 keys ahead 5.19-5.40, 32 ahead 4.78-5.16)
inline void prefetch_kv(const void* p) {
  if (fetch_kv_l2)
    _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
  else
    _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
}

// bf16 lanes (16 x 16 bits) -> fp32
inline __m512 widen16(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

}  // namespace shoal
#endif  // SHOAL_AVX512
