// Decode attention over a paged KV cache, read in place (see common.h for element types).
// One task per (row, kv head); each row is computed alone in a fixed order (batch invariant).

#include <type_traits>

#include "attention.h"

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

#if SHOAL_AVX512
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
  for (int b = 0; b < 64 * static_cast<int>(sizeof(TC)); b += 64) prefetch_kv(c + b);
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

// The bf16 x bf16 body (queries and cache in bf16, head size 64 or 128): bf16 pair dot products
// (`dot2`: VDPBF16PS, or FMAs without AVX512-BF16) for both products, 3x fewer instructions a key
// than the fp32 body above (measured: bench/decode_attention.py).
//  1) scores, per query head, 16 keys at a time: a key's dot product is D / 32 `dot2`s into
//     16 lanes; the 16 keys' lanes are then summed by a fixed tree (unpack, unpack, two 128-bit
//     shuffles) that leaves key i's sum in lane i;
//  2) p = exp(s - max) rounded to bf16, sum = the rounded p's (fp32, 16 lanes in key order);
//  3) out = p.v / sum: keys in pairs (a key pair's value rows interleaved into bf16 pairs by
//     unpack, so lane 4L + i of part c holds output 32 (c / 2) + 8L + 4 (c % 2) + i),
//     one `dot2` chain in key order a part, un-permuted at the end.
// A row's bits depend on its own query, keys and values only (batch invariant).

