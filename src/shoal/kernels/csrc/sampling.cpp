// The sampler's draws on a logits matrix (`shoal_sample_rows`; its row statistics are
// row_stats.cpp's), each row computed alone in a fixed order (its bits do not depend on the other
// rows):
// - sample_rows: one draw from softmax(x / T) by its inverse CDF, given one uniform number: a
//   pass for the max, one for the exps summed in blocks, then a walk over the block sums and
//   one block. The draw it replaced (Exp(1) noise over the whole vocabulary, torch's
//   exponential_) took ~1 ms a row at 49152 tokens. Masked ids (min_tokens, ignore_eos) weigh
//   0; top_k / top_p cut where a histogram of the weights' buckets says, sorting at most one
//   group of one bucket (`sampler_cuts.h`; torch's sort of the row took ~4.5 ms).

#include <algorithm>
#include <vector>

#include "sampler_cuts.h"
#include "sampler_lanes.h"

namespace {
using namespace shoal;
using namespace shoal::sampler;

constexpr int64_t kBlock = W * 16;  // sample_rows' block: 16 lanes x 16 steps

// exp((x - m) / t) for the row's max m: exactly 0 where exp_neg's range ends (-inf included), so
// a masked token, or one ~e^-87 below the best, is never drawn
inline float weight(float x, float m, float t) {
  const float z = (x - m) / t;
  return z < -87.0f ? 0.0f : exp_neg(z);
}

// The ids a row masks (min_tokens' and ignore_eos' eos/stop ids: a few): they weigh 0.
struct Masked {
  const int64_t* ids;
  int64_t n;
  bool has(int64_t e) const {
    for (int64_t k = 0; k < n; ++k)
      if (ids[k] == e) return true;
    return false;
  }
#if SHOAL_AVX512
  // lanes of [e, e + 16) that are masked ids
  __mmask16 lanes(int64_t e) const {
    uint32_t bits = 0;
    for (int64_t k = 0; k < n; ++k)
      if (ids[k] >= e && ids[k] < e + W) bits |= 1u << (ids[k] - e);
    return static_cast<__mmask16>(bits);
  }
#endif
};

#if SHOAL_AVX512
// `weight` in 16 lanes, the same value lane for lane (the same division; exp_neg16 is exp_neg
// step for step). The passes over a row in 16 lanes (the max, the block sums, the weights, and
// the scans for a bucket's or the kept tokens) draw the same tokens as the scalar loops (compared
// on 2,880 rows with masks, top_k, top_p, NaN and inf; the AVX2 build too). 32 x 49152 bf16
// rows (logits ~N(0, 3)), 2 threads, Zen 5, median ms: plain draw 1.03-1.05 -> 0.42-0.43, top_p
// 0.9 3.41-3.44 -> 1.70-2.12, top_k 50 2.83-2.87 -> 1.13; on the model's own next-token logits
// (32 rows of SmolLM2-135M's) plain 1.07-1.09 -> 0.42-0.43, top_p 0.9 2.70-2.74 -> 0.88-0.90 and
// top_k 50 2.71-2.72 -> 0.89-0.90 (with the keys computed 16 at a time before the histogram's
// scalar loop, which sums each bucket's mass in index order).
inline __m512 weight16(__m512 x, __m512 m, __m512 t) {
  const __m512 z = _mm512_div_ps(_mm512_sub_ps(x, m), t);
  const __mmask16 keep = _mm512_cmp_ps_mask(z, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);  // !(z < -87)
  return _mm512_maskz_mov_ps(keep, exp_neg16(z));
}
#endif

// Sum of the weights in [e0, e1): a full block in lanes, then the lanes in order; a tail in
// index order. With masked ids the same order, their weights 0.
template <typename T>
float block_sum(const T* x, int64_t e0, int64_t e1, float m, float t, const Masked* mask) {
  float s = 0.0f;
  if (e1 - e0 == kBlock) {
    float acc[W] = {0};
#if SHOAL_AVX512
    {  // lane l's sum in the same order; a masked id adds nothing (+0.0f: the same sum)
      const __m512 mv = _mm512_set1_ps(m), tv = _mm512_set1_ps(t);
      __m512 a = _mm512_setzero_ps();
      for (int64_t i = e0; i < e1; i += W) {
        const __m512 w = weight16(lanes(x + i), mv, tv);
        a = _mm512_add_ps(a, mask ? _mm512_maskz_mov_ps(static_cast<__mmask16>(~mask->lanes(i)), w) : w);
      }
      _mm512_storeu_ps(acc, a);
      for (int l = 0; l < W; ++l) s += acc[l];
      return s;
    }
#endif
    if (mask == nullptr) {
      for (int64_t i = e0; i < e1; i += W)
        for (int l = 0; l < W; ++l) acc[l] += weight(ld(x, i + l), m, t);
    } else {
      for (int64_t i = e0; i < e1; i += W)
        for (int l = 0; l < W; ++l) acc[l] += mask->has(i + l) ? 0.0f : weight(ld(x, i + l), m, t);
    }
    for (int l = 0; l < W; ++l) s += acc[l];
  } else {
    for (int64_t i = e0; i < e1; ++i) s += mask && mask->has(i) ? 0.0f : weight(ld(x, i), m, t);
  }
  return s;
}

// The first index in [e0, e1) where `acc` plus the weights so far exceeds `target`; if none
// (the block sums and this walk round differently), the block's last index of weight > 0.
template <typename T>
int64_t walk(const T* x, int64_t e0, int64_t e1, float m, float t, const Masked& mask, double acc,
             double target) {
  int64_t last = e0;
  for (int64_t e = e0; e < e1; ++e) {
    const float p = mask.has(e) ? 0.0f : weight(ld(x, e), m, t);
    if (p > 0.0f) {
      last = e;
      acc += p;
      if (acc > target) return e;
    }
  }
  return last;
}

// The max of the row's unmasked values into m. Returns the token to give outright for a row
// with a NaN (its first NaN, as torch.argmax of noisy probabilities did), with +inf (its first
// unmasked +inf) or of -inf only (0); else -1.
template <typename T>
int64_t row_max(const T* x, int64_t v, const Masked& mask, float& m) {
  float best[W];
  int32_t nan[W];
  for (int l = 0; l < W; ++l) best[l] = -INFINITY, nan[l] = 0;
  int64_t e = 0;
#if SHOAL_AVX512
  {  // the same lanes: a NaN never replaces a lane's best (f > best is false), it sets the flag
    __m512 bv = _mm512_set1_ps(-INFINITY);
    __mmask16 nv = 0;
    for (; e + W <= v; e += W) {
      const __m512 f = lanes(x + e);
      bv = _mm512_mask_mov_ps(bv, _mm512_cmp_ps_mask(f, bv, _CMP_GT_OQ), f);
      nv |= _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    }
    _mm512_storeu_ps(best, bv);
    for (int l = 0; l < W; ++l) nan[l] = (nv >> l) & 1;
  }
#endif
  for (; e + W <= v; e += W)
    for (int l = 0; l < W; ++l) {
      const float f = ld(x, e + l);
      best[l] = f > best[l] ? f : best[l];
      nan[l] |= f != f;
    }
  for (; e < v; ++e) {
    const float f = ld(x, e);
    if (f > best[e % W]) best[e % W] = f;
    nan[e % W] |= f != f;
  }
  m = -INFINITY;
  int any_nan = 0;
  for (int l = 0; l < W; ++l) m = best[l] > m ? best[l] : m, any_nan |= nan[l];
  bool hit = false;  // does a masked id hold the max? then the max of the rest
  for (int64_t k = 0; k < mask.n; ++k) hit |= mask.ids[k] < v && ld(x, mask.ids[k]) == m;
  if (hit && !any_nan) {
    m = -INFINITY;
    for (int64_t i = 0; i < v; ++i)
      if (ld(x, i) > m && !mask.has(i)) m = ld(x, i);
  }
  if (any_nan || m == INFINITY) {
    int64_t i = 0;
    while (any_nan ? ld(x, i) == ld(x, i) : (ld(x, i) != INFINITY || mask.has(i))) ++i;
    return i;
  }
  return m == -INFINITY ? 0 : -1;
}

// Semantics: l = x with the masked ids at -inf; w_j = exp((l_j - max l) / t); the token is the
// first j whose running sum of w exceeds u * sum(w), with w summed per block of kBlock (lanes,
// then lanes in order, in fp32) and the blocks in fp64 in index order.
template <typename T>
int64_t sample_row(const T* x, int64_t v, float t, double u, const Masked& mask,
                   std::vector<double>& sums) {
  float m;
  const int64_t odd = row_max(x, v, mask, m);
  if (odd >= 0) return odd;
  const int64_t nb = (v + kBlock - 1) / kBlock;
  sums.resize(nb);
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t e0 = b * kBlock, e1 = e0 + kBlock < v ? e0 + kBlock : v;
    bool masked = false;
    for (int64_t k = 0; k < mask.n; ++k) masked |= e0 <= mask.ids[k] && mask.ids[k] < e1;
    sums[b] = block_sum(x, e0, e1, m, t, masked ? &mask : nullptr);
    total += sums[b];
  }
  const double target = u * total;
  double acc = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    if (acc + sums[b] > target) {
      const int64_t e0 = b * kBlock;
      return walk(x, e0, e0 + kBlock < v ? e0 + kBlock : v, m, t, mask, acc, target);
    }
    acc += sums[b];
  }
  int64_t b = nb - 1;  // u * total rounded up to total: the last block with weight
  while (b > 0 && sums[b] == 0.0) --b;
  return walk(x, b * kBlock, b * kBlock + kBlock < v ? b * kBlock + kBlock : v, m, t, mask, 0.0,
              INFINITY);
}

