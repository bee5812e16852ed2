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
// arithmetic of `shrink, scale, expand, round, add`. Only the slot's rank_i[s] rows are read
// (the zero padding adds nothing). Tokens with slot -1 are left alone (base model).
template <typename T, typename TW>
void lora_bgmv_impl(const T* x, int64_t xs, int64_t n_tok, int64_t k, const int64_t* slot,
                    int64_t sa, int64_t n_layers, const int64_t* a_ptr, const int64_t* b_ptr,
                    const int64_t* b_stride, const int64_t* scale_ptr, const int64_t* rank_ptr,
                    const int64_t* out_ptr, const int64_t* out_stride, const int64_t* width,
                    int accumulate) {
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
