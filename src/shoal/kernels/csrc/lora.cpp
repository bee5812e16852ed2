// Multi-LoRA deltas with one adapter slot per token (BGMV), for the engine on CPU (see
// common.h for element types). Each token is computed alone in a fixed order.

#include <type_traits>

#include "widen.h"

namespace {
using namespace shoal;

// ---- multi-LoRA deltas, one slot per token (BGMV) ----------------------------------------------
// Token t with slot s = slot[t] >= 0, for each of n layers sharing the input x (layer i's A slots
// at a_i, rows of K in TW (fp32 or bf16, widened exactly), slot s at a_i + s * sa):
//   delta_i = T(sum_r T32(T32(x_t . a_i[s, r]) * scale_i[s]) * b_i[s, r, :])   (fp32 sums)
// int8 slots (TW = int8_t, the values widened exactly; each row with an fp32 scale, A's and B's):
//   c_r = T32(T32(T32(x_t . a_i[s, r]) * a_scale_i[s, r]) * scale_i[s]) * b_scale_i[s, r]
//   delta_i = T(sum_r c_r * b_i[s, r, :])
// and out_i[t] = delta_i (accumulate = 0) or T(out_i[t] + delta_i) (accumulate = 1): the
// arithmetic of `shrink, scale, expand, round, add`. Only the slot's rank_i[s] rows are read
// (the zero padding adds nothing). Tokens with slot -1 are left alone (base model).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// ---- AVX-512: tokens of one slot in blocks of up to 4 sharing each weight load ----------------
// A block is up to 4 tokens of one slot, adjacent or not: a prefill run, or the decode rows of
// requests on the same adapter wherever they sit in the batch (each slot's weights then come
// from memory once a block, not once a row). Per token the arithmetic is fixed whatever its
// block: each dot product x . a[r] is lane sums over k (FMA, lane l takes e = l mod 16; bf16
// slots on bf16 inputs: pair dot products, lane l takes e0 + 2l and e0 + 2l + 1 of each 32) reduced
// by _mm512_reduce_add_ps; each delta element is an FMA chain over r in order, held in a
// register (the generic loop below kept it in memory, a load and store per rank per element).
// So a token's bits do not depend on which tokens share its block, and decode rows and prefill
// runs compute the same way.
constexpr int kBlock = 4;

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

// 16 floats -> bf16 bits in 32-bit lanes, rounded as `f2bf` (nearest even; NaN stays NaN)
inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
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
  __m512i r = bf16_bits(d);
  if (accumulate) {
    const __m512 dr = _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));  // T(delta)
    r = bf16_bits(_mm512_add_ps(load16<bf16_t>(o, m), dr));
  }
  _mm256_mask_storeu_epi16(o, m, _mm512_cvtepi32_epi16(r));
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
inline __m512i pairs32(const bf16_t* p, __mmask32 m) { return _mm512_maskz_loadu_epi16(m, p); }
inline __m512i pairs32(const int8_t* p, __mmask32 m) {
  const __m256i b = _mm256_maskz_loadu_epi8(m, p);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  const __m256i l16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(lo), 16));
  const __m256i h16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(hi), 16));
  return _mm512_inserti64x4(_mm512_castsi256_si512(l16), h16, 1);
}

