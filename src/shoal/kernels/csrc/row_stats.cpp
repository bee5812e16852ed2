// The sampler's row statistics (`shoal_row_stats`): per row of logits its argmax, max and
// logsumexp, in one pass for the max and one for the sum, each row alone in a fixed order (its bits
// do not depend on the other rows). torch's CPU argmax and a per-row logsumexp loop took ~3.6 ms for
// 32 x 49152 fp32 logits (2 threads, measured); this is a fraction of that.

#include "sampler_lanes.h"

namespace {
using namespace shoal;
using namespace shoal::sampler;

// argmax = the first index holding the maximum (NaN counts as the maximum, the first NaN wins,
// as torch.argmax); max = that value; lse = max + log(sum(exp(x - max))), -inf for a row of
// -inf only, NaN when the row has a NaN.
template <typename T>
void row_stats(const T* x, int64_t v, int64_t* arg, float* mx, float* lse) {
  float best[W];
  int64_t at[W];
  int32_t nan[W];
  for (int l = 0; l < W; ++l) best[l] = -INFINITY, at[l] = -1, nan[l] = 0;
  int64_t e = 0;
#if SHOAL_AVX512
  if (v < (int64_t(1) << 31)) {  // the same lanes and order in registers (indices as int32)
    __m512 bv = _mm512_set1_ps(-INFINITY);
    __m512i av = _mm512_set1_epi32(-1), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 nv = 0;
    auto step = [&](__mmask16 m, __m512 f) {
      const __mmask16 gt = _mm512_mask_cmp_ps_mask(m, f, bv, _CMP_GT_OQ);  // (NaN is never better)
      bv = _mm512_mask_mov_ps(bv, gt, f);
      av = _mm512_mask_mov_epi32(av, gt, idx);
      nv |= _mm512_mask_cmp_ps_mask(m, f, f, _CMP_UNORD_Q);
      idx = _mm512_add_epi32(idx, _mm512_set1_epi32(W));
    };
    for (; e + W <= v; e += W) step(__mmask16(0xffff), lanes(x + e));  // (plain loads: see `lanes`)
    for (; e < v; e += W) step(first_lanes(v - e), lanes(x + e, first_lanes(v - e)));
    int32_t a32[W];
    _mm512_storeu_ps(best, bv);
    _mm512_storeu_si512(a32, av);
    for (int l = 0; l < W; ++l) at[l] = a32[l], nan[l] = (nv >> l) & 1;
  }
#endif
  for (; e + W <= v; e += W)
    for (int l = 0; l < W; ++l) {
      const float f = ld(x, e + l);
      const bool better = f > best[l];  // (NaN is never better: counted below)
      best[l] = better ? f : best[l];
      at[l] = better ? e + l : at[l];
      nan[l] |= f != f;
    }
  for (; e < v; ++e) {
    const float f = ld(x, e);
    const int l = static_cast<int>(e % W);
    if (f > best[l]) best[l] = f, at[l] = e;
    nan[l] |= f != f;
  }
  int any_nan = 0;
  float m = -INFINITY;
  int64_t a = -1;
  for (int l = 0; l < W; ++l) {  // the largest value; among equal ones the first index
    any_nan |= nan[l];
    if (at[l] >= 0 && (best[l] > m || (best[l] == m && at[l] < a))) m = best[l], a = at[l];
  }
  if (any_nan) {  // torch.argmax: the first NaN is the maximum
    int64_t i = 0;
    while (ld(x, i) == ld(x, i)) ++i;
    arg[0] = i, mx[0] = NAN;
    if (lse) lse[0] = NAN;
    return;
  }
  arg[0] = a < 0 ? 0 : a;  // a row of -inf only: index 0, as torch.argmax
  mx[0] = m;
  if (lse == nullptr) return;
  if (m == -INFINITY || m == INFINITY) {  // log(sum(exp)) of -inf only, or with +inf
    lse[0] = m;
    return;
  }
  float acc[W] = {0};
  e = 0;
#if SHOAL_AVX512
  {  // exp_neg16 is exp_neg step for step: the same sums, lane for lane
    __m512 sv = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m);
    for (; e + W <= v; e += W) sv = _mm512_add_ps(sv, exp_neg16(_mm512_sub_ps(lanes(x + e), mv)));
    for (; e < v; e += W) {
      const __mmask16 k = first_lanes(v - e);
      sv = _mm512_mask_add_ps(sv, k, sv, exp_neg16(_mm512_sub_ps(lanes(x + e, k), mv)));
    }
    _mm512_storeu_ps(acc, sv);
  }
#endif
  for (; e + W <= v; e += W)
    for (int l = 0; l < W; ++l) acc[l] += exp_neg(ld(x, e + l) - m);
  for (; e < v; ++e) acc[e % W] += exp_neg(ld(x, e) - m);
  float s = 0.0f;
  for (int l = 0; l < W; ++l) s += acc[l];
  lse[0] = m + std::log(s);
}

}  // namespace

extern "C" {

// x (b, v) in dtype dt (row stride xs) -> arg (b,) int64, mx (b,) and lse (b,) fp32 (lse may be
// null: argmax and max only).
int shoal_row_stats(int dt, const void* x, int64_t xs, int64_t b, int64_t v, int64_t* arg,
                    float* mx, float* lse) {
  if (dt != 0 && dt != 1) return 1;
#pragma omp parallel for schedule(static) if (b >= 2)
  for (int64_t r = 0; r < b; ++r) {
    float* lr = lse ? lse + r : nullptr;
    if (dt == 0)
      row_stats(static_cast<const float*>(x) + r * xs, v, arg + r, mx + r, lr);
    else
      row_stats(static_cast<const bf16_t*>(x) + r * xs, v, arg + r, mx + r, lr);
  }
  return 0;
}

}  // extern "C"
