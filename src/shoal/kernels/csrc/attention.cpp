// Decode attention over a paged KV cache, read in place (see common.h for element types).
// One task per (row, kv head); each row is computed alone in a fixed order (batch invariant).

#include "common.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
using namespace shoal;

// Softmax of each of g rows of scores (g, len) in place, left unnormalized: scores = exp(s - max),
// inv[j] = 1 / the row's sum (applied to the output).
inline void softmax_rows(float* scores, int64_t g, int64_t len, float* inv) {
  for (int64_t j = 0; j < g; ++j) {
    float* sc = scores + j * len;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t s = 0; s < len; ++s) m = sc[s] > m ? sc[s] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t s = 0; s < len; ++s) {
      const float p = exp_neg(sc[s] - m);
      sc[s] = p;
      sum += p;
    }
    inv[j] = 1.0f / sum;
  }
}

#if defined(__AVX512F__)
// One decode-attention task (a row's G query heads over one kv head), head size 64, with
// AVX-512 intrinsics: the G queries live in registers, each key and value row is loaded and
// widened once for all G heads, and the G output rows accumulate in registers. The compiler's
// version of the same loops (below) ran 3x slower on the scores (31.9 vs 10.7 ns a key for
// three heads; its dot products left no room between one key's reduction and the next).
template <typename TC> inline void row64(const TC* p, __m512 r[4]);
template <> inline void row64<float>(const float* p, __m512 r[4]) {
  for (int c = 0; c < 4; ++c) r[c] = _mm512_loadu_ps(p + 16 * c);
}
template <> inline void row64<bf16_t>(const bf16_t* p, __m512 r[4]) {
  for (int c = 0; c < 4; ++c) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * c));
    r[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

constexpr int kPrefetch = 8;  // keys ahead
template <typename TC>
inline void prefetch_row(const TC* p) {  // one key or value row: 64 elements
  const char* c = reinterpret_cast<const char*>(p);
  for (int b = 0; b < 64 * static_cast<int>(sizeof(TC)); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

template <typename TC, int G>
void attend64(const float* qf, const TC* kbase, const TC* vbase, const int64_t* slots, int64_t len,
              float scale, float* scores, float* outf) {
  __m512 q[G][4];
  for (int j = 0; j < G; ++j) row64<float>(qf + 64 * j, q[j]);
  // 1) scores (G, len) = q . k * scale: per key, products of 4 chunks summed pairwise, then
  //    the 16 lanes
  // keys and values are read through the slot table (paged: a jump at each block's end), so
  // each row is fetched kPrefetch keys ahead
  for (int64_t s = 0; s < len; ++s) {
    if (s + kPrefetch < len) prefetch_row(kbase + slots[s + kPrefetch] * 64);
    __m512 k[4];
    row64<TC>(kbase + slots[s] * 64, k);
    for (int j = 0; j < G; ++j) {
      const __m512 a = _mm512_add_ps(_mm512_mul_ps(q[j][0], k[0]), _mm512_mul_ps(q[j][1], k[1]));
      const __m512 b = _mm512_add_ps(_mm512_mul_ps(q[j][2], k[2]), _mm512_mul_ps(q[j][3], k[3]));
      scores[j * len + s] = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * scale;
    }
  }
  // 2) softmax per head (probabilities left unnormalized; 1 / sum applied at the end)
  float inv[G];
  softmax_rows(scores, G, len, inv);
  // 3) out (G, 64) = p @ v, accumulated in registers in key order
  __m512 acc[G][4];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < 4; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < kPrefetch && s < len; ++s) prefetch_row(vbase + slots[s] * 64);
  for (int64_t s = 0; s < len; ++s) {
    if (s + kPrefetch < len) prefetch_row(vbase + slots[s + kPrefetch] * 64);
    __m512 v[4];
    row64<TC>(vbase + slots[s] * 64, v);
    for (int j = 0; j < G; ++j) {
      const __m512 p = _mm512_set1_ps(scores[j * len + s]);
      for (int c = 0; c < 4; ++c) acc[j][c] = _mm512_add_ps(acc[j][c], _mm512_mul_ps(p, v[c]));
    }
  }
  for (int j = 0; j < G; ++j) {
    const __m512 iv = _mm512_set1_ps(inv[j]);
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(outf + 64 * j + 16 * c, _mm512_mul_ps(acc[j][c], iv));
  }
}

// the task for head size 64 and G <= 8 query heads per kv head; false when not covered
template <typename TC>
bool attend64_any(int64_t g, const float* qf, const TC* kb, const TC* vb, const int64_t* sl,
                  int64_t len, float scale, float* sc, float* of) {
  switch (g) {
    case 1: attend64<TC, 1>(qf, kb, vb, sl, len, scale, sc, of); return true;
    case 2: attend64<TC, 2>(qf, kb, vb, sl, len, scale, sc, of); return true;
    case 3: attend64<TC, 3>(qf, kb, vb, sl, len, scale, sc, of); return true;
    case 4: attend64<TC, 4>(qf, kb, vb, sl, len, scale, sc, of); return true;
    case 6: attend64<TC, 6>(qf, kb, vb, sl, len, scale, sc, of); return true;
    case 8: attend64<TC, 8>(qf, kb, vb, sl, len, scale, sc, of); return true;
    default: return false;
  }
}
#endif

// ---- decode attention over a paged cache, read in place ---------------------------------------
// Row r = rows[i] of q (n, h, d) (row stride qs) attends over its keys at slots
// slots[off[i]:off[i+1]] (position order), the last `window` of them when window > 0.
// One task per (row, kv head): the group's query heads share each key and value read.
// out[r] (row stride os) = softmax(q k^T * scale) v, accumulated in fp32.
// DT: the head size as a compile-time constant (64, 128: loops over it unroll fully; measured
// 32 rows x 200 keys, one layer: 919 us with a runtime head size), or 0 for any other.
template <typename TQ, typename TC, int DT>
void decode_attention_impl(const TQ* q, int64_t qs, const int64_t* rows, int64_t b, int64_t h,
                           int64_t hkv, int64_t d_arg, const TC* kc, const TC* vc, int64_t num_slots,
                           const int64_t* slots, const int64_t* off, int64_t window, float scale,
                           TQ* out, int64_t os) {
  const int64_t d = DT > 0 ? DT : d_arg;
  const int64_t g = h / hkv;
  int64_t max_len = 0;
  for (int64_t i = 0; i < b; ++i) max_len = off[i + 1] - off[i] > max_len ? off[i + 1] - off[i] : max_len;
#pragma omp parallel if (b * hkv > 1)
  {
    float* scores = static_cast<float*>(std::malloc(sizeof(float) * (g * max_len + 1)));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < b * hkv; ++t) {
      const int64_t i = t / hkv, kh = t % hkv;
      const int64_t r = rows[i];
      int64_t lo = off[i], hi = off[i + 1];
      if (window > 0 && hi - lo > window) lo = hi - window;
      const int64_t len = hi - lo;
      float qf[g][d];
      float acc[g][d];
      for (int64_t j = 0; j < g; ++j) {
        const TQ* qr = q + r * qs + (kh * g + j) * d;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) {
          qf[j][e] = ld(qr, e);
          acc[j][e] = 0.0f;
        }
      }
      const TC* kbase = kc + kh * num_slots * d;
      const TC* vbase = vc + kh * num_slots * d;
#if defined(__AVX512F__)
      if (DT == 64) {
        float of[g * 64];
        if (attend64_any<TC>(g, &qf[0][0], kbase, vbase, slots + lo, len, scale, scores, of)) {
          for (int64_t j = 0; j < g; ++j) {
            TQ* o = out + r * os + (kh * g + j) * d;
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) st(o, e, of[j * 64 + e]);
          }
          continue;
        }
      }
#endif
      // 1) scores (g, len) = q . k * scale
      for (int64_t s = 0; s < len; ++s) {
        const TC* kr = kbase + slots[lo + s] * d;
        float kf[d];
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) kf[e] = ld(kr, e);
        for (int64_t j = 0; j < g; ++j) {
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t e = 0; e < d; ++e) dot += qf[j][e] * kf[e];
          scores[j * len + s] = dot * scale;
        }
      }
      // 2) softmax per query head, then 3) the weighted sum of values
      float inv[g];
      softmax_rows(scores, g, len, inv);
      for (int64_t s = 0; s < len; ++s) {
        const TC* vr = vbase + slots[lo + s] * d;
        float vf[d];
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) vf[e] = ld(vr, e);
        for (int64_t j = 0; j < g; ++j) {
          const float p = scores[j * len + s];
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) acc[j][e] += p * vf[e];
        }
      }
      for (int64_t j = 0; j < g; ++j) {
        TQ* o = out + r * os + (kh * g + j) * d;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) st(o, e, acc[j][e] * inv[j]);
      }
    }
    std::free(scores);
  }
}

