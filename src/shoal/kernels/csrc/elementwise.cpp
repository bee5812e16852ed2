// Fused CPU kernels for the engine's hot path (decode and small batches).
//
// Each kernel replaces a chain of small PyTorch ops whose fixed per-call cost dominates a
// decode step on a few cores. Plain C ABI (called through ctypes, no torch headers: builds in
// a few seconds). Element type per tensor: 0 = float32, 1 = bfloat16 (raw uint16 bits).
// Every row is computed by the same code whatever else is in the batch: results do not
// depend on batch size or position (batch invariance). OpenMP threads come from the process's
// libgomp, the one PyTorch's CPU build already loaded, so they share its pool and thread count.
//
// Rounding: where the PyTorch op chain rounds an intermediate to bf16, so does the kernel, at
// the same points (rotary embedding and cache writes match PyTorch bit for bit; norms,
// SiLU and attention match to float rounding, their reduction order and exp differ).
// This file: RMSNorm (+ residual add), RoPE, the KV cache write, SiLU-and-multiply.

#include <type_traits>

#include "attention.h"  // exp_neg16 (and widen.h)

namespace {
using namespace shoal;

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
#if SHOAL_AVX512
    // bf16 rows of whole vectors: the residual add and the output in registers (as written below,
    // GCC left the bf16 stores scalar), the same steps; the sum of squares as below. The same bits
    // (compared with the scalar build on NaN, huge and tiny values); 512 x 576 with a residual,
    // one call, alternated twice (Xeon, 2 threads): 135-140 -> 89-94 us
    constexpr bool vec = std::is_same_v<T, bf16_t>;
    if (vec && d % 16 == 0 && res != nullptr) {
      const T* rr = res + i * rs;
      T* ro = res_out + i * ros;
      for (int64_t j = 0; j < d; j += 16) {
        const __m256i v = to_bf16(_mm512_add_ps(load16(reinterpret_cast<const bf16_t*>(xr) + j),
                                                load16(reinterpret_cast<const bf16_t*>(rr) + j)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ro + j), v);
        _mm512_storeu_ps(buf + j, widen16(v));
      }
    } else if (vec && d % 16 == 0) {
      for (int64_t j = 0; j < d; j += 16) _mm512_storeu_ps(buf + j, load16(reinterpret_cast<const bf16_t*>(xr) + j));
    } else
#endif
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
#if SHOAL_AVX512
    if (vec && d % 16 == 0) {
      const __m512 iv = _mm512_set1_ps(inv);
      for (int64_t j = 0; j < d; j += 16) {
        const __m512 nv = widen16(to_bf16(_mm512_mul_ps(_mm512_loadu_ps(buf + j), iv)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j),
                            to_bf16(_mm512_mul_ps(load16(reinterpret_cast<const bf16_t*>(w) + j), nv)));
      }
      continue;
    }
#endif
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
#if SHOAL_AVX512
    if constexpr (std::is_same_v<T, bf16_t>) {
      // in registers, the same steps (the loop below stored bf16 as scalars): the same bits
      // (tested against apply_rope); 512 rows x 12 heads of 64: 168-173 -> 99-100 us a call
      if (half % 16 == 0) {
        for (int64_t h = 0; h < heads; ++h) {
          bf16_t* p = x + i * xs + h * d;
          for (int64_t j = 0; j < half; j += 16) {
            const __m512 a0 = load16(p + j), a1 = load16(p + j + half);
            const __m512 c0 = load16(c + j), c1 = load16(c + j + half);
            const __m512 s0 = load16(s + j), s1 = load16(s + j + half);
            auto r = [](__m512 v) { return widen16(to_bf16(v)); };
            const __m512 neg = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(0x80000000u)));
            const __m512 lo = r(_mm512_add_ps(r(_mm512_mul_ps(a0, c0)), r(_mm512_mul_ps(_mm512_xor_ps(a1, neg), s0))));
            const __m512 hi = r(_mm512_add_ps(r(_mm512_mul_ps(a1, c1)), r(_mm512_mul_ps(a0, s1))));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_bf16(lo));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j + half), to_bf16(hi));
          }
        }
        continue;
      }
    }