template <int NB, int RG, typename TW>
inline void shrink_bf(const bf16_t* const* xr, const TW* a, int64_t k, float scale, float* c, int64_t ldc,
                      const char*& pa, const char* pa_end) {
  __m512 acc[NB][RG];
  for (int t = 0; t < NB; ++t)
    for (int j = 0; j < RG; ++j) acc[t][j] = _mm512_setzero_ps();
  for (int64_t e0 = 0; e0 < k; e0 += 32) {
    const __mmask32 m = k - e0 >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << (k - e0)) - 1);
    for (int j = 0; j < RG; ++j)
      if (pa < pa_end) _mm_prefetch(pa, _MM_HINT_T0), pa += 64;
    __m512i xv[NB];
    for (int t = 0; t < NB; ++t) xv[t] = _mm512_maskz_loadu_epi16(m, xr[t] + e0);
    for (int j = 0; j < RG; ++j) {
      const __m512i wv = pairs32(a + j * k + e0, m);
      for (int t = 0; t < NB; ++t) acc[t][j] = dot2(acc[t][j], xv[t], wv);
    }
  }
  for (int t = 0; t < NB; ++t)
    for (int j = 0; j < RG; ++j) c[t * ldc + j] = _mm512_reduce_add_ps(acc[t][j]) * scale;
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
    for (int64_t r = 0; r < rank; ++r) {
      for (int u = 0; u < U; ++u)
        if (pb < pb_end) _mm_prefetch(pb, _MM_HINT_T0), pb += 64;
      __m512 cr[NB];
      for (int t = 0; t < NB; ++t) cr[t] = _mm512_set1_ps(c[t * rank + r]);
      for (int u = 0; u < U; ++u) {
        const __m512i bv = _mm512_maskz_loadu_epi16(m[u], b + r * w + e0 + 32 * u);
        const __m512 be = _mm512_castsi512_ps(_mm512_slli_epi32(bv, 16));    // elements 2l
        const __m512 bo = _mm512_castsi512_ps(_mm512_and_si512(bv, hi));     // elements 2l + 1
        for (int t = 0; t < NB; ++t) {
          ev[t][u] = _mm512_fmadd_ps(cr[t], be, ev[t][u]);
          od[t][u] = _mm512_fmadd_ps(cr[t], bo, od[t][u]);
        }
      }
    }
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
      if (pa < pa_end) _mm_prefetch(pa, _MM_HINT_T0), pa += 64;
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
        if (pb < pb_end) _mm_prefetch(pb, _MM_HINT_T0), pb += 64;
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

// A thread's int8 slot widened to bf16 for the pair body by a full block (a prefill run), kept for
// its next blocks of the same slot: layer i's A rows at w + off[i], its B rows rmax * k values
// further
struct Widened {
  bf16_t* w = nullptr;  // allocated by the first full block (decode-only calls never need it)
  const int64_t* off = nullptr;  // (n_layers + 1,): off[n_layers] values in all
  int64_t slot = -1;
};