// 16 vectors -> one: lane i = the sum of v[i]'s 16 lanes
inline __m512 lane_sums16(__m512 v[16]) {
  __m512 c[8], e[4];
  for (int m = 0; m < 8; ++m)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    c[m] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * m], v[2 * m + 1]), _mm512_unpackhi_ps(v[2 * m], v[2 * m + 1]));
  for (int n = 0; n < 4; ++n) {  // per 128-bit lane L: the lane's sums of keys 4n .. 4n + 3
    const __m512d x = _mm512_castps_pd(c[2 * n]), y = _mm512_castps_pd(c[2 * n + 1]);
    e[n] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 f = _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88), _mm512_shuffle_f32x4(e[0], e[1], 0xdd));
  const __m512 g = _mm512_add_ps(_mm512_shuffle_f32x4(e[2], e[3], 0x88), _mm512_shuffle_f32x4(e[2], e[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(f, g, 0x88), _mm512_shuffle_f32x4(f, g, 0xdd));
}

template <int G, int D>
void attend_bf(const bf16_t* const* qrow, const bf16_t* kbase, const bf16_t* vbase, const int64_t* slots,
                 int64_t len, float scale, float* scores, bf16_t* p, float* outf) {
  // 1) scores (G, len)
  const __m512 sc = _mm512_set1_ps(scale);
  for (int j = 0; j < G; ++j) {
    __m512i qv[D / 32];
    for (int z = 0; z < D / 32; ++z) qv[z] = _mm512_loadu_si512(qrow[j] + 32 * z);
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
      const int n = len - s0 < 16 ? static_cast<int>(len - s0) : 16;
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) {
        if (i < n) {
          if (j == 0 && s0 + i + kPrefetch < len) {  // the key and value rows kPrefetch keys ahead
            for (int z = 0; z < D / 64; ++z) {
              prefetch_row(kbase + slots[s0 + i + kPrefetch] * D + 64 * z);
              prefetch_row(vbase + slots[s0 + i + kPrefetch] * D + 64 * z);
            }
          }
          const bf16_t* kr = kbase + slots[s0 + i] * D;
          __m512 d2 = _mm512_setzero_ps();
          for (int z = 0; z < D / 32; ++z) d2 = dot2(d2, qv[z], _mm512_loadu_si512(kr + 32 * z));
          acc[i] = d2;
        } else {
          acc[i] = _mm512_setzero_ps();
        }
      }
      const __m512 r = _mm512_mul_ps(lane_sums16(acc), sc);
      store_lanes(scores + j * len + s0, static_cast<__mmask16>((1u << n) - 1), r);
    }
  }
  // 2) p in bf16 (rows of len rounded up to 16, the pad 0), 1 / sum of the rounded p's
  const int64_t lp = (len + 15) & ~int64_t(15);
  float inv[G];
  for (int j = 0; j < G; ++j) {
    const float* sr = scores + j * len;
    bf16_t* pr = p + j * lp;
    // (load_lanes, store_lanes: plain loads and stores for whole groups of 16. Measured with
    // `bench/decode_attention.py --repeat 10`, 32 rows x 192 keys, 30 layers, Zen 5, builds
    // alternated three times, twice: bf16 cache 5.35-5.47 -> 5.27-5.37 ms, then 5.46-6.18 ->
    // 5.33-5.44; int8 cache 4.30-4.51 -> 4.34-4.39: the keys' reads bound the rest)
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
      const __mmask16 k = static_cast<__mmask16>(len - s0 < 16 ? (1u << (len - s0)) - 1 : 0xffffu);
      m = _mm512_max_ps(m, load_lanes(sr + s0, k, _mm512_set1_ps(-INFINITY)));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < len; s0 += 16) {
      const __mmask16 k = static_cast<__mmask16>(len - s0 < 16 ? (1u << (len - s0)) - 1 : 0xffffu);
      const __m512 e = _mm512_maskz_mov_ps(k, exp_neg16(_mm512_sub_ps(load_lanes(sr + s0, k), mx)));
      const __m256i pb = to_bf16(e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + s0), pb);  // (lanes past len: 0)
      sum = _mm512_add_ps(sum, widen16(pb));
    }
    inv[j] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  // 3) out (G, D) = p.v, key pairs in order
  constexpr int C = D / 16;  // parts of 16 outputs
  __m512 acc[G][C];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < C; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < len; s += 2) {  // (the value rows were prefetched with the keys)
    const bf16_t* a = vbase + slots[s] * D;
    const bf16_t* b = s + 1 < len ? vbase + slots[s + 1] * D : nullptr;
    __m512i v[C];
    for (int z = 0; z < D / 32; ++z) {
      const __m512i az = _mm512_loadu_si512(a + 32 * z);
      const __m512i bz = b ? _mm512_loadu_si512(b + 32 * z) : _mm512_setzero_si512();
      v[2 * z] = _mm512_unpacklo_epi16(az, bz), v[2 * z + 1] = _mm512_unpackhi_epi16(az, bz);
    }
    for (int j = 0; j < G; ++j) {
      int32_t pp;
      __builtin_memcpy(&pp, p + j * lp + s, 4);
      const __m512i pv = _mm512_set1_epi32(pp);
      for (int c = 0; c < C; ++c) acc[j][c] = dot2(acc[j][c], pv, v[c]);
    }
  }
  for (int j = 0; j < G; ++j) {
    alignas(64) float t[C][16];
    for (int c = 0; c < C; ++c) _mm512_store_ps(t[c], _mm512_mul_ps(acc[j][c], _mm512_set1_ps(inv[j])));
    float* o = outf + D * j;
    for (int c = 0; c < C; ++c)  // part c, lane 4L + i -> output 32 (c / 2) + 8L + 4 (c % 2) + i
      for (int l = 0; l < 4; ++l)
        for (int i = 0; i < 4; ++i) o[32 * (c / 2) + 8 * l + 4 * (c % 2) + i] = t[c][4 * l + i];
  }
}