#endif
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
// int8 cache (dtc 2): each (token, kv head) row of d values as q = round(x * 127 / amax) (half to
// even, |q| <= 127) with its scale amax / 127 (fp32) at ksc / vsc[h * num_slots + slot]; an
// all-zero row stores q = 0, scale 0.
template <typename TI>
inline void quantize_row(const TI* x, int64_t d, int8_t* q, float* scale) {
  float amax = 0.0f;
  for (int64_t j = 0; j < d; ++j) amax = std::fmax(amax, std::fabs(ld(x, j)));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int64_t j = 0; j < d; ++j) {
    const float r = std::nearbyint(ld(x, j) * inv);
    q[j] = static_cast<int8_t>(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
  }
  *scale = amax / 127.0f;
}

#if SHOAL_AVX512
// the same for a bf16 row of d values (d a multiple of 16, at most 256), in 16-lane steps (the
// same roundings: RNE conversion)
inline void quantize_row16(const bf16_t* x, int64_t d, int8_t* q, float* scale) {
  __m512 v[16], m = _mm512_setzero_ps();
  const int n = static_cast<int>(d / 16);
  for (int c = 0; c < n; ++c) {
    v[c] = load16(x + 16 * c);
    m = _mm512_max_ps(m, _mm512_abs_ps(v[c]));
  }
  const float amax = _mm512_reduce_max_ps(m);
  const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  for (int c = 0; c < n; ++c) {
    __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v[c], inv));
    r = _mm512_max_epi32(_mm512_min_epi32(r, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * c), _mm512_cvtepi32_epi8(r));
  }
  *scale = amax / 127.0f;
}
#endif

template <typename TI>
void cache_write_i8(const TI* k, int64_t ks, const TI* v, int64_t vs, int64_t n, int64_t hkv, int64_t d,
                    const int64_t* slots, int8_t* kc, int8_t* vc, int64_t num_slots, float* ksc, float* vsc) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < hkv; ++h) {
      const int64_t at = h * num_slots + slots[i];
#if SHOAL_AVX512
      if constexpr (std::is_same_v<TI, bf16_t>) {
        if (d % 16 == 0 && d <= 256) {
          quantize_row16(k + i * ks + h * d, d, kc + at * d, ksc + at);
          quantize_row16(v + i * vs + h * d, d, vc + at * d, vsc + at);
          continue;
        }
      }
#endif
      quantize_row(k + i * ks + h * d, d, kc + at * d, ksc + at);
      quantize_row(v + i * vs + h * d, d, vc + at * d, vsc + at);
    }
}

// ---- SiLU(gate) * up ---------------------------------------------------------------------------
// y rows (n, 2 * m): gate | up, row stride ys -> out (n, m): T(T(silu(gate)) * up)
#if SHOAL_AVX512
// one bf16 row of the loop below, 16 lanes at a time, step for step (exp_neg16 is exp_neg's
// steps; the same divisions and roundings): the same bits (tested against both). 32 rows of
// SmolLM2's 2 x 1536, one call from Python, alternated three times (Xeon, 2 threads): 34-53 us
// with GCC's code for the loop, 28-30 us.
inline void silu_mul_row(const bf16_t* gate, const bf16_t* up, bf16_t* o, int64_t m) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(0x80000000u)));
  auto lanes16 = [&](__m512 a, __m256i u) {  // T(T(silu(a)) * u) of 16 lanes
    const __m512 e = exp_neg16(_mm512_or_ps(a, sign));  // exp(-|a|)
    const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, zero, _CMP_GE_OQ), _mm512_mul_ps(a, e), a);
    const __m512 silu = widen16(to_bf16(_mm512_div_ps(num, _mm512_add_ps(one, e))));
    return to_bf16(_mm512_mul_ps(silu, widen16(u)));
  };
  int64_t j = 0;
  // plain loads and stores, then a masked tail (32 rows of 2 x 1536, one call, Zen 5, builds
  // alternated three times: masked throughout 18.5-18.6 us, this way 17.3-17.4)
  for (; j + 16 <= m; j += 16) {
    const __m256i g = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gate + j));
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(up + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j), lanes16(widen16(g), u));
  }
  if (j < m) {
    const __mmask16 k = static_cast<__mmask16>((1u << (m - j)) - 1);
    _mm256_mask_storeu_epi16(o + j, k, lanes16(widen16(_mm256_maskz_loadu_epi16(k, gate + j)),
                                              _mm256_maskz_loadu_epi16(k, up + j)));
  }
}
#endif

