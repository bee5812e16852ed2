// Decode attention over an int8 paged cache (`shoal_decode_attention` with dtc 2, attention.cpp),
// head size 64 or 128, up to 8 query heads a kv head, on AVX-512 CPUs.

#include "attention.h"

#if SHOAL_AVX512
namespace {
using namespace shoal;

// ---- decode attention over an int8 cache (dtc 2), head size 64 or 128 --------------------------------
// Keys and values stored as int8 rows with one fp32 scale each (`shoal_cache_write`). Per (row,
// kv head), for each of its g query heads:
//  1) the query in int16 with its own scale (round(q * 32767 / amax)), q.k as exact int32 dot
//     products (VPDPWSSD, or VPMADDWD + add without AVX512-VNNI) of 16 keys summed by the same
//     fixed tree as the bf16 body (in int32: exact), then s = float(sum) * k scale * (q scale *
//     softmax scale);
//  2) p = exp(s - max) in fp32, sum = p's sum (16 lanes in key order), w = p * v scale, and w
//     in int16 against its largest (w16 = round(w * 32767 / wmax));
//  3) out = (w16 . v in exact int32 sums over key pairs, flushed to fp32 every 256 keys) *
//     wmax / 32767 / sum.
// A row's bits depend on its own query, keys and values only (batch invariant).
inline __m512i dot16(__m512i acc, __m512i a, __m512i b) {  // acc + pairs of int16 products
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

inline __m512i lane_sums16i(__m512i v[16]) {  // lane i = the sum of v[i]'s lanes (int32)
  __m512i c[8], e[4];
  for (int m = 0; m < 8; ++m)
    c[m] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * m], v[2 * m + 1]), _mm512_unpackhi_epi32(v[2 * m], v[2 * m + 1]));
  for (int n = 0; n < 4; ++n)
    e[n] = _mm512_add_epi32(_mm512_unpacklo_epi64(c[2 * n], c[2 * n + 1]), _mm512_unpackhi_epi64(c[2 * n], c[2 * n + 1]));
  const __m512i f = _mm512_add_epi32(_mm512_shuffle_i32x4(e[0], e[1], 0x88), _mm512_shuffle_i32x4(e[0], e[1], 0xdd));
  const __m512i g = _mm512_add_epi32(_mm512_shuffle_i32x4(e[2], e[3], 0x88), _mm512_shuffle_i32x4(e[2], e[3], 0xdd));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(f, g, 0x88), _mm512_shuffle_i32x4(f, g, 0xdd));
}

constexpr int kAhead8 = 32;  // int8 rows are one cache line: 32 keys ahead (measured: 8 and 16 were too few)

