// What the sampler's kernels share (`row_stats.cpp`, `sampling.cpp`): a row of logits as 16 fp32
// lanes at a time, element e in lane e % W, lanes combined in index order.
#pragma once

#include "attention.h"  // exp_neg16, widen16 (and widen.h's ISA tests)
#include "common.h"

namespace shoal::sampler {

constexpr int W = 16;  // lanes: element e goes to lane e % W; lanes are combined in index order

#if SHOAL_AVX512
// 16 lanes of x[e..e+16) as fp32 (lanes past n: 0)
inline __m512 lanes(const float* x, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x); }
inline __m512 lanes(const bf16_t* x, __mmask16 m) { return widen16(_mm256_maskz_loadu_epi16(m, x)); }
// all 16 lanes by a plain load: masked loads with every lane on were slower on an AMD EPYC Zen 5
// (`row_stats` of 32 x 49,152 bf16 logits, 2 threads, builds alternated three times: 304.5-305.7
// -> 278.0-281.0 us, the logsumexp pass; SiLU(gate) * up likewise, elementwise.cpp)
inline __m512 lanes(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 lanes(const bf16_t* x) { return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))); }
inline __mmask16 first_lanes(int64_t n) { return n >= W ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }
#endif

}  // namespace shoal::sampler