template <int NB, typename T, typename TW>
void bgmv_block(const T* x, int64_t xs, const int64_t* rows, int64_t k, int64_t s, int64_t sa,
                int64_t n_layers, const int64_t* a_ptr, const int64_t* b_ptr, const int64_t* b_stride,
                const int64_t* scale_ptr, const int64_t* rank_ptr, const int64_t* out_ptr,
                const int64_t* out_stride, const int64_t* width, int accumulate, const int64_t* asc_ptr,
                const int64_t* bsc_ptr, float* xf, float* c, int64_t s_next, Widened* wd, int64_t rmax) {
  const int64_t kp = (k + 15) / 16 * 16;
  // the pair body below: bf16 inputs on bf16 slots, or on int8 slots widened to bf16 first
  constexpr bool q8 = std::is_same_v<TW, int8_t>;
  constexpr bool bf = std::is_same_v<T, bf16_t> && (std::is_same_v<TW, bf16_t> || q8);
  // int8: a full block (a prefill run) widens its slot once for this and the thread's next
  // blocks of it; other blocks (decode rows) widen in registers as they go (the same bits)
  if constexpr (bf && q8) {
    if (wd->slot != s && NB == kBlock) {
      if (wd->w == nullptr) wd->w = static_cast<bf16_t*>(std::malloc(sizeof(bf16_t) * wd->off[n_layers]));
      for (int64_t i = 0; i < n_layers; ++i) {
        const int64_t rank = reinterpret_cast<const int64_t*>(rank_ptr[i])[s];
        widen_i8(reinterpret_cast<const int8_t*>(a_ptr[i]) + s * sa, rank * k, wd->w + wd->off[i]);
        widen_i8(reinterpret_cast<const int8_t*>(b_ptr[i]) + s * b_stride[i], rank * width[i],
                 wd->w + wd->off[i] + rmax * k);
      }
      wd->slot = s;
    }
  }
  for (int t = 0; t < NB && !bf; ++t) {  // the tokens' inputs in fp32, zero-padded to whole vectors
    const T* xr = x + rows[t] * xs;
    for (int64_t e = 0; e < kp; ++e) xf[t * kp + e] = e < k ? ld(xr, e) : 0.0f;
  }
  for (int64_t i = 0; i < n_layers; ++i) {
    const int64_t rank = reinterpret_cast<const int64_t*>(rank_ptr[i])[s];
    const int64_t w = width[i];
    if (rank == 0) {  // this slot has no weights for layer i: a zero delta
      if (!accumulate)
        for (int t = 0; t < NB; ++t) {
          T* o = reinterpret_cast<T*>(out_ptr[i]) + rows[t] * out_stride[i];
          for (int64_t e = 0; e < w; ++e) st(o, e, 0.0f);
        }
      continue;
    }
    const float scale = reinterpret_cast<const float*>(scale_ptr[i])[s];
    // the next block's slot weights for this layer (another slot's, not in cache), fetched a
    // line per step of the loops below: a token's slot reads alone ran at ~14 GB/s, half what
    // the products stream at
    const char *pa = nullptr, *pa_end = nullptr, *pb = nullptr, *pb_end = nullptr;
    if (s_next >= 0 && s_next != s) {
      const int64_t rn = reinterpret_cast<const int64_t*>(rank_ptr[i])[s_next];
      pa = reinterpret_cast<const char*>(reinterpret_cast<const TW*>(a_ptr[i]) + s_next * sa);
      pb = reinterpret_cast<const char*>(reinterpret_cast<const TW*>(b_ptr[i]) + s_next * b_stride[i]);
      pa_end = pa + rn * k * sizeof(TW), pb_end = pb + rn * w * sizeof(TW);
    }
    if constexpr (bf) {
      constexpr int RG = NB <= 2 ? 8 : 4, U = NB <= 2 ? 2 : 1;  // ranks a shrink step, steps an expand
      const bf16_t* xr[NB];
      bf16_t* out[NB];
      for (int t = 0; t < NB; ++t)
        xr[t] = x + rows[t] * xs, out[t] = reinterpret_cast<bf16_t*>(out_ptr[i]) + rows[t] * out_stride[i];
      const float sc = q8 ? 1.0f : scale;
      if (q8 && wd->slot != s) {  // in registers: the int8 rows, then the generic expand (same bits)
        const int8_t* aq = reinterpret_cast<const int8_t*>(a_ptr[i]) + s * sa;
        int64_t r0 = 0;
        for (; r0 + RG <= rank; r0 += RG) shrink_bf<NB, RG>(xr, aq + r0 * k, k, sc, c + r0, rank, pa, pa_end);
        for (; r0 < rank; ++r0) shrink_bf<NB, 1>(xr, aq + r0 * k, k, sc, c + r0, rank, pa, pa_end);
        scale_rows(c, NB, rank, s, sa / k, b_stride[i] / w, asc_ptr[i], bsc_ptr[i], scale);
        expand_fp<NB, 2 * U>(c, rank, reinterpret_cast<const int8_t*>(b_ptr[i]) + s * b_stride[i], w, out,
                             accumulate, pb, pb_end);
        continue;
      }
      const bf16_t* as = q8 ? wd->w + wd->off[i] : reinterpret_cast<const bf16_t*>(a_ptr[i]) + s * sa;
      const bf16_t* bs = q8 ? as + rmax * k : reinterpret_cast<const bf16_t*>(b_ptr[i]) + s * b_stride[i];
      int64_t r0 = 0;
      for (; r0 + RG <= rank; r0 += RG) shrink_bf<NB, RG>(xr, as + r0 * k, k, sc, c + r0, rank, pa, pa_end);
      for (; r0 < rank; ++r0) shrink_bf<NB, 1>(xr, as + r0 * k, k, sc, c + r0, rank, pa, pa_end);
      if constexpr (q8) scale_rows(c, NB, rank, s, sa / k, b_stride[i] / w, asc_ptr[i], bsc_ptr[i], scale);
      expand_bf<NB, U>(c, rank, bs, w, out, accumulate, pb, pb_end);
      continue;
    }
    // fp32, int8 and mixed slots: c[t][r] = T32(x_t . a[r]) * scale (int8: ((x_t . a[r]) *
    // a_scale[r]) * scale) * b_scale[r], the rows' scales folded into c), then the expand
    constexpr int RG = NB <= 2 ? 8 : 4, EU = NB <= 2 ? 4 : 2;  // ranks a shrink step, vectors an expand step
    T* out[NB];
    for (int t = 0; t < NB; ++t) out[t] = reinterpret_cast<T*>(out_ptr[i]) + rows[t] * out_stride[i];
    const TW* as = reinterpret_cast<const TW*>(a_ptr[i]) + s * sa;
    const float sc = q8 ? 1.0f : scale;
    int64_t r0 = 0;
    for (; r0 + RG <= rank; r0 += RG) shrink_fp<NB, RG>(xf, kp, as + r0 * k, k, sc, c + r0, rank, pa, pa_end);
    for (; r0 < rank; ++r0) shrink_fp<NB, 1>(xf, kp, as + r0 * k, k, sc, c + r0, rank, pa, pa_end);
    if constexpr (q8) scale_rows(c, NB, rank, s, sa / k, b_stride[i] / w, asc_ptr[i], bsc_ptr[i], scale);
    expand_fp<NB, EU>(c, rank, reinterpret_cast<const TW*>(b_ptr[i]) + s * b_stride[i], w, out, accumulate, pb,
                      pb_end);
  }
}