template <int G, int D>
void attend_i8(const float* qf, const int8_t* kbase, const int8_t* vbase, const float* ksb, const float* vsb,
                 const int64_t* slots, int64_t len, float scale, float* w, int16_t* w16, float* outf) {
  float sum[G], wscale[G];
  for (int j = 0; j < G; ++j) {
    // 1) scores of head j into w[j * len ...]
    const float* qj = qf + D * j;
    float amax = 0.0f;
    for (int e = 0; e < D; ++e) amax = std::fmax(amax, std::fabs(qj[e]));
    const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    alignas(64) int16_t q16[D];
    for (int e = 0; e < D; ++e) q16[e] = static_cast<int16_t>(std::nearbyint(qj[e] * inv));
    __m512i qv[D / 32];
    for (int z = 0; z < D / 32; ++z) qv[z] = _mm512_load_si512(q16 + 32 * z);
    const float qscale = amax / 32767.0f * scale;
    float* sj = w + j * len;
    if (j == 0)
      for (int64_t s = 0; s < kAhead8 && s < len; ++s) {
        for (int z = 0; z < D / 64; ++z) {
          prefetch_kv(reinterpret_cast<const char*>(kbase + slots[s] * D + 64 * z));
          prefetch_kv(reinterpret_cast<const char*>(vbase + slots[s] * D + 64 * z));
        }
        prefetch_kv(reinterpret_cast<const char*>(ksb + slots[s]));
        prefetch_kv(reinterpret_cast<const char*>(vsb + slots[s]));
      }
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
      const int n = len - s0 < 16 ? static_cast<int>(len - s0) : 16;
      __m512i acc[16];
      alignas(64) float ksc[16];
      for (int i = 0; i < 16; ++i) {
        if (i < n) {
          if (j == 0 && s0 + i + kAhead8 < len) {  // this key's row and value row, kAhead8 keys ahead
            for (int z = 0; z < D / 64; ++z) {
              prefetch_kv(reinterpret_cast<const char*>(kbase + slots[s0 + i + kAhead8] * D + 64 * z));
              prefetch_kv(reinterpret_cast<const char*>(vbase + slots[s0 + i + kAhead8] * D + 64 * z));
            }
            if ((i & 15) == 0) {  // and their scales' lines (16 slots a line within a block)
              prefetch_kv(reinterpret_cast<const char*>(ksb + slots[s0 + i + kAhead8]));
              prefetch_kv(reinterpret_cast<const char*>(vsb + slots[s0 + i + kAhead8]));
            }
          }
          __m512i d2 = _mm512_setzero_si512();
          for (int z = 0; z < D / 64; ++z) {  // 64 int8 -> two vectors of 32 int16
            const __m512i kr = _mm512_loadu_si512(kbase + slots[s0 + i] * D + 64 * z);
            d2 = dot16(d2, qv[2 * z], _mm512_cvtepi8_epi16(_mm512_castsi512_si256(kr)));
            d2 = dot16(d2, qv[2 * z + 1], _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(kr, 1)));
          }
          acc[i] = d2;
          ksc[i] = ksb[slots[s0 + i]];
        } else {
          acc[i] = _mm512_setzero_si512();
          ksc[i] = 0.0f;
        }
      }
      const __m512 r = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lane_sums16i(acc)), _mm512_load_ps(ksc)),
                                     _mm512_set1_ps(qscale));
      store_lanes(sj + s0, static_cast<__mmask16>((1u << n) - 1), r);
    }
    // 2) p = exp(s - max); sum; w = p * v scale (in place)
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
      const __mmask16 k = static_cast<__mmask16>(len - s0 < 16 ? (1u << (len - s0)) - 1 : 0xffffu);
      m = _mm512_max_ps(m, load_lanes(sj + s0, k, _mm512_set1_ps(-INFINITY)));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 acc = _mm512_setzero_ps(), wmax = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
      const int n = len - s0 < 16 ? static_cast<int>(len - s0) : 16;
      const __mmask16 k = static_cast<__mmask16>((1u << n) - 1);
      const __m512 p = _mm512_maskz_mov_ps(k, exp_neg16(_mm512_sub_ps(load_lanes(sj + s0, k), mx)));
      acc = _mm512_add_ps(acc, p);
      alignas(64) float vsc[16];
      for (int i = 0; i < 16; ++i) vsc[i] = i < n ? vsb[slots[s0 + i]] : 0.0f;
      const __m512 wv = _mm512_mul_ps(p, _mm512_load_ps(vsc));
      wmax = _mm512_max_ps(wmax, wv);
      store_lanes(sj + s0, k, wv);
    }
    sum[j] = _mm512_reduce_add_ps(acc);
    // w in int16 against the row's largest: w16 = round(w * 32767 / wmax) (pad to a pair: 0)
    const float wm = _mm512_reduce_max_ps(wmax);
    wscale[j] = wm / 32767.0f;
    const __m512 winv = _mm512_set1_ps(wm > 0.0f ? 32767.0f / wm : 0.0f);
    int16_t* wj = w16 + j * (len + 16);
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
      const int n = len - s0 < 16 ? static_cast<int>(len - s0) : 16;
      const __mmask16 k = static_cast<__mmask16>((1u << n) - 1);
      const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(load_lanes(sj + s0, k), winv));  // (RNE)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(wj + s0), _mm512_cvtepi32_epi16(r));  // (lanes past len: 0)
    }
  }
  // 3) out (G, D) = sum over key pairs of w16 . v (int16 x int8 in exact int32 sums, converted to
  //    fp32 every 256 keys so they cannot overflow), times wscale / sum; the pair's value rows
  //    interleaved by unpack, so lane 4L + i of part c holds output 32 (c / 2) + 8L + 4 (c % 2) + i
  constexpr int C = D / 16;  // parts of 16 outputs
  __m512 o[G][C];
  __m512i ai[G][C];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < C; ++c) o[j][c] = _mm512_setzero_ps(), ai[j][c] = _mm512_setzero_si512();
  for (int64_t s = 0; s < len; s += 2) {  // (the value rows were prefetched with the keys)
    __m512i v[C];
    for (int z = 0; z < D / 64; ++z) {
      const __m512i va = _mm512_loadu_si512(vbase + slots[s] * D + 64 * z);
      const __m512i vb = s + 1 < len ? _mm512_loadu_si512(vbase + slots[s + 1] * D + 64 * z) : _mm512_setzero_si512();
      const __m512i a0 = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(va)), a1 = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(va, 1));
      const __m512i b0 = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(vb)), b1 = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(vb, 1));
      v[4 * z] = _mm512_unpacklo_epi16(a0, b0), v[4 * z + 1] = _mm512_unpackhi_epi16(a0, b0);
      v[4 * z + 2] = _mm512_unpacklo_epi16(a1, b1), v[4 * z + 3] = _mm512_unpackhi_epi16(a1, b1);
    }
    for (int j = 0; j < G; ++j) {
      int32_t pr;
      __builtin_memcpy(&pr, w16 + j * (len + 16) + s, 4);
      const __m512i pp = _mm512_set1_epi32(pr);
      for (int c = 0; c < C; ++c) ai[j][c] = dot16(ai[j][c], pp, v[c]);
    }
    if ((s + 2) % 256 == 0 || s + 2 >= len)  // 256 keys: |sum| <= 256 * 32767 * 127 < 2^31
      for (int j = 0; j < G; ++j)
        for (int c = 0; c < C; ++c) {
          o[j][c] = _mm512_add_ps(o[j][c], _mm512_cvtepi32_ps(ai[j][c]));
          ai[j][c] = _mm512_setzero_si512();
        }
  }
  for (int j = 0; j < G; ++j) {
    alignas(64) float t[C][16];
    const __m512 f = _mm512_set1_ps(wscale[j] / sum[j]);
    for (int c = 0; c < C; ++c) _mm512_store_ps(t[c], _mm512_mul_ps(o[j][c], f));
    float* oj = outf + D * j;
    for (int c = 0; c < C; ++c)
      for (int l = 0; l < 4; ++l)
        for (int i = 0; i < 4; ++i) oj[32 * (c / 2) + 8 * l + 4 * (c % 2) + i] = t[c][4 * l + i];
  }
}