struct Scratch {  // per thread
  std::vector<double> sums, mass;
  std::vector<float> w;
  std::vector<int64_t> cnt;
  std::vector<uint16_t> keys;
  BucketWalk walk;
};

// With top_k (1..v; v = off) and top_p (in (0, 1]; 1 = off). Semantics: w as above; keep the
// k largest w (ties: the lower index first); then, in that order, the tokens whose preceding
// mass (sum of the w before them / sum of the kept w) is below top_p (the first always); draw
// from the kept ones as above (their w summed in index order, in fp64). Without a full sort:
// a histogram of the weights' buckets (`key_of`: count and mass) finds the bucket where each
// cut falls, and that bucket is walked in order (`BucketWalk`: a group of it sorted where the cut
// may fall). Measured (256 rows x 49,152 bf16 logits, 2 threads, AMD EPYC Zen 4, us a row): top_p
// 0.95 on SmolLM2-135M's own logits at temperature 1 / 2: 46.3 / 99.7 -> 39.3 / 50.3; a flat row
// (N(0, 0.05) logits, temperature 0.7) 345 -> 77.5; the same draws (a digest of all of them).
template <typename T>
int64_t sample_filtered(const T* x, int64_t v, float t, double u, const Masked& mask, int64_t k,
                        float top_p, Scratch& sc) {
  float m;
  const int64_t odd = row_max(x, v, mask, m);
  if (odd >= 0) return odd;
  std::vector<float>& w = sc.w;
  w.resize(v);
  int64_t e = 0;
#if SHOAL_AVX512
  {
    const __m512 mv = _mm512_set1_ps(m), tv = _mm512_set1_ps(t);
    for (; e + W <= v; e += W) _mm512_storeu_ps(w.data() + e, weight16(lanes(x + e), mv, tv));
  }
#endif
  for (; e + W <= v; e += W)
    for (int l = 0; l < W; ++l) w[e + l] = weight(ld(x, e + l), m, t);
  for (; e < v; ++e) w[e] = weight(ld(x, e), m, t);
  for (int64_t i = 0; i < mask.n; ++i) w[mask.ids[i]] = 0.0f;
  sc.cnt.assign(kKeys + 1, 0);  // bucket kKeys: w = 0 (the vector loop's), never read
  sc.mass.assign(kKeys + 1, 0.0);
  int64_t j0 = 0;
#if SHOAL_AVX512
  {  // the keys 16 at a time (kKeys for w = 0: no bucket), then the counts and masses in order
    std::vector<uint16_t>& keys = sc.keys;
    keys.resize(v);
    const __m512i top = _mm512_set1_epi32(kKeys - 1);
    for (; j0 + W <= v; j0 += W) {
      const __m512i b = _mm512_loadu_si512(w.data() + j0);
      __m512i k = _mm512_min_epu32(_mm512_srli_epi32(b, kShift), top);
      const __mmask16 none = _mm512_cmp_ps_mask(_mm512_castsi512_ps(b), _mm512_setzero_ps(), _CMP_LE_OQ);  // w <= 0
      k = _mm512_mask_mov_epi32(k, none, _mm512_set1_epi32(kKeys));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys.data() + j0), _mm512_cvtepi32_epi16(k));
    }
    if (k < v) {
      for (int64_t j = 0; j < j0; ++j) {
        ++sc.cnt[keys[j]];
        sc.mass[keys[j]] += w[j];
      }
    } else {  // (no top_k: the counts are not read)
      for (int64_t j = 0; j < j0; ++j) sc.mass[keys[j]] += w[j];
    }
  }