#endif

template <typename T, typename TW>
void lora_bgmv_impl(const T* x, int64_t xs, int64_t n_tok, int64_t k, const int64_t* slot,
                    int64_t sa, int64_t n_layers, const int64_t* a_ptr, const int64_t* b_ptr,
                    const int64_t* b_stride, const int64_t* scale_ptr, const int64_t* rank_ptr,
                    const int64_t* out_ptr, const int64_t* out_stride, const int64_t* width,
                    int accumulate, const int64_t* asc_ptr, const int64_t* bsc_ptr) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  // blocks: each slot's tokens in order (slots by first appearance), kBlock at a time
  int64_t* rows = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * (2 * n_tok + 2)));
  int64_t* starts = rows + n_tok + 1;
  int64_t nblocks = 0, nr = 0, rmax = 1, smax = -1;
  for (int64_t t = 0; t < n_tok; ++t) smax = slot[t] > smax ? slot[t] : smax;
  // next[t]: the slot's next token after t (-1: none), via each slot's last token so far
  int64_t* next = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * (n_tok + smax + 2)));
  int64_t* last = next + n_tok;
  for (int64_t s = 0; s <= smax; ++s) last[s] = -1;
  for (int64_t t = n_tok - 1; t >= 0; --t) {
    if (slot[t] < 0) continue;
    next[t] = last[slot[t]];
    last[slot[t]] = t;  // ends as the slot's first token
  }
  for (int64_t t0 = 0; t0 < n_tok; ++t0) {
    const int64_t s = slot[t0];
    if (s < 0 || last[s] != t0) continue;  // not the first token of its slot
    for (int64_t t = t0; t >= 0;) {
      starts[nblocks++] = nr;
      for (int j = 0; j < kBlock && t >= 0; ++j, t = next[t]) rows[nr++] = t;
    }
    for (int64_t i = 0; i < n_layers; ++i) {
      const int64_t r = reinterpret_cast<const int64_t*>(rank_ptr[i])[s];
      rmax = r > rmax ? r : rmax;
    }
  }
  std::free(next);
  starts[nblocks] = nr;
  const int64_t kp = (k + 15) / 16 * 16;
  int64_t* woff = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * (n_layers + 1)));  // Widened's layout
  woff[0] = 0;
  for (int64_t i = 0; i < n_layers; ++i) woff[i + 1] = woff[i] + rmax * (k + width[i]);
#pragma omp parallel if (nblocks >= 4)
  {
    float* xf = static_cast<float*>(std::malloc(sizeof(float) * kBlock * kp));
    float* c = static_cast<float*>(std::malloc(sizeof(float) * kBlock * rmax));
    Widened wd;  // int8 slots on bf16 inputs: this thread's widened slot
    wd.off = woff;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t* rb = rows + starts[b];
      const int64_t s = slot[rb[0]];
#define SHOAL_BLOCK(NB)                                                                          \
  bgmv_block<NB, T, TW>(x, xs, rb, k, s, sa, n_layers, a_ptr, b_ptr, b_stride, scale_ptr, rank_ptr, \
                        out_ptr, out_stride, width, accumulate, asc_ptr, bsc_ptr, xf, c,                \
                        b + 1 < nblocks ? slot[rows[starts[b + 1]]] : -1, &wd, rmax)
      switch (starts[b + 1] - starts[b]) {
        case 1: SHOAL_BLOCK(1); break;
        case 2: SHOAL_BLOCK(2); break;
        case 3: SHOAL_BLOCK(3); break;
        default: SHOAL_BLOCK(4); break;
      }
#undef SHOAL_BLOCK
    }
    std::free(xf);
    std::free(c);
    std::free(wd.w);
  }
  std::free(rows);
  std::free(woff);