template <typename TQ, int D>
void decode_attention_i8(const TQ* q, int64_t qs, const int64_t* rows, int64_t b, int64_t h, int64_t hkv,
                         const int8_t* kc, const int8_t* vc, const float* ksc, const float* vsc,
                         int64_t num_slots, const int64_t* slots, const int64_t* off, int64_t window,
                         float scale, TQ* out, int64_t os) {
  const int64_t g = h / hkv;
  int64_t max_len = 0;
  for (int64_t i = 0; i < b; ++i) max_len = off[i + 1] - off[i] > max_len ? off[i + 1] - off[i] : max_len;
#pragma omp parallel if (b * hkv > 1)
  {
    float* w = static_cast<float*>(std::malloc(sizeof(float) * (g * max_len + 16)));
    int16_t* w16 = static_cast<int16_t*>(std::malloc(sizeof(int16_t) * g * (max_len + 16)));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < b * hkv; ++t) {
      const int64_t i = t / hkv, kh = t % hkv, r = rows[i];
      int64_t lo = off[i], hi = off[i + 1];
      if (window > 0 && hi - lo > window) lo = hi - window;
      float qf[8 * D], of[8 * D];
      for (int64_t e = 0; e < g * D; ++e) qf[e] = ld(q + r * qs + kh * g * D, e);
      const int8_t* kb = kc + kh * num_slots * D;
      const int8_t* vb = vc + kh * num_slots * D;
      const float* ks = ksc + kh * num_slots;
      const float* vs = vsc + kh * num_slots;
      switch (g) {
        case 1: attend_i8<1, D>(qf, kb, vb, ks, vs, slots + lo, hi - lo, scale, w, w16, of); break;
        case 2: attend_i8<2, D>(qf, kb, vb, ks, vs, slots + lo, hi - lo, scale, w, w16, of); break;
        case 3: attend_i8<3, D>(qf, kb, vb, ks, vs, slots + lo, hi - lo, scale, w, w16, of); break;
        case 4: attend_i8<4, D>(qf, kb, vb, ks, vs, slots + lo, hi - lo, scale, w, w16, of); break;
        case 5: attend_i8<5, D>(qf, kb, vb, ks, vs, slots + lo, hi - lo, scale, w, w16, of); break;
        case 6: attend_i8<6, D>(qf, kb, vb, ks, vs, slots + lo, hi - lo, scale, w, w16, of); break;
        case 7: attend_i8<7, D>(qf, kb, vb, ks, vs, slots + lo, hi - lo, scale, w, w16, of); break;
        default: attend_i8<8, D>(qf, kb, vb, ks, vs, slots + lo, hi - lo, scale, w, w16, of); break;
      }
      TQ* o = out + r * os + kh * g * D;
      for (int64_t e = 0; e < g * D; ++e) st(o, e, of[e]);
    }
    std::free(w);
    std::free(w16);
  }
}

}  // namespace
#endif  // SHOAL_AVX512