template <typename TQ, typename TC>
void decode_attention_d(const void* q, int64_t qs, const int64_t* rows, int64_t b, int64_t h,
                        int64_t hkv, int64_t d, const void* kc, const void* vc, int64_t num_slots,
                        const int64_t* slots, const int64_t* off, int64_t window, float scale,
                        void* out, int64_t os) {
  auto run = [&](auto fn) {
    fn((const TQ*)q, qs, rows, b, h, hkv, d, (const TC*)kc, (const TC*)vc, num_slots, slots, off,
       window, scale, (TQ*)out, os);
  };
  if (d == 64)
    run(decode_attention_impl<TQ, TC, 64>);
  else if (d == 128)
    run(decode_attention_impl<TQ, TC, 128>);
  else
    run(decode_attention_impl<TQ, TC, 0>);
}

}  // namespace

extern "C" {

int shoal_decode_attention(int dtq, const void* q, int64_t qs, const int64_t* rows, int64_t b,
                           int64_t h, int64_t hkv, int64_t d, int dtc, const void* kc,
                           const void* vc, int64_t num_slots, const int64_t* slots,
                           const int64_t* off, int64_t window, float scale, void* out, int64_t os) {
  if (dtq == 0 && dtc == 0)
    decode_attention_d<float, float>(q, qs, rows, b, h, hkv, d, kc, vc, num_slots, slots, off, window, scale, out, os);
  else if (dtq == 1 && dtc == 1)
    decode_attention_d<bf16_t, bf16_t>(q, qs, rows, b, h, hkv, d, kc, vc, num_slots, slots, off, window, scale, out, os);
  else if (dtq == 0 && dtc == 1)
    decode_attention_d<float, bf16_t>(q, qs, rows, b, h, hkv, d, kc, vc, num_slots, slots, off, window, scale, out, os);
  else if (dtq == 1 && dtc == 0)
    decode_attention_d<bf16_t, float>(q, qs, rows, b, h, hkv, d, kc, vc, num_slots, slots, off, window, scale, out, os);
  else
    return 1;
  return 0;
}

}  // extern "C"
