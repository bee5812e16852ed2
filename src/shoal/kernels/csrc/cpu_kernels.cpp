// Fused CPU kernels for the engine's hot path (decode and small batches).
//
// Each kernel replaces a chain of small PyTorch ops whose fixed per-call cost dominates a
// decode step on a few cores. Plain C ABI (called through ctypes, no torch headers: builds in
// about a second). Element type per tensor: 0 = float32, 1 = bfloat16 (raw uint16 bits).
// Every row is computed by the same code whatever else is in the batch: results do not
// depend on batch size or position (batch invariance). OpenMP threads come from the process's
// libgomp, the one PyTorch's CPU build already loaded, so they share its pool and thread count.
//
// Rounding: where the PyTorch op chain rounds an intermediate to bf16, so does the kernel, at
// the same points (rotary embedding and cache writes match PyTorch bit for bit; norms,
// SiLU and attention match to float rounding, their reduction order and exp differ).

#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstdlib>
#include <cstring>

namespace {

typedef uint16_t bf16_t;

// (bit casts with __builtin_bit_cast: memcpy in these helpers kept GCC from vectorizing loops)
inline float bf2f(bf16_t x) { return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16); }

inline bf16_t f2bf(float f) {  // round to nearest even, like PyTorch's float -> bfloat16
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16_t>(u >> 16);
}

template <typename T> inline float ld(const T* p, int64_t i);
template <> inline float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float ld<bf16_t>(const bf16_t* p, int64_t i) { return bf2f(p[i]); }
template <typename T> inline void st(T* p, int64_t i, float v);
template <> inline void st<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline void st<bf16_t>(bf16_t* p, int64_t i, float v) { p[i] = f2bf(v); }
// the value as the tensor's dtype would hold it (identity for float32)
template <typename T> inline float rnd(float v) { return v; }
template <> inline float rnd<bf16_t>(float v) { return bf2f(f2bf(v)); }

// exp(x) for x <= 0 (softmax, SiLU): Cephes' expf polynomial, branch-free so loops vectorize;
// relative error ~1e-7. Inputs below -87 give ~1e-38 instead of 0.
inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |x / ln 2| < 2^22; floor() kept
  // GCC from vectorizing)
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;
  return p * __builtin_bit_cast(float, static_cast<uint32_t>(e) << 23);
}

// ---- RMSNorm, optionally after a residual add ------------------------------------------------
// r = x (+ residual, rounded to T); y = r / sqrt(mean(r^2) + eps) in fp32, rounded to T, times w
template <typename T>
void rms_norm_impl(const T* x, int64_t xs, const T* res, int64_t rs, T* res_out, int64_t ros,
                   const T* w, T* out, int64_t os, int64_t n, int64_t d, float eps) {
#pragma omp parallel for schedule(static) if (n >= 8)
  for (int64_t i = 0; i < n; ++i) {
    const T* xr = x + i * xs;
    T* o = out + i * os;
    float buf[d];
    if (res != nullptr) {
      const T* rr = res + i * rs;
      T* ro = res_out + i * ros;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        float v = rnd<T>(ld(xr, j) + ld(rr, j));
        buf[j] = v;
        st(ro, j, v);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) buf[j] = ld(xr, j);
    }
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) ss += buf[j] * buf[j];
    float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) st(o, j, ld(w, j) * rnd<T>(buf[j] * inv));
  }
}

// ---- rotary embedding in place (rotate-half layout) ------------------------------------------
// x rows (n, heads, d) at row stride xs; cos, sin (n, d). Per element, as PyTorch's chain:
// out = T(T(x * cos) + T(rot(x) * sin)), rot(x) = (-x2, x1)
template <typename T>
void rope_impl(T* x, int64_t xs, int64_t n, int64_t heads, int64_t d, const T* cs, const T* sn) {
  const int64_t half = d / 2;
#pragma omp parallel for schedule(static) if (n >= 32)
  for (int64_t i = 0; i < n; ++i) {
    const T* c = cs + i * d;
    const T* s = sn + i * d;
    for (int64_t h = 0; h < heads; ++h) {
      T* p = x + i * xs + h * d;
      float a[d];
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) a[j] = ld(p, j);
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        float lo = rnd<T>(rnd<T>(a[j] * ld(c, j)) + rnd<T>(-a[j + half] * ld(s, j)));
        float hi = rnd<T>(rnd<T>(a[j + half] * ld(c, j + half)) + rnd<T>(a[j] * ld(s, j + half)));
        st(p, j, lo);
        st(p, j + half, hi);
      }
    }
  }
}

// ---- paged KV cache write --------------------------------------------------------------------
// k, v rows (n, hkv, d) at row strides; cache (hkv, num_slots, d); token i -> slot slots[i]
template <typename TI, typename TC>
void cache_write_impl(const TI* k, int64_t ks, const TI* v, int64_t vs, int64_t n, int64_t hkv,
                      int64_t d, const int64_t* slots, TC* kc, TC* vc, int64_t num_slots) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = slots[i];
    for (int64_t h = 0; h < hkv; ++h) {
      const TI* kr = k + i * ks + h * d;
      const TI* vr = v + i * vs + h * d;
      TC* kd = kc + (h * num_slots + slot) * d;
      TC* vd = vc + (h * num_slots + slot) * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        st(kd, j, ld(kr, j));
        st(vd, j, ld(vr, j));
      }
    }
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

