// Multi-LoRA deltas with one adapter slot per token (BGMV), for the engine on CPU (see
// common.h for element types). Each token is computed alone in a fixed order.

#include "common.h"

namespace {
using namespace shoal;

// ---- multi-LoRA deltas, one slot per token (BGMV) ----------------------------------------------
// Token t with slot s = slot[t] >= 0, for each of n layers sharing the input x (layer i's A slots
// at a_i, rows of K in TW (fp32 or bf16, widened exactly), slot s at a_i + s * sa):
//   delta_i = T(sum_r T32(T32(x_t . a_i[s, r]) * scale_i[s]) * b_i[s, r, :])   (fp32 sums)
// and out_i[t] = delta_i (accumulate = 0) or T(out_i[t] + delta_i) (accumulate = 1): the
// arithmetic of `shrink, scale, expand, round, add`, each dot product as 16 lane sums combined
// pairwise. Only the slot's rank_i[s] rows are read
// (the zero padding adds nothing). Tokens with slot -1 are left alone (base model).
constexpr int kLanes = 16;  // each dot product: 16 lane sums over k (lane l: e = l mod 16), in order
constexpr int kBlock = 4;   // tokens of one slot computed together (they share each weight load)

// NB tokens rows[0..NB) (rows of x, all with slot s) through layer set i = 0..n_layers.
// Per token the arithmetic is the same whatever NB is: a token's bits do not depend on which
// tokens share its block (batch invariance).
template <int NB, typename T, typename TW>
void bgmv_block(const T* x, int64_t xs, const int64_t* rows, int64_t k, int64_t s, int64_t sa,
                int64_t n_layers, const int64_t* a_ptr, const int64_t* b_ptr, const int64_t* b_stride,
                const int64_t* scale_ptr, const int64_t* rank_ptr, const int64_t* out_ptr,
                const int64_t* out_stride, const int64_t* width, int accumulate, int64_t rmax) {
  const int64_t kp = (k + kLanes - 1) / kLanes * kLanes;
  float xf[NB][kp];  // the tokens' inputs in fp32, zero-padded to whole lane groups
  for (int t = 0; t < NB; ++t) {
    const T* xr = x + rows[t] * xs;
    for (int64_t e = 0; e < kp; ++e) xf[t][e] = e < k ? ld(xr, e) : 0.0f;
  }
  float c[NB][rmax > 0 ? rmax : 1];
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
    // 1) shrink: c[t][r] = T32(x_t . a[r]) * scale
    for (int64_t r = 0; r < rank; ++r) {
      const TW* ar = reinterpret_cast<const TW*>(a_ptr[i]) + s * sa + r * k;
      float acc[NB][kLanes] = {};
      int64_t e0 = 0;
      for (; e0 + kLanes <= k; e0 += kLanes) {
        float wv[kLanes];
        for (int l = 0; l < kLanes; ++l) wv[l] = ld(ar, e0 + l);
        for (int t = 0; t < NB; ++t)
          for (int l = 0; l < kLanes; ++l) acc[t][l] += xf[t][e0 + l] * wv[l];
      }
      if (e0 < k) {  // the tail: lanes past k add 0 * 0
        float wv[kLanes];
        for (int l = 0; l < kLanes; ++l) wv[l] = e0 + l < k ? ld(ar, e0 + l) : 0.0f;
        for (int t = 0; t < NB; ++t)
          for (int l = 0; l < kLanes; ++l) acc[t][l] += xf[t][e0 + l] * wv[l];
      }
      for (int t = 0; t < NB; ++t) {  // the lanes summed pairwise, in a fixed tree
        for (int half = kLanes / 2; half >= 1; half /= 2)
          for (int l = 0; l < half; ++l) acc[t][l] += acc[t][l + half];
        c[t][r] = acc[t][0] * scale;
      }
    }
    // 2) expand and add: out_t[e] (+)= T(sum_r c[t][r] * b[r][e]), the sum over r in order
    const TW* bs = reinterpret_cast<const TW*>(b_ptr[i]) + s * b_stride[i];
    for (int64_t e0 = 0; e0 < w; e0 += kLanes) {
      const int64_t ne = w - e0 < kLanes ? w - e0 : kLanes;
      float acc[NB][kLanes] = {};
      for (int64_t r = 0; r < rank; ++r) {
        const TW* br = bs + r * w + e0;
        float bv[kLanes];
        for (int l = 0; l < kLanes; ++l) bv[l] = l < ne ? ld(br, l) : 0.0f;
        for (int t = 0; t < NB; ++t)
          for (int l = 0; l < kLanes; ++l) acc[t][l] += c[t][r] * bv[l];
      }
      for (int t = 0; t < NB; ++t) {
        T* o = reinterpret_cast<T*>(out_ptr[i]) + rows[t] * out_stride[i] + e0;
        if (accumulate)
          for (int l = 0; l < ne; ++l) st(o, l, ld(o, l) + rnd<T>(acc[t][l]));
        else
          for (int l = 0; l < ne; ++l) st(o, l, acc[t][l]);
      }
    }
  }
}

