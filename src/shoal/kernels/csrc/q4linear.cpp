// 4-bit weights (`quantization="q4"`): the products of GGUF's Q4_1 scheme as llama.cpp computes
// them on CPUs, integer dot products of 4-bit weights with activations quantized to int8.
//
// Weights: groups of 32 inputs of one output, w ~ d * q + m with q in 0..15 and d, m fp16 (the
// default model's GGUF stores its layers this way). Packed (`shoal.kernels.q4linear.q4pack`)
// in blocks of 16 outputs x 32 inputs, 320 bytes each, blocks [nb][kb] (rows [16a, 16b) one
// contiguous run, as the other packed layouts):
//   bytes [64 g, 64 g + 64), g < 4: byte 4 j + t = q[j][8 g + t] | q[j][8 g + 4 + t] << 4
//   bytes [256, 288): d[j] fp16;  bytes [288, 320): m[j] fp16               (j < 16, t < 4)
// so a 64-byte load's low nibbles are one VPDPBUSD operand (16 outputs x 4 inputs) and its high
// nibbles the next.
//
// Activations: each row's 32-input group is quantized on entry, xd = max|x| / 127, xq =
// round(x / xd) (nearest even, |xq| <= 127), xs = xd * sum(xq) (llama.cpp's Q8_1). Then output
// j of a row is, over its groups c in order,
//   acc = fma(float(isum_c), d_c * xd_c, acc);  acc = fma(m_c, xs_c, acc)
// with isum_c = sum_i q_i xq_i exact in int32, then + bias, rounded once to bf16 (or kept fp32).
// Every step depends on the row alone: the same bits at any row count or position.
//
// Bodies: AVX-512 (VPDPBUSD with AVX512-VNNI, else VPMADDUBSW + VPMADDWD: the same exact sums)
// and AVX2 (AVX-VNNI or the same pair), chosen by `shoal_packed_isa` (2+: AVX-512, 1: AVX2); with
// AMX (4) products of many rows run on AMX-INT8 tiles (q4linear_amx.cpp), the same bits.
// Work: strips of 2 or 4 blocks over the threads; tiles of a few rows x blocks in each, a
// weight load's nibbles split once for the tile's rows.

#include <vector>

#include "widen.h"

#if SHOAL_AMX_INT8
namespace shoal {
int q4_amx(const int8_t* xq, const float* xd, const float* xs, int64_t m, int64_t k, const uint8_t* wp,
           const bf16_t* bias, int64_t n, void* y, int64_t ys, bool f32);  // q4linear_amx.cpp
}
#endif

