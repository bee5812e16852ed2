// Multi-LoRA deltas with one adapter slot per token (BGMV), for the engine on CPU (see
// common.h for element types). Each token is computed alone in a fixed order.

#include <type_traits>

#include "lora_bodies.h"
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

using namespace shoal::lora;  // the vector bodies (lora_bodies.h)

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
      // ranks a shrink step; steps an expand (one token: 4, so 8 chains of FMAs are in flight; int8
      // slots' cost in the engine's 32-row step, Zen 5: 3.09-3.31 ms against 3.32-3.58 with 2)
      constexpr int RG = NB <= 2 ? 8 : 4, U = NB == 1 ? 4 : NB == 2 ? 2 : 1;
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

// For tests: n lanes (n % 16 == 0) of bf16 pairs a, b (32 bits each) and fp32 acc: out_dp = VDPBF16PS,
// out_fma = the two FMAs under FTZ/DAZ that stand for it on CPUs with AMX (lora_bodies.h).
// Returns 1 without AVX512-BF16.
int shoal_dot2_check(int64_t n, const uint32_t* a, const uint32_t* b, const float* acc, float* out_dp,
                     float* out_fma) {
#if SHOAL_DPBF16
  if (n % 16) return 1;
  const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t i = 0; i < n; i += 16) {
    const __m512i av = _mm512_loadu_si512(a + i), bv = _mm512_loadu_si512(b + i);
    const __m512 c = _mm512_loadu_ps(acc + i);
    _mm512_storeu_ps(out_dp + i, dot2(c, av, bv));
    __m512 r;
    {
      const FlushDenormals ftz;
      r = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(av, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(bv, 16)),
                          _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(av, hi)),
                                          _mm512_castsi512_ps(_mm512_and_si512(bv, hi)), _mm512_loadu_ps(acc + i)));
      pin(r);
    }
    _mm512_storeu_ps(out_fma + i, r);
  }
  return 0;
#else
  (void)n, (void)a, (void)b, (void)acc, (void)out_dp, (void)out_fma;
  return 1;
#endif
}

// Where the memory-bound kernels read ahead (widen.h): kv for decode attention's keys and values,
// slots for the LoRA slots, each 1 = L2, 0 = L1, < 0 = unchanged. Returns the levels in effect,
// kv + 2 * slots, or -1 in a build without AVX2 (no reads ahead).
int shoal_fetch_l2(int kv, int slots) {
#if SHOAL_AVX2
  if (kv >= 0) fetch_kv_l2 = kv;
  if (slots >= 0) fetch_slot_l2 = slots;
  return fetch_kv_l2 + 2 * fetch_slot_l2;
#else
  (void)kv, (void)slots;
  return -1;
#endif
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
