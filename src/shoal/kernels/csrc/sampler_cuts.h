// The top_k / top_p cut of `sampling.cpp`'s filtered draw: the weights' buckets (`key_of`), the
// scans over them, the walk of one bucket in order (`BucketWalk`), and the draw over the kept
// tokens where their sums are exact (`draw_exact`). Semantics: sampling.cpp's `sample_filtered`.
#pragma once

#include <algorithm>
#include <vector>

#include "sampler_lanes.h"

namespace shoal::sampler {

// A weight's bucket: its float bits >> 19 (exponent and 4 mantissa bits), monotone in w > 0;
// w <= 1 (the max's weight) gives keys up to 2032.
constexpr int kShift = 19;
constexpr int kKeys = (0x3f800000 >> kShift) + 1;
inline int key_of(float w) {
  const int key = static_cast<int>(__builtin_bit_cast(uint32_t, w) >> kShift);
  return key < kKeys ? key : kKeys - 1;  // (exp_neg(0) is exactly 1; kept in range regardless)
}

// Calls f(j) for each j in index order with w[j] > 0 and key_of(w[j]) >= lo, and == lo too when
// `exact` (lo >= 0), until f returns true: key_of(w) >= lo is w's bits >= lo << kShift (keys
// clamp at kKeys - 1 >= lo; w >= 0, never -0)
template <typename F>
inline void for_keys(const std::vector<float>& w, int lo, bool exact, F&& f) {
  const int64_t v = static_cast<int64_t>(w.size());
  const uint32_t lo_bits = lo > 0 ? static_cast<uint32_t>(lo) << kShift : 1u;  // w > 0: bits >= 1
  const uint32_t hi_bits = exact && lo < kKeys - 1 ? (static_cast<uint32_t>(lo) + 1) << kShift : 0xffffffffu;
  int64_t j = 0;
#if SHOAL_AVX512
  const __m512i lv = _mm512_set1_epi32(static_cast<int32_t>(lo_bits));
  const __m512i hv = _mm512_set1_epi32(static_cast<int32_t>(hi_bits));
  for (; j + W <= v; j += W) {
    const __m512i b = _mm512_loadu_si512(w.data() + j);
    uint32_t k = _mm512_cmpge_epu32_mask(b, lv);
    if (hi_bits != 0xffffffffu) k &= _mm512_cmplt_epu32_mask(b, hv);
    for (; k; k &= k - 1)
      if (f(j + __builtin_ctz(k))) return;
  }
#endif
  for (; j < v; ++j) {
    const uint32_t b = __builtin_bit_cast(uint32_t, w[j]);
    if (b >= lo_bits && (hi_bits == 0xffffffffu || b < hi_bits) && f(j)) return;
  }
}

// Sums of weights of bucket `key` and above (each a multiple of the bucket's unit 2^(e - 23), e
// its exponent, all at most v in total) are exact in fp64 when v < 2^(53 + e - 23): then the
// order in which they are added changes no bit
inline bool exact_sums(int key, int64_t v) { return 30 + ((key >> 4) - 127) >= 64 - __builtin_clzll(v); }

// The ids of bucket `key` in the order w descending, ties by index, taken from the front: grouped
// by their next 8 bits of mantissa (`sub`: monotone in w within the bucket, highest group first),
// a group sorted only when the cut may fall in it. Where the bucket's sums are exact
// (`exact_sums`), a group the cut cannot fall in is taken whole, its mass summed in index order
// (the same bits); elsewhere every group is sorted and walked. A flat row (a random model's, a
// high temperature's) puts thousands of tokens in one bucket, which the whole sort took ~0.3 ms.
struct BucketWalk {
  std::vector<int64_t> ids, grouped;
  int64_t start[257];  // group g (descending sub) at grouped[start[g], start[g + 1])

  static int sub(float w) { return static_cast<int>((__builtin_bit_cast(uint32_t, w) >> (kShift - 8)) & 0xff); }

  void init(const std::vector<float>& w, int key) {
    ids.clear();
    for_keys(w, key, true, [&](int64_t j) {
      ids.push_back(j);
      return false;
    });
    int64_t pos[256] = {0};
    for (int64_t j : ids) ++pos[255 - sub(w[j])];
    start[0] = 0;
    for (int g = 0; g < 256; ++g) start[g + 1] = start[g] + pos[g], pos[g] = start[g];
    grouped.resize(ids.size());
    for (int64_t j : ids) grouped[pos[255 - sub(w[j])]++] = j;  // index order within a group
  }
  int64_t size() const { return static_cast<int64_t>(grouped.size()); }