namespace shoal {

// attention.cpp's entry for an int8 cache with scales ksc, vsc (its arguments); 1 where this
// build or the shapes have no body (head size 64 or 128, 1-8 query heads a kv head, fp32 or bf16
// queries, AVX-512)
int decode_attention_int8(int dtq, const void* q, int64_t qs, const int64_t* rows, int64_t b, int64_t h, int64_t hkv,
                          int64_t d, const void* kc, const void* vc, int64_t num_slots, const int64_t* slots,
                          const int64_t* off, int64_t window, float scale, void* out, int64_t os, const float* ksc,
                          const float* vsc) {
#if SHOAL_AVX512
  if (!ksc || !vsc || (d != 64 && d != 128) || hkv <= 0 || h % hkv != 0 || h / hkv > 8 || (dtq != 0 && dtq != 1))
    return 1;
  auto run = [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    if (dtq == 0)
      decode_attention_i8<float, D>((const float*)q, qs, rows, b, h, hkv, (const int8_t*)kc, (const int8_t*)vc, ksc,
                                    vsc, num_slots, slots, off, window, scale, (float*)out, os);
    else
      decode_attention_i8<bf16_t, D>((const bf16_t*)q, qs, rows, b, h, hkv, (const int8_t*)kc, (const int8_t*)vc,
                                     ksc, vsc, num_slots, slots, off, window, scale, (bf16_t*)out, os);
  };
  by_head_size(d, run);
  return 0;
#else
  (void)dtq, (void)q, (void)qs, (void)rows, (void)b, (void)h, (void)hkv, (void)d, (void)kc, (void)vc,
      (void)num_slots, (void)slots, (void)off, (void)window, (void)scale, (void)out, (void)os, (void)ksc, (void)vsc;
  return 1;
#endif
}

}  // namespace shoal