#if SHOAL_AVX2
namespace {
using namespace shoal;

// rows from which the AMX body (q4linear_amx.cpp; the same bits) takes a product where it can.
// Its per-group fp32 steps bound both bodies; the q4 products of a SmolLM2-135M step (bench/
// cpu_products.py, Xeon with AMX, 2 threads, alternated twice), AVX-512 vs AMX, ms: 8 rows 6.7-6.9
// vs 8.1-8.3, 16 rows 8.9-9.3 vs 9.5-10.0, 32 rows 14.4-14.8 vs 13.9-14.6, 48 rows 20.6-20.9 vs
// 19.9-20.3, 64 rows 26.3-26.4 vs 24.5-25.1, 128 rows 47.2-48.8 vs 41.0-41.6
constexpr int64_t kAmxRows = 40;

constexpr int64_t kBlockBytes = 320;  // a packed block: 256 bytes of nibbles, 16 d, 16 m (fp16)
// weights fetched this many bytes ahead of the loads. Measured (the q4 products of a decode step
// at one row, AMD EPYC, 2 threads, alternated twice): none 2.66-2.85 ms, 1 KB 2.48-2.59, 2 KB 2.44
constexpr int kAhead = 2048;

inline int32_t load32(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

#if SHOAL_AVX512
struct V512 {  // one 16-output line a register
  using I = __m512i;
  using F = __m512;
  // tiles of 4 rows x 2 blocks (1 row: x 4). 8 x 1 measured (q4 products of a decode step, 2 threads,
  // AMD EPYC, alternated twice): 8 rows 4.54-4.56 vs 4.94-5.22 ms, 32 rows 10.9-11.2 vs 10.7-11.5,
  // 128 rows 38.3-38.6 vs 36.5-37.1: no clear gain; 6 x 1 no better.
  static constexpr int kVecs = 1, kRows = 4, kBlocks = 2, kBlocks1 = 4;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I nibbles() { return _mm512_set1_epi8(0x0f); }
  static I lo(I v, I mask) { return _mm512_and_si512(v, mask); }
  // (a GFNI affine map for the high nibbles, one op instead of two: 1 / 8 / 32 rows 2.55-2.59 /
  // 5.10-5.20 / 11.1-11.3 ms vs 2.57-2.58 / 5.17-5.27 / 11.1-11.3, alternated: not kept)
  static I hi(I v, I mask) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), mask); }
  static I bcast(const int8_t* p) { return _mm512_set1_epi32(load32(p)); }
  static I zero() { return _mm512_setzero_si512(); }
  static I dp(I acc, I w, I x) {  // acc lane j += sum_t w[4j + t] (u8) * x[4j + t] (s8)
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, w, x);
#else
    const I p = _mm512_maddubs_epi16(w, x);  // pairs: |15 * 127 * 2| fits int16, no saturation
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
#endif
  }
  static F fzero() { return _mm512_setzero_ps(); }
  static F f16(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
#endif

struct V256 {  // a 16-output line is two registers (outputs 0-7, 8-15)
  using I = __m256i;
  using F = __m256;
  static constexpr int kVecs = 2, kRows = 2, kBlocks = 1, kBlocks1 = 2;
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I nibbles() { return _mm256_set1_epi8(0x0f); }
  static I lo(I v, I mask) { return _mm256_and_si256(v, mask); }
  static I hi(I v, I mask) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), mask); }
  static I bcast(const int8_t* p) { return _mm256_set1_epi32(load32(p)); }
  static I zero() { return _mm256_setzero_si256(); }
  static I dp(I acc, I w, I x) {
#ifdef __AVXVNNI__
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
    const I p = _mm256_maddubs_epi16(w, x);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
  }
  static F fzero() { return _mm256_setzero_ps(); }
  static F f16(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};

// One group of 32 activations quantized, as the header says. Scalar and IEEE (a true division,
// nearest-even rounding): the same values on every body. A group holding NaN or inf gets xd = NaN,
// so its row's outputs are NaN (as a float product's would be), not a finite guess.
inline void quantize_group_scalar(const bf16_t* x, int8_t* xq, float* xd, float* xs) {
  float v[32], amax = 0.0f;
  bool bad = false;
  for (int i = 0; i < 32; ++i) {
    v[i] = bf2f(x[i]);
    bad |= !std::isfinite(v[i]);
    amax = std::fmax(amax, std::fabs(v[i]));
  }
  const float d = amax / 127.0f;
  const bool ok = d > 0.0f && !bad;
  int32_t sum = 0;
  for (int i = 0; i < 32; ++i) {
    int32_t q = ok ? static_cast<int32_t>(std::nearbyint(v[i] / d)) : 0;
    q = q > 127 ? 127 : q < -127 ? -127 : q;
    xq[i] = static_cast<int8_t>(q);
    sum += q;
  }
  *xd = bad ? NAN : ok ? d : 0.0f;  // 0: an all-zero group adds nothing
  *xs = *xd * static_cast<float>(sum);
}