#else  // without AVX-512: one token at a time, the compiler's vectorization
  int64_t wmax = 1;
  for (int64_t i = 0; i < n_layers; ++i) wmax = width[i] > wmax ? width[i] : wmax;
#pragma omp parallel for schedule(static) if (n_tok >= 4)
  for (int64_t t = 0; t < n_tok; ++t) {
    const int64_t s = slot[t];
    if (s < 0) continue;
    float xf[k];
    float acc[wmax];
    const T* xr = x + t * xs;
#pragma omp simd
    for (int64_t e = 0; e < k; ++e) xf[e] = ld(xr, e);
    for (int64_t i = 0; i < n_layers; ++i) {
      const int64_t rank = reinterpret_cast<const int64_t*>(rank_ptr[i])[s];
      const int64_t w = width[i];
      T* o = reinterpret_cast<T*>(out_ptr[i]) + t * out_stride[i];
      if (rank == 0) {  // this slot has no weights for layer i: a zero delta
        if (!accumulate)
          for (int64_t e = 0; e < w; ++e) st(o, e, 0.0f);
        continue;
      }
      const float scale = reinterpret_cast<const float*>(scale_ptr[i])[s];
      const TW* bs = reinterpret_cast<const TW*>(b_ptr[i]) + s * b_stride[i];
      for (int64_t e = 0; e < w; ++e) acc[e] = 0.0f;
      for (int64_t r = 0; r < rank; ++r) {
        const TW* ar = reinterpret_cast<const TW*>(a_ptr[i]) + s * sa + r * k;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t e = 0; e < k; ++e) dot += xf[e] * ld(ar, e);
        const float c = dot * scale;
        const TW* br = bs + r * w;
#pragma omp simd
        for (int64_t e = 0; e < w; ++e) acc[e] += c * ld(br, e);
      }
      if (accumulate) {
#pragma omp simd
        for (int64_t e = 0; e < w; ++e) st(o, e, ld(o, e) + rnd<T>(acc[e]));
      } else {
#pragma omp simd
        for (int64_t e = 0; e < w; ++e) st(o, e, acc[e]);
      }
    }
  }
#endif
}

}  // namespace

extern "C" {

// dtw: the slots' type, 0 fp32, 1 bf16, 2 int8 (AVX-512 builds only: returns 1 otherwise) with
// fp32 scales per row, asc_ptr[i] and bsc_ptr[i] laid out as layer i's A and B rows (slot s, rank
// r at s * (sa / k) + r and s * (b_stride[i] / width[i]) + r); for float slots they are unread
int shoal_lora_bgmv(int dt, int dtw, const void* x, int64_t xs, int64_t n_tok, int64_t k,
                    const int64_t* slot, int64_t sa, int64_t n_layers, const int64_t* a_ptr,
                    const int64_t* b_ptr, const int64_t* b_stride, const int64_t* scale_ptr,
                    const int64_t* rank_ptr, const int64_t* out_ptr, const int64_t* out_stride,
                    const int64_t* width, int accumulate, const int64_t* asc_ptr, const int64_t* bsc_ptr) {
#define SHOAL_BGMV(T, TW)                                                                      \
  lora_bgmv_impl<T, TW>((const T*)x, xs, n_tok, k, slot, sa, n_layers, a_ptr, b_ptr, b_stride,  \
                        scale_ptr, rank_ptr, out_ptr, out_stride, width, accumulate, asc_ptr, bsc_ptr)
  if (dt == 0 && dtw == 0)
    SHOAL_BGMV(float, float);
  else if (dt == 0 && dtw == 1)
    SHOAL_BGMV(float, bf16_t);
  else if (dt == 1 && dtw == 0)
    SHOAL_BGMV(bf16_t, float);
  else if (dt == 1 && dtw == 1)
    SHOAL_BGMV(bf16_t, bf16_t);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  else if (dt == 0 && dtw == 2)
    SHOAL_BGMV(float, int8_t);
  else if (dt == 1 && dtw == 2)
    SHOAL_BGMV(bf16_t, int8_t);
#endif
  else
    return 1;
#undef SHOAL_BGMV
  return 0;
}

// 1 when this build's LoRA kernel takes int8 slots (dtw 2)
int shoal_lora_int8() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