// the bf16 body for head size D (64 or 128) and G <= 8 query heads a kv head; false when not covered
template <int D, typename TQ, typename TC>
bool attend_bf_any(int64_t g, const TQ* q, const TC* kb, const TC* vb, const int64_t* sl, int64_t len,
                   float scale, float* sc, bf16_t* p, float* of) {
  if constexpr (std::is_same_v<TQ, bf16_t> && std::is_same_v<TC, bf16_t>) {
    const bf16_t* qr[8];
    for (int64_t j = 0; j < g && j < 8; ++j) qr[j] = q + D * j;
    switch (g) {
      case 1: attend_bf<1, D>(qr, kb, vb, sl, len, scale, sc, p, of); return true;
      case 2: attend_bf<2, D>(qr, kb, vb, sl, len, scale, sc, p, of); return true;
      case 3: attend_bf<3, D>(qr, kb, vb, sl, len, scale, sc, p, of); return true;
      case 4: attend_bf<4, D>(qr, kb, vb, sl, len, scale, sc, p, of); return true;
      case 6: attend_bf<6, D>(qr, kb, vb, sl, len, scale, sc, p, of); return true;
      case 8: attend_bf<8, D>(qr, kb, vb, sl, len, scale, sc, p, of); return true;
      default: return false;
    }
  }
  return false;
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
    bf16_t* pbuf = static_cast<bf16_t*>(std::malloc(sizeof(bf16_t) * g * (max_len + 16)));  // bf16 p
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
#if SHOAL_AVX512
      if (DT == 64 || DT == 128) {  // bf16 query and cache: pair dot products
        float ob[g * DT];
        if (attend_bf_any<DT, TQ, TC>(g, q + r * qs + kh * g * d, kbase, vbase, slots + lo, len, scale, scores,
                                      pbuf, ob)) {
          for (int64_t j = 0; j < g; ++j) {
            TQ* o = out + r * os + (kh * g + j) * d;
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) st(o, e, ob[j * DT + e]);
          }
          continue;
        }
      }
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
    std::free(pbuf);
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

namespace shoal {
int decode_attention_int8(int dtq, const void* q, int64_t qs, const int64_t* rows, int64_t b, int64_t h, int64_t hkv,
                          int64_t d, const void* kc, const void* vc, int64_t num_slots, const int64_t* slots,
                          const int64_t* off, int64_t window, float scale, void* out, int64_t os, const float* ksc,
                          const float* vsc);
}

extern "C" {

int shoal_decode_attention(int dtq, const void* q, int64_t qs, const int64_t* rows, int64_t b,
                           int64_t h, int64_t hkv, int64_t d, int dtc, const void* kc,
                           const void* vc, int64_t num_slots, const int64_t* slots,
                           const int64_t* off, int64_t window, float scale, void* out, int64_t os,
                           const float* ksc, const float* vsc) {
  if (dtc == 2)  // an int8 cache with its scales (decode_attention_int8.cpp)
    return shoal::decode_attention_int8(dtq, q, qs, rows, b, h, hkv, d, kc, vc, num_slots, slots, off, window, scale,
                                        out, os, ksc, vsc);
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

// The decode rows' key slots from their block tables (`DecodeRows.from_tables`): row r's table is
// nblk[r] blocks of `blocks`, following the rows before it; its position p lies in slot
// table[p / bs] * bs + p % bs. Writes slots (sum of lengths,) in row and position order, offsets
// (b + 1,) and, when not null, last (b,) = each row's last slot. Returns 1 when a row's length
// exceeds its table (or is < 1), 2 when a slot falls outside [0, num_slots); nothing is read past
// the tables.
int shoal_table_slots(const int64_t* blocks, const int64_t* nblk, const int64_t* lengths, int64_t b, int64_t bs,
                      int64_t num_slots, int64_t* slots, int64_t* offsets, int64_t* last) {
  int64_t at = 0, bo = 0;
  offsets[0] = 0;
  for (int64_t r = 0; r < b; ++r) {
    const int64_t n = lengths[r], full = n / bs, tail = n % bs;
    if (n < 1 || nblk[r] < full + (tail > 0)) return 1;
    const int64_t* t = blocks + bo;
    for (int64_t j = 0; j < full + (tail > 0); ++j)
      if (t[j] < 0 || t[j] >= num_slots / bs) return 2;
    int64_t* o = slots + at;
    for (int64_t j = 0; j < full; ++j)  // whole blocks: bs consecutive slots each
      for (int64_t i = 0; i < bs; ++i) o[j * bs + i] = t[j] * bs + i;
    for (int64_t i = 0; i < tail; ++i) o[full * bs + i] = t[full] * bs + i;
    at += n, bo += nblk[r];
    offsets[r + 1] = at;
    if (last) last[r] = o[n - 1];
  }
  return 0;
}

}  // extern "C"