#if SHOAL_AVX512
// The same group in registers: the same division (VDIVPS rounds as the scalar one), the same
// nearest-even rounding, an exact max and an exact integer sum: the same bits. Non-finite groups
// go to the scalar code. (Scalar, the quantization was over half of a 32-row q4 product with
// K = 1536: 82 of 145 us, measured on a Xeon.)
inline void quantize_group(const bf16_t* x, int8_t* xq, float* xd, float* xs) {
  const __m512i raw = _mm512_loadu_si512(x);
  const __m512i expo = _mm512_set1_epi16(0x7f80);
  if (_mm512_cmpeq_epi16_mask(_mm512_and_si512(raw, expo), expo)) return quantize_group_scalar(x, xq, xd, xs);
  const __m512 v0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
  const __m512 v1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float d = amax / 127.0f;
  if (!(d > 0.0f)) {  // all zero (or too small to scale): codes 0, nothing added
    std::memset(xq, 0, 32);
    *xd = 0.0f, *xs = 0.0f;
    return;
  }
  const __m512 dv = _mm512_set1_ps(d), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_div_ps(v0, dv), kNearest), lo), hi));
  const __m512i q1 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_div_ps(v1, dv), kNearest), lo), hi));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xq), _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + 16), _mm512_cvtepi32_epi8(q1));
  *xd = d;
  *xs = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
}
#else
inline void quantize_group(const bf16_t* x, int8_t* xq, float* xd, float* xs) { quantize_group_scalar(x, xq, xd, xs); }
#endif

// One row's activations quantized per group of 32: xq (k) int8, xd and xs (k / 32)
void quantize_row(const bf16_t* x, int64_t k, int8_t* xq, float* xd, float* xs) {
  for (int64_t c = 0; c < k / 32; ++c) quantize_group(x + c * 32, xq + c * 32, xd + c, xs + c);
}

// y[NR rows, 16 NB outputs] = the rows' quantized activations (xq stride k; xd, xs stride kb) .
// packed blocks [0, NB) (block b's groups at w + b * bstride), + bias (may be null)
template <class V, int NR, int NB>
void tile(const int8_t* xq, const float* xd, const float* xs, int64_t k, const uint8_t* w, int64_t bstride,
          const bf16_t* bias, void* y, int64_t ys, bool f32) {
  constexpr int NV = NB * V::kVecs;  // registers a row's outputs
  constexpr int kBytes = 64 / V::kVecs;
  const int64_t kb = k / 32;
  typename V::F acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::fzero();
  const typename V::I mask = V::nibbles();
  for (int64_t c = 0; c < kb; ++c) {  // group c: inputs 32 c .. 32 c + 31
    typename V::I s[NR][NV];
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < NV; ++v) s[r][v] = V::zero();
    for (int g = 0; g < 4; ++g) {  // inputs 8 g .. 8 g + 3 (low nibbles), 8 g + 4 .. 8 g + 7 (high)
      typename V::I lo[NV], hi[NV];
      for (int v = 0; v < NV; ++v) {
        const uint8_t* src = w + (v / V::kVecs) * bstride + c * kBlockBytes + g * 64 + (v % V::kVecs) * kBytes;
        _mm_prefetch(reinterpret_cast<const char*>(src) + kAhead, _MM_HINT_T0);
        const typename V::I raw = V::load(src);
        lo[v] = V::lo(raw, mask), hi[v] = V::hi(raw, mask);
      }
      for (int r = 0; r < NR; ++r) {
        const int8_t* xr = xq + r * k + c * 32 + 8 * g;
        const typename V::I x0 = V::bcast(xr), x1 = V::bcast(xr + 4);
        for (int v = 0; v < NV; ++v) s[r][v] = V::dp(V::dp(s[r][v], lo[v], x0), hi[v], x1);
      }
    }
    typename V::F d[NV], mn[NV];
    for (int v = 0; v < NV; ++v) {
      const uint8_t* blk = w + (v / V::kVecs) * bstride + c * kBlockBytes + (v % V::kVecs) * (32 / V::kVecs);
      d[v] = V::f16(blk + 256), mn[v] = V::f16(blk + 288);
    }
    for (int r = 0; r < NR; ++r) {
      const typename V::F dx = V::set1(xd[r * kb + c]), sx = V::set1(xs[r * kb + c]);
      for (int v = 0; v < NV; ++v)
        acc[r][v] = V::fma(mn[v], sx, V::fma(V::cvt(s[r][v]), V::mul(d[v], dx), acc[r][v]));
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) {
      void* yo = static_cast<char*>(y) + (r * ys + 16 * b) * (f32 ? 4 : 2);
#if SHOAL_AVX512
      if constexpr (V::kVecs == 1) {  // in registers, as the AMX epilogues (qlinear.cpp)
        store16(acc[r][b], nullptr, bias ? bias + 16 * b : nullptr, yo, f32);
        continue;
      }
#endif
      alignas(64) float out[16];
      for (int h = 0; h < V::kVecs; ++h) V::store(out + h * (16 / V::kVecs), acc[r][b * V::kVecs + h]);
      put16(out, nullptr, bias ? bias + 16 * b : nullptr, yo, f32);
    }
}