template <typename TC, int G>
void attend64(const float* qf, const TC* kbase, const TC* vbase, const int64_t* slots, int64_t len,
              float scale, float* scores, float* outf) {
  __m512 q[G][4];
  for (int j = 0; j < G; ++j) row64<float>(qf + 64 * j, q[j]);
  // 1) scores (G, len) = q . k * scale: per key, products of 4 chunks summed pairwise, then
  //    the 16 lanes
  for (int64_t s = 0; s < len; ++s) {
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
  for (int j = 0; j < G; ++j) {
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
  // 3) out (G, 64) = p @ v, accumulated in registers in key order
  __m512 acc[G][4];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < 4; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < len; ++s) {
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
      for (int64_t j = 0; j < g; ++j) {
        float* sc = scores + j * len;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t s = 0; s < len; ++s) m = sc[s] > m ? sc[s] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t s = 0; s < len; ++s) {
          float p = exp_neg(sc[s] - m);
          sc[s] = p;
          sum += p;
        }
        inv[j] = 1.0f / sum;
      }
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

// ---- SiLU(gate) * up ---------------------------------------------------------------------------
// y rows (n, 2 * m): gate | up, row stride ys -> out (n, m): T(T(silu(gate)) * up)
template <typename T>
void silu_mul_impl(const T* y, int64_t ys, int64_t n, int64_t m, T* out) {
#pragma omp parallel for schedule(static) if (n >= 8)
  for (int64_t i = 0; i < n; ++i) {
    const T* gate = y + i * ys;
    const T* up = gate + m;
    T* o = out + i * m;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const float a = ld(gate, j);
      // silu(a) = a / (1 + exp(-a)); exp of a non-positive argument only
      const float e = exp_neg(-std::fabs(a));
      const float silu = a >= 0.0f ? a / (1.0f + e) : a * e / (1.0f + e);
      st(o, j, rnd<T>(silu) * ld(up, j));
    }
  }
}

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

int shoal_kernels_abi() { return 2; }

int shoal_rms_norm(int dt, const void* x, int64_t xs, const void* res, int64_t rs, void* res_out,
                   int64_t ros, const void* w, void* out, int64_t os, int64_t n, int64_t d, float eps) {
  if (dt == 0)
    rms_norm_impl<float>((const float*)x, xs, (const float*)res, rs, (float*)res_out, ros,
                         (const float*)w, (float*)out, os, n, d, eps);
  else if (dt == 1)
    rms_norm_impl<bf16_t>((const bf16_t*)x, xs, (const bf16_t*)res, rs, (bf16_t*)res_out, ros,
                          (const bf16_t*)w, (bf16_t*)out, os, n, d, eps);
  else
    return 1;
  return 0;
}

int shoal_rope(int dt, void* x, int64_t xs, int64_t n, int64_t heads, int64_t d, const void* cs,
               const void* sn) {
  if (dt == 0)
    rope_impl<float>((float*)x, xs, n, heads, d, (const float*)cs, (const float*)sn);
  else if (dt == 1)
    rope_impl<bf16_t>((bf16_t*)x, xs, n, heads, d, (const bf16_t*)cs, (const bf16_t*)sn);
  else
    return 1;
  return 0;
}

int shoal_cache_write(int dti, const void* k, int64_t ks, const void* v, int64_t vs, int64_t n,
                      int64_t hkv, int64_t d, const int64_t* slots, int dtc, void* kc, void* vc,
                      int64_t num_slots) {
  if (dti == 0 && dtc == 0)
    cache_write_impl<float, float>((const float*)k, ks, (const float*)v, vs, n, hkv, d, slots,
                                   (float*)kc, (float*)vc, num_slots);
  else if (dti == 1 && dtc == 1)
    cache_write_impl<bf16_t, bf16_t>((const bf16_t*)k, ks, (const bf16_t*)v, vs, n, hkv, d, slots,
                                     (bf16_t*)kc, (bf16_t*)vc, num_slots);
  else if (dti == 0 && dtc == 1)
    cache_write_impl<float, bf16_t>((const float*)k, ks, (const float*)v, vs, n, hkv, d, slots,
                                    (bf16_t*)kc, (bf16_t*)vc, num_slots);
  else if (dti == 1 && dtc == 0)
    cache_write_impl<bf16_t, float>((const bf16_t*)k, ks, (const bf16_t*)v, vs, n, hkv, d, slots,
                                    (float*)kc, (float*)vc, num_slots);
  else
    return 1;
  return 0;
}

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

int shoal_silu_mul(int dt, const void* y, int64_t ys, int64_t n, int64_t m, void* out) {
  if (dt == 0)
    silu_mul_impl<float>((const float*)y, ys, n, m, (float*)out);
  else if (dt == 1)
    silu_mul_impl<bf16_t>((const bf16_t*)y, ys, n, m, (bf16_t*)out);
  else
    return 1;
  return 0;
}

}  // extern "C"