template <typename T, typename TW>
void lora_bgmv_impl(const T* x, int64_t xs, int64_t n_tok, int64_t k, const int64_t* slot,
                    int64_t sa, int64_t n_layers, const int64_t* a_ptr, const int64_t* b_ptr,
                    const int64_t* b_stride, const int64_t* scale_ptr, const int64_t* rank_ptr,
                    const int64_t* out_ptr, const int64_t* out_stride, const int64_t* width,
                    int accumulate) {
  // blocks: up to kBlock consecutive tokens with the same slot (a prefill run), else one token
  int64_t rows[n_tok > 0 ? n_tok : 1], starts[n_tok + 1];
  int64_t nblocks = 0, m = 0;
  for (int64_t t = 0; t < n_tok;) {
    if (slot[t] < 0) {
      ++t;
      continue;
    }
    starts[nblocks++] = m;
    const int64_t s = slot[t];
    for (int j = 0; j < kBlock && t < n_tok && slot[t] == s; ++j) rows[m++] = t++;
  }
  starts[nblocks] = m;
  int64_t rmax = 1;
  for (int64_t i = 0; i < n_layers; ++i)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t r = reinterpret_cast<const int64_t*>(rank_ptr[i])[slot[rows[starts[b]]]];
      rmax = r > rmax ? r : rmax;
    }
#pragma omp parallel for schedule(static) if (nblocks >= 4)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t* rb = rows + starts[b];
    const int64_t s = slot[rb[0]];
#define SHOAL_BLOCK(NB)                                                                                  \
  bgmv_block<NB, T, TW>(x, xs, rb, k, s, sa, n_layers, a_ptr, b_ptr, b_stride, scale_ptr, rank_ptr, out_ptr, \
                        out_stride, width, accumulate, rmax)
    switch (starts[b + 1] - starts[b]) {
      case 1: SHOAL_BLOCK(1); break;
      case 2: SHOAL_BLOCK(2); break;
      case 3: SHOAL_BLOCK(3); break;
      default: SHOAL_BLOCK(4); break;
    }
#undef SHOAL_BLOCK
  }
}

}  // namespace

extern "C" {

int shoal_lora_bgmv(int dt, int dtw, const void* x, int64_t xs, int64_t n_tok, int64_t k,
                    const int64_t* slot, int64_t sa, int64_t n_layers, const int64_t* a_ptr,
                    const int64_t* b_ptr, const int64_t* b_stride, const int64_t* scale_ptr,
                    const int64_t* rank_ptr, const int64_t* out_ptr, const int64_t* out_stride,
                    const int64_t* width, int accumulate) {
#define SHOAL_BGMV(T, TW)                                                                      \
  lora_bgmv_impl<T, TW>((const T*)x, xs, n_tok, k, slot, sa, n_layers, a_ptr, b_ptr, b_stride,  \
                        scale_ptr, rank_ptr, out_ptr, out_stride, width, accumulate)
  if (dt == 0 && dtw == 0)
    SHOAL_BGMV(float, float);
  else if (dt == 0 && dtw == 1)
    SHOAL_BGMV(float, bf16_t);
  else if (dt == 1 && dtw == 0)
    SHOAL_BGMV(bf16_t, float);
  else if (dt == 1 && dtw == 1)
    SHOAL_BGMV(bf16_t, bf16_t);
  else
    return 1;
#undef SHOAL_BGMV
  return 0;
}

}  // extern "C"