using TileFn = void (*)(const int8_t*, const float*, const float*, int64_t, const uint8_t*, int64_t, const bf16_t*,
                       void*, int64_t, bool);

template <class V, int NR>
TileFn tile_at(int nb) {  // NR rows x nb blocks (nb <= V::kBlocks, or V::kBlocks1 for one row)
  constexpr int most = NR == 1 ? V::kBlocks1 : V::kBlocks;
  if constexpr (most >= 4)
    if (nb == 4) return tile<V, NR, 4>;
  if constexpr (most >= 3)
    if (nb == 3) return tile<V, NR, 3>;
  if constexpr (most >= 2)
    if (nb == 2) return tile<V, NR, 2>;
  return tile<V, NR, 1>;
}

template <class V>
TileFn tile_for(int nr, int nb) {
  switch (nr) {
    case 1: return tile_at<V, 1>(nb);
    case 2: return tile_at<V, 2>(nb);
    default: break;
  }
  if constexpr (V::kRows > 2) {
    switch (nr) {
      case 3: return tile_at<V, 3>(nb);
      case 4: return tile_at<V, 4>(nb);
      case 5: if constexpr (V::kRows >= 5) return tile_at<V, 5>(nb); break;
      case 6: if constexpr (V::kRows >= 6) return tile_at<V, 6>(nb); break;
      case 7: if constexpr (V::kRows >= 7) return tile_at<V, 7>(nb); break;
      case 8: if constexpr (V::kRows >= 8) return tile_at<V, 8>(nb); break;
      default: break;
    }
  }
  return nullptr;
}