  // Takes ids in the walk's order while fewer than `end` are taken and more(s0) holds before each,
  // adding each taken w to s0 (and *s1); returns how many, the last in jc (its w in wc).
  template <typename More>
  int64_t take(const std::vector<float>& w, int64_t end, bool exact, More more, double& s0, double* s1,
               int64_t& jc, float& wc) {
    int64_t n = 0;
    for (int g = 0; g < 256 && n < end; ++g) {
      const int64_t b = start[g], e = start[g + 1];
      if (b == e) continue;
      if (exact && n + (e - b) < end) {  // whole if more() still holds after it (so for all of it)
        double gm = 0.0;
        for (int64_t i = b; i < e; ++i) gm += w[grouped[i]];
        if (more(s0 + gm)) {
          s0 += gm;
          if (s1) *s1 += gm;
          n += e - b;
          continue;
        }
      }
      std::stable_sort(grouped.begin() + b, grouped.begin() + e, [&](int64_t x, int64_t y) { return w[x] > w[y]; });
      for (int64_t i = b; i < e && n < end; ++i) {
        if (!more(s0)) return n;
        jc = grouped[i], wc = w[jc];
        s0 += wc;
        if (s1) *s1 += wc;
        ++n;
      }
    }
    return n;
  }
};

// Step 3 where the kept weights' sums are exact (`exact_sums` of the cut's bucket, as the scan
// below would find them: their total is known, and the running sums in index order are the
// same whatever the grouping): the first kept token whose running sum exceeds `target`, found a
// block of 256 tokens at a time (the block's kept weights summed in lanes), then token by token
// in the block that crosses. Kept: key > cut, or key == cut and not after (wc, jc) in the walk's
// order. A flat row keeps most of its tokens; the token-by-token scans took ~0.1 ms a row.
inline bool kept_at(const std::vector<float>& w, int64_t j, int cut, float wc, int64_t jc) {
  const int key = key_of(w[j]);
  return w[j] > 0.0f && (key > cut || (key == cut && (w[j] > wc || (w[j] == wc && j <= jc))));
}

inline double block_kept(const std::vector<float>& w, int64_t e0, int cut, float wc, int64_t jc) {
#if SHOAL_AVX512
  const __m512i next = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(cut + 1) << kShift));
  const __m512i lo = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(cut) << kShift));
  const __m512 wcv = _mm512_set1_ps(wc);
  const __m512i jcv = _mm512_set1_epi32(static_cast<int32_t>(jc));
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
  for (int64_t j = e0; j < e0 + 256; j += W) {
    const __m512 f = _mm512_loadu_ps(w.data() + j);
    const __m512i b = _mm512_castps_si512(f);
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)), lane);
    const __mmask16 in_cut = _mm512_cmpge_epu32_mask(b, lo) & _mm512_cmplt_epu32_mask(b, next);
    const __mmask16 keep = _mm512_cmpge_epu32_mask(b, next) |
                           (in_cut & (_mm512_cmp_ps_mask(f, wcv, _CMP_GT_OQ) |
                                      (_mm512_cmp_ps_mask(f, wcv, _CMP_EQ_OQ) & _mm512_cmple_epi32_mask(idx, jcv))));
    a0 = _mm512_mask_add_pd(a0, static_cast<__mmask8>(keep), a0, _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
    a1 = _mm512_mask_add_pd(a1, static_cast<__mmask8>(keep >> 8), a1,
                            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1))));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
#else
  double s = 0.0;
  for (int64_t j = e0; j < e0 + 256; ++j)
    if (kept_at(w, j, cut, wc, jc)) s += w[j];
  return s;
#endif
}

inline int64_t draw_exact(const std::vector<float>& w, int cut, float wc, int64_t jc, double target) {
  const int64_t v = static_cast<int64_t>(w.size());
  double acc = 0.0;
  int64_t e0 = 0;
  for (; e0 + 256 <= v; e0 += 256) {
    const double b = block_kept(w, e0, cut, wc, jc);
    if (acc + b > target) break;
    acc += b;
  }
  for (int64_t j = e0; j < v; ++j)
    if (kept_at(w, j, cut, wc, jc) && (acc += w[j]) > target) return j;
  int64_t j = v - 1;  // (not reached: the sums are exact) the last kept token
  while (j > 0 && !kept_at(w, j, cut, wc, jc)) --j;
  return j;
}

}  // namespace shoal::sampler