template <typename T>
void silu_mul_impl(const T* y, int64_t ys, int64_t n, int64_t m, T* out) {
#pragma omp parallel for schedule(static) if (n >= 8)
  for (int64_t i = 0; i < n; ++i) {
    const T* gate = y + i * ys;
    const T* up = gate + m;
    T* o = out + i * m;
#if SHOAL_AVX512
    if constexpr (std::is_same_v<T, bf16_t>) {
      silu_mul_row(gate, up, o, m);
      continue;
    }
#endif
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const float a = ld(gate, j);
      // silu(a) = a / (1 + exp(-a)); exp of a non-positive argument only
      const float e = exp_neg(-std::fabs(a));
      const float num = a >= 0.0f ? a : a * e;  // (one division for both signs)
      const float silu = num / (1.0f + e);
      st(o, j, rnd<T>(silu) * ld(up, j));
    }
  }
}
}  // namespace

// OpenMP 5.0's pause (weak: a runtime without it leaves it null and the library still loads)
extern "C" int omp_pause_resource_all(int kind) __attribute__((weak));

extern "C" {

int shoal_kernels_abi() { return 15; }

// Ends the calling thread's OpenMP worker threads (omp_pause_soft); they start again at its next
// parallel region. libgomp keeps a pool of workers for each thread that ever opened a parallel
// region, and while the process holds more of them than there are CPUs every barrier spins only
// ~100 times before sleeping on a futex: a model loaded on one thread and served from another
// (`AsyncEngine`) left two pools, and decode ran 0.70x as fast (2 threads on 2 cores, ~8,000
// context switches a second). Returns 0, or -1 when the runtime has no pause.
int shoal_omp_release() { return omp_pause_resource_all ? omp_pause_resource_all(1 /* omp_pause_soft */) : -1; }

// For tests: n fp32 values -> bf16 by the vector rounding the kernels' epilogues use (`to_bf16`;
// n % 16 == 0). Returns 1 without AVX-512.
int shoal_bf16_round(int64_t n, const float* x, bf16_t* out) {
#if SHOAL_AVX512
  if (n % 16) return 1;
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), to_bf16(_mm512_loadu_ps(x + i)));
  return 0;
#else
  (void)n, (void)x, (void)out;
  return 1;
#endif
}

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
                      int64_t num_slots, float* ksc, float* vsc) {
  if (dtc == 2 && ksc && vsc && (dti == 0 || dti == 1)) {
    if (dti == 0)
      cache_write_i8<float>((const float*)k, ks, (const float*)v, vs, n, hkv, d, slots, (int8_t*)kc,
                            (int8_t*)vc, num_slots, ksc, vsc);
    else
      cache_write_i8<bf16_t>((const bf16_t*)k, ks, (const bf16_t*)v, vs, n, hkv, d, slots, (int8_t*)kc,
                             (int8_t*)vc, num_slots, ksc, vsc);
  } else if (dti == 0 && dtc == 0)
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