#endif
  for (int64_t j = j0; j < v; ++j)
    if (w[j] > 0.0f) {
      const int key = key_of(w[j]);
      ++sc.cnt[key];
      sc.mass[key] += w[j];
    }
  // 1) top_k: keys above `cut` are kept whole, and of key `cut` the first `n_cut` ids of its walk
  // (w descending, ties by index), the last of them (wc, jc); cut -1: every token of weight > 0
  int cut = -1;
  BucketWalk& walk = sc.walk;
  int64_t n_cut = 0, jc = -1;
  float wc = 0.0f;
  double kept = 0.0;  // the kept mass
  double in_cut = 0.0;  // the kept mass of key `cut`, summed in the walk's order
  for (int key = kKeys - 1; key >= 0; --key) kept += sc.mass[key];
  if (k < v) {
    int64_t above = 0;
    double above_mass = 0.0;
    for (int key = kKeys - 1; key >= 0; --key) {
      if (above + sc.cnt[key] >= k) {
        cut = key;
        walk.init(w, key);
        kept = above_mass;
        n_cut = walk.take(w, k - above, exact_sums(key, v), [](double) { return true; }, kept, &in_cut, jc, wc);
        break;
      }
      above += sc.cnt[key];
      above_mass += sc.mass[key];
    }
  }
  // 2) top_p: walk the kept buckets from the top; where the preceding mass reaches top_p * kept,
  // that bucket is walked in order and cut; everything after it is dropped
  if (top_p < 1.0f) {
    const double limit = top_p * kept;
    double before = 0.0;
    for (int key = kKeys - 1; key >= 0 && key >= cut; --key) {
      const double in = key == cut ? in_cut : sc.mass[key];
      if (in == 0.0) continue;
      if (before + in < limit) {
        before += in;
        continue;
      }
      int64_t end = n_cut;  // key == cut: within top_k's kept ids
      if (key != cut) walk.init(w, key), end = walk.size();
      n_cut = walk.take(w, end, exact_sums(key, v), [&](double b) { return b < limit || b == 0.0; },  // the top always
                        before, nullptr, jc, wc);
      cut = key;
      kept = before;  // (now the kept mass)
      break;
    }
  }
  if (cut >= 0 && exact_sums(cut, v)) return draw_exact(w, cut, wc, jc, u * kept);
  // 3) the draw, in index order over the kept ids: of key `cut`, those not after (wc, jc) in the
  // walk's order
  double sum = 0.0;
  for (int pass = 0; pass < 2; ++pass) {
    const double target = u * sum;
    double acc = 0.0;
    int64_t last = -1, found = -1;
    for_keys(w, cut, false, [&](int64_t j) {  // the tokens of weight > 0 and key >= cut
      if (key_of(w[j]) == cut && !(w[j] > wc || (w[j] == wc && j <= jc))) return false;
      acc += w[j];
      last = j;
      if (pass == 1 && acc > target) found = j;
      return found >= 0;
    });
    if (pass == 1) return found >= 0 ? found : last;
    sum = acc;
  }
  return 0;  // (not reached)
}

}  // namespace