template <class V>
int q4_linear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const uint8_t* wp, const bf16_t* bias,
              int64_t n, void* y, int64_t ys, int ydt, bool tiles) {
  if (m <= 0) return 0;
  const int64_t kb = k / 32, nblocks = n / 16, bstride = kb * kBlockBytes;
  std::vector<int8_t> xq(m * k);
  std::vector<float> xd(m * kb), xsum(m * kb);
#pragma omp parallel for schedule(static) if (m >= 16)
  for (int64_t r = 0; r < m; ++r) quantize_row(x + r * xs, k, xq.data() + r * k, xd.data() + r * kb, xsum.data() + r * kb);
#if SHOAL_AMX_INT8
  if (tiles && m >= kAmxRows) return q4_amx(xq.data(), xd.data(), xsum.data(), m, k, wp, bias, n, y, ys, ydt == 0);
#endif
  (void)tiles;
  const int width = nblocks >= 128 ? 4 : 2;  // blocks a strip (as the other bodies)
  const int64_t strips = (nblocks + width - 1) / width;
  const bool f32 = ydt == 0;
  const size_t ysize = f32 ? 4 : 2;
#pragma omp parallel for schedule(static) if (strips > 1)
  for (int64_t s = 0; s < strips; ++s) {
    const int64_t b0 = s * width;
    const int nb = static_cast<int>(nblocks - b0 < width ? nblocks - b0 : width);
    // the thread's next strip (static schedule), a slice before each tile of rows, when more than
    // one tile reads a strip (as qlinear_dot.cpp; the q4 products of a decode step, Zen 5, builds
    // alternated in one process: 8 rows 4.17 -> 4.01 ms, 32 rows 9.44 -> 8.86). Tried on the FMA
    // bodies (qlinear_fma.cpp): within +-5%, not kept.
    const int64_t tiles = (m + V::kRows - 1) / V::kRows;
    const int64_t next_nb = s + 1 < strips ? (nblocks - b0 - nb < width ? nblocks - b0 - nb : width) : 0;
    const char* pf = reinterpret_cast<const char*>(wp + (b0 + nb) * bstride);
    const char* pf_end = tiles > 1 ? pf + next_nb * bstride : pf;
    const int64_t pf_lines = ((pf_end - pf) / 64 + tiles - 1) / tiles;
    for (int64_t m0 = 0; m0 < m; m0 += V::kRows) {
      for (int64_t i = 0; i < pf_lines && pf < pf_end; ++i, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
      const int nr = static_cast<int>(m - m0 < V::kRows ? m - m0 : V::kRows);
      const int step = nr == 1 ? V::kBlocks1 : V::kBlocks;
      for (int b = 0; b < nb; b += step) {
        const int bn = nb - b < step ? nb - b : step;
        tile_for<V>(nr, bn)(xq.data() + m0 * k, xd.data() + m0 * kb, xsum.data() + m0 * kb, k,
                              wp + (b0 + b) * bstride, bstride, bias ? bias + (b0 + b) * 16 : nullptr,
                              static_cast<char*>(y) + (m0 * ys + (b0 + b) * 16) * ysize, ys, f32);
      }
    }
  }
  return 0;
}

}  // namespace
#endif  // SHOAL_AVX2

extern "C" {
int shoal_packed_isa(int want);

// y (m, n) (row stride ys; ydt 1 = bf16, 0 = fp32) = x (m, k) bf16 (row stride xs) @ the packed
// 4-bit weight wp, + bias (n,) bf16 or null, as the header describes; n % 16 == 0, k % 32 == 0.
// Returns 1 for a shape it cannot take or without a body (shoal_packed_isa() == 0).
int shoal_q4linear(const shoal::bf16_t* x, int64_t xs, int64_t m, int64_t k, const uint8_t* wp,
                   const shoal::bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt) {
  if (n % 16 || k % 32) return 1;
  const int body = shoal_packed_isa(-1);
#if SHOAL_AVX512
  if (body >= 2) return q4_linear<V512>(x, xs, m, k, wp, bias, n, y, ys, ydt, body >= 4);
#endif
#if SHOAL_AVX2
  if (body >= 1) return q4_linear<V256>(x, xs, m, k, wp, bias, n, y, ys, ydt, false);
#endif
  (void)body, (void)x, (void)xs, (void)m, (void)wp, (void)bias, (void)y, (void)ys, (void)ydt;
  return 1;
}

// The products' activation step alone (tests): x (m, k) bf16 (row stride xs) -> xq (m, k) int8,
// xd and xsum (m, k / 32) fp32, in registers unless scalar (the scalar code the registers match).
// Returns 1 for k % 32 or without the AVX2 build.
int shoal_q4_quantize(const shoal::bf16_t* x, int64_t xs, int64_t m, int64_t k, int8_t* xq, float* xd,
                      float* xsum, int scalar) {
#if SHOAL_AVX2
  if (k % 32) return 1;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < k / 32; ++c) {
      const int64_t i = r * k + c * 32, j = r * (k / 32) + c;
      (scalar ? quantize_group_scalar : quantize_group)(x + r * xs + c * 32, xq + i, xd + j, xsum + j);
    }
  return 0;
#else
  (void)x, (void)xs, (void)m, (void)k, (void)xq, (void)xd, (void)xsum, (void)scalar;
  return 1;
#endif
}
}  // extern "C"