extern "C" {

// x (*, v) in dtype dt (row stride xs): for each of the n rows listed in rows, one token drawn
// from softmax(x[row] / t[i]) with the uniform number u[i] in [0, 1), the ids
// masked[mask_off[i]:mask_off[i + 1]] at -inf, top_k[i] (v = off) and top_p[i] (1 = off)
// -> tok (n,) int64.
int shoal_sample_rows(int dt, const void* x, int64_t xs, int64_t v, int64_t n, const int64_t* rows,
                      const float* t, const double* u, const int64_t* mask_off, const int64_t* masked,
                      const int64_t* top_k, const float* top_p, int64_t* tok) {
  if (dt != 0 && dt != 1) return 1;
#pragma omp parallel if (n >= 2)
  {
    Scratch sc;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const Masked mask{masked + mask_off[i], mask_off[i + 1] - mask_off[i]};
      const bool plain = top_k[i] >= v && top_p[i] >= 1.0f;
      if (dt == 0) {
        const float* r = static_cast<const float*>(x) + rows[i] * xs;
        tok[i] = plain ? sample_row(r, v, t[i], u[i], mask, sc.sums)
                       : sample_filtered(r, v, t[i], u[i], mask, top_k[i], top_p[i], sc);
      } else {
        const bf16_t* r = static_cast<const bf16_t*>(x) + rows[i] * xs;
        tok[i] = plain ? sample_row(r, v, t[i], u[i], mask, sc.sums)
                       : sample_filtered(r, v, t[i], u[i], mask, top_k[i], top_p[i], sc);
      }
    }
  }
  return 0;
}

}  // extern "C"
