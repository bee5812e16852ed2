// The packed products' FMA bodies, for CPUs without bf16 dot products: AVX-512F (Intel
// Skylake-SP, Cascade Lake, Ice Lake) and AVX2 + FMA (AMD Zen 2/3, Intel Haswell and later).
// `qlinear.cpp` calls them when neither AMX nor AVX512-BF16 runs. The same packed weights, bf16
// or int8 (layout in qlinear.cpp), turned into fp32 in registers and summed by FMA; the
// activations are bf16 as for the other bodies (widened to fp32 once a call, exact), so every
// product is exact and each FMA rounds one add.
//
// bf16 blocks: a line kk (64 bytes) is 16 outputs' pairs (w[j][2kk], w[j][2kk + 1]) in 32-bit
// lanes; `lane << 16` is the first as fp32, `lane & 0xffff0000` the second. Output j of a row is
// one fp32 chain over K in order (acc += x[2i] w[j][2i]; acc += x[2i+1] w[j][2i+1]); AVX2 takes
// a line as two halves of 8 outputs.
//
// int8 blocks: a 64-value group (inputs 4g .. 4g + 3 of 16 outputs) is stored in `group_order`,
// whose 16-byte chunk c holds outputs 4c .. 4c + 3: bytes 0-7 their pairs of inputs 4g, 4g + 1,
// bytes 8-15 those of 4g + 2, 4g + 3. Each chunk is sign-extended to fp32 lanes as it lies and
// multiplied by the row's inputs in the matching pattern (x[4g + {0,1,0,1,...}], ...), so no
// shuffle of the weights: AVX-512's lane (c, i) sums one (output, input mod 4) class over K,
// AVX2's one (output, input mod 2) class, and an output's classes are added at the end in a
// fixed order.
//
// Both sums depend on the row alone: the same bits at any row count or position (batch-invariant).
// Work (`fma_linear`, as qlinear_dot.cpp): strips of 2 or 4 blocks over the threads, tiles of a
// few rows in each (AVX-512: bf16 up to 8 rows x 2 blocks, int8 6 rows x 1 block; AVX2: bf16 4
// rows x 1 block, int8 2 rows x 1 block: its 16 registers), each weight line loaded once for the
// tile's rows. int8 at more than 8 tiles of rows is widened once per strip to fp32 in the same
// order (the same values and sums).

#include "widen.h"

#if SHOAL_AVX2
namespace {
using namespace shoal;

// Weights are fetched this many bytes ahead of the loads (int8 / bf16): one row is bound by how
// fast a core pulls the weights from memory. Measured (bench/cpu_products.py, 1 row, Cascade Lake,
// 2 threads, ms a step): int8 12.1-13.2 without, 9.1-9.8 at 1 KB, 8.8-9.6 at 2 KB; bf16 15.5-15.7
// without, 13.9-14.4 at 1 KB, 14.9-15.2 at 2 KB.
constexpr int kAheadQ = 2048, kAheadB = 1024;

#if SHOAL_AVX512
// y[NR rows, 16 NB outputs] = xf[NR rows (stride k), K] . bf16 blocks [0, NB) (block b at w + b *
// bstride), then store16 (scale and bias may be null)
template <int NR, int NB>
void tile_b(const float* xf, int64_t k, const bf16_t* w, int64_t bstride, const bf16_t* scale, const bf16_t* bias,
            void* y, int64_t ys, bool f32) {
  __m512 acc[NR][NB];
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t i = 0; i < k / 2; ++i) {  // line i: inputs 2i, 2i + 1 (line kk of K block i / 16)
    __m512 w0[NB], w1[NB];
    for (int b = 0; b < NB; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(w + b * bstride + i * 32) + kAheadB, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(w + b * bstride + i * 32);
      w0[b] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      w1[b] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 x0 = _mm512_set1_ps(xf[r * k + 2 * i]), x1 = _mm512_set1_ps(xf[r * k + 2 * i + 1]);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(x1, w1[b], _mm512_fmadd_ps(x0, w0[b], acc[r][b]));
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b)
      store16(acc[r][b], scale ? scale + 16 * b : nullptr, bias ? bias + 16 * b : nullptr,
              static_cast<char*>(y) + (r * ys + 16 * b) * (f32 ? 4 : 2), f32);
}

// one chunk of an int8 group (16 values in group_order) as fp32, from the packed int8 or from
// a strip widened to fp32 once (`widen_block_fma`)
inline __m512 chunk(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
inline __m512 chunk(const float* w) { return _mm512_load_ps(w); }

// y[NR rows, 16 outputs] = xf[NR rows, K] . one int8 block at w (groups of 64 in group_order; W =
// float: the same values widened), then store16 (scale: the int8 scales)
template <int NR, typename W>
void tile_q(const float* xf, int64_t k, const W* w, const bf16_t* scale, const bf16_t* bias, void* y,
            int64_t ys, bool f32) {
  __m512 acc[NR][4];  // [row][chunk c]: lane i = output 4c + (i % 8) / 2, input class (i / 8) * 2 + i % 2
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  const __m512i pattern = _mm512_set_epi32(3, 2, 3, 2, 3, 2, 3, 2, 1, 0, 1, 0, 1, 0, 1, 0);
  for (int64_t g = 0; g < k / 4; ++g) {  // group g: inputs 4g .. 4g + 3
    __m512 wv[4];
    _mm_prefetch(reinterpret_cast<const char*>(w + g * 64) + kAheadQ, _MM_HINT_T0);
    for (int c = 0; c < 4; ++c) wv[c] = chunk(w + g * 64 + c * 16);
    for (int r = 0; r < NR; ++r) {
      const __m512 xp = _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(_mm_loadu_ps(xf + r * k + 4 * g)));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(xp, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    alignas(64) float a[64], s[16];
    for (int c = 0; c < 4; ++c) _mm512_store_ps(a + 16 * c, acc[r][c]);
    for (int j = 0; j < 16; ++j) {  // output j = 4c + q: its four classes, in one order
      const float* ac = a + 16 * (j / 4) + 2 * (j % 4);
      s[j] = (ac[0] + ac[1]) + (ac[8] + ac[9]);
    }
    store16(_mm512_load_ps(s), scale, bias, static_cast<char*>(y) + r * ys * (f32 ? 4 : 2), f32);
  }
}

struct Avx512 {  // the AVX-512F body's tiles
  // bf16: 8 rows x 2 blocks (16 accumulators; a line's shift and mask serve 8 rows): against 4 x 4,
  // a decode step's products at 8 / 32 / 128 / 512 rows 19.0-19.7 -> 16.3-16.5, 49.0-50.2 ->
  // 43.5-45.3, 169.7-180.1 -> 158.1-160.0, 682-689 -> 632-649 ms (bench/cpu_products.py, Cascade
  // Lake, 2 threads, builds alternated three times)
  // int8: 6 rows x 1 block (24 accumulators; a chunk's widening serves 6 rows): against 4 rows,
  // 32 / 128 rows 65.7-67.3 -> 61.3-62.2, 219.7-224.8 -> 210.8-212.7 ms a step (alternated builds)
  static constexpr int kRowsB = 8, kBlocks = 2, kRowsQ = 6;
  static void b(int nr, int nb, const float* xf, int64_t k, const bf16_t* w, int64_t bstride, const bf16_t* scale,
                const bf16_t* bias, void* y, int64_t ys, bool f32) {
    using Fn = void (*)(const float*, int64_t, const bf16_t*, int64_t, const bf16_t*, const bf16_t*, void*, int64_t,
                        bool);
#define SHOAL_TILES(r) {tile_b<r, 1>, tile_b<r, 2>}
    static const Fn tiles[8][2] = {SHOAL_TILES(1), SHOAL_TILES(2), SHOAL_TILES(3), SHOAL_TILES(4),
                                   SHOAL_TILES(5), SHOAL_TILES(6), SHOAL_TILES(7), SHOAL_TILES(8)};
#undef SHOAL_TILES
    tiles[nr - 1][nb - 1](xf, k, w, bstride, scale, bias, y, ys, f32);
  }
  template <typename W>
  static void q(int nr, const float* xf, int64_t k, const W* w, const bf16_t* scale, const bf16_t* bias, void* y,
                int64_t ys, bool f32) {
    using Fn = void (*)(const float*, int64_t, const W*, const bf16_t*, const bf16_t*, void*, int64_t, bool);
    static const Fn tiles[6] = {tile_q<1, W>, tile_q<2, W>, tile_q<3, W>, tile_q<4, W>, tile_q<5, W>, tile_q<6, W>};
    tiles[nr - 1](xf, k, w, scale, bias, y, ys, f32);
  }
};
#endif  // SHOAL_AVX512

// the AVX2 body: 8 lanes, 16 registers
inline __m256 half8(const int8_t* w) {  // 8 int8 -> fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
inline __m256 half8(const float* w) { return _mm256_loadu_ps(w); }

// y[NR rows, 16 outputs] = xf[NR rows (stride k), K] . one bf16 block at w, then put16
template <int NR>
void tile_b2(const float* xf, int64_t k, const bf16_t* w, const bf16_t* scale, const bf16_t* bias, void* y,
             int64_t ys, bool f32) {
  __m256 acc[NR][2];  // [row][half]: outputs 8 half .. 8 half + 7
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t i = 0; i < k / 2; ++i) {  // line i: inputs 2i, 2i + 1
    _mm_prefetch(reinterpret_cast<const char*>(w + i * 32) + kAheadB, _MM_HINT_T0);
    __m256 w0[2], w1[2];
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * 32 + h * 16));
      w0[h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      w1[h] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 x0 = _mm256_broadcast_ss(xf + r * k + 2 * i), x1 = _mm256_broadcast_ss(xf + r * k + 2 * i + 1);
      for (int h = 0; h < 2; ++h) acc[r][h] = _mm256_fmadd_ps(x1, w1[h], _mm256_fmadd_ps(x0, w0[h], acc[r][h]));
    }
  }
  for (int r = 0; r < NR; ++r) {
    alignas(32) float s[16];
    _mm256_store_ps(s, acc[r][0]);
    _mm256_store_ps(s + 8, acc[r][1]);
    put16(s, scale, bias, static_cast<char*>(y) + r * ys * (f32 ? 4 : 2), f32);
  }
}

// y[NR rows, 16 outputs] = xf[NR rows, K] . one int8 block at w (W = float: widened), then put16
template <int NR, typename W>
void tile_q2(const float* xf, int64_t k, const W* w, const bf16_t* scale, const bf16_t* bias, void* y,
             int64_t ys, bool f32) {
  __m256 acc[NR][4];  // [row][chunk c]: lane i = output 4c + i / 2, inputs of parity i % 2
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < k / 4; ++g) {  // group g: inputs 4g .. 4g + 3
    _mm_prefetch(reinterpret_cast<const char*>(w + g * 64) + kAheadQ, _MM_HINT_T0);
    __m256 xa[NR], xb[NR];  // (x[4g], x[4g + 1]) and (x[4g + 2], x[4g + 3]), 4 times each
    for (int r = 0; r < NR; ++r) {
      xa[r] = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(xf + r * k + 4 * g)));
      xb[r] = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(xf + r * k + 4 * g + 2)));
    }
    for (int c = 0; c < 4; ++c) {
      const __m256 lo = half8(w + g * 64 + c * 16), hi = half8(w + g * 64 + c * 16 + 8);
      for (int r = 0; r < NR; ++r) acc[r][c] = _mm256_fmadd_ps(xb[r], hi, _mm256_fmadd_ps(xa[r], lo, acc[r][c]));
    }
  }
  for (int r = 0; r < NR; ++r) {
    alignas(32) float a[32], s[16];
    for (int c = 0; c < 4; ++c) _mm256_store_ps(a + 8 * c, acc[r][c]);
    for (int j = 0; j < 16; ++j) s[j] = a[2 * j] + a[2 * j + 1];  // output j: lanes 2j, 2j + 1 of chunk j / 4
    put16(s, scale, bias, static_cast<char*>(y) + r * ys * (f32 ? 4 : 2), f32);
  }
}

struct Avx2 {  // the AVX2 body's tiles
  static constexpr int kRowsB = 4, kBlocks = 1, kRowsQ = 2;
  static void b(int nr, int, const float* xf, int64_t k, const bf16_t* w, int64_t, const bf16_t* scale,
                const bf16_t* bias, void* y, int64_t ys, bool f32) {
    using Fn = void (*)(const float*, int64_t, const bf16_t*, const bf16_t*, const bf16_t*, void*, int64_t, bool);
    static const Fn tiles[4] = {tile_b2<1>, tile_b2<2>, tile_b2<3>, tile_b2<4>};
    tiles[nr - 1](xf, k, w, scale, bias, y, ys, f32);
  }
  template <typename W>
  static void q(int nr, const float* xf, int64_t k, const W* w, const bf16_t* scale, const bf16_t* bias, void* y,
                int64_t ys, bool f32) {
    (nr == 1 ? tile_q2<1, W> : tile_q2<2, W>)(xf, k, w, scale, bias, y, ys, f32);
  }
};

// y (m, n) = x (m, k) bf16 @ the packed weight (int8 when q, with scale; else bf16, scale null)
// + bias on body T's tiles, as `shoal_qlinear` / `shoal_blinear` describe (ydt 1 = bf16, 0 =
// fp32); n % 16 == 0, k % 32 == 0.
template <class T>
int fma_linear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const void* wp, int q, const bf16_t* scale,
               const bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt) {
  if (m <= 0) return 0;
  const int64_t nblocks = n / 16, bstride = k * 16;
  const int width = nblocks >= 128 ? 4 : 2;  // blocks a strip (as qlinear_dot.cpp)
  const int64_t strips = (nblocks + width - 1) / width;
  const int rows = q ? T::kRowsQ : T::kRowsB;  // rows a tile
  const bool widen_once = q && m > 8 * rows;  // 9+ tiles of rows: widen the strip once
  const bool f32 = ydt == 0;
  const size_t ysize = f32 ? 4 : 2;
  float* xf = static_cast<float*>(std::aligned_alloc(64, ((m * k * sizeof(float)) + 63) / 64 * 64));
  for (int64_t r = 0; r < m; ++r)  // the activations in fp32, once (exact; one pass, no barrier)
    for (int64_t i = 0; i < k; ++i) xf[r * k + i] = bf2f(x[r * xs + i]);
#pragma omp parallel if (strips > 1)
  {
    float* buf = widen_once ? static_cast<float*>(std::aligned_alloc(64, width * bstride * sizeof(float))) : nullptr;
#pragma omp for schedule(static)
    for (int64_t s = 0; s < strips; ++s) {
      const int64_t b0 = s * width;
      const int nb = static_cast<int>(nblocks - b0 < width ? nblocks - b0 : width);
      const bf16_t* wb = static_cast<const bf16_t*>(wp) + b0 * bstride;  // bf16 weights
      const int8_t* wq = static_cast<const int8_t*>(wp) + b0 * bstride;  // int8 weights
      if (widen_once)  // int8 -> fp32, the same order
        for (int64_t i = 0; i < nb * bstride; ++i) buf[i] = static_cast<float>(wq[i]);
      for (int64_t m0 = 0; m0 < m; m0 += rows) {
        const int nr = static_cast<int>(m - m0 < rows ? m - m0 : rows);
        const int step = q ? 1 : T::kBlocks;
        for (int b = 0; b < nb; b += step) {
          const int bn = nb - b < step ? nb - b : step;
          const bf16_t* sc = scale ? scale + (b0 + b) * 16 : nullptr;
          const bf16_t* bi = bias ? bias + (b0 + b) * 16 : nullptr;
          char* yb = static_cast<char*>(y) + (m0 * ys + (b0 + b) * 16) * ysize;
          if (!q)
            T::b(nr, bn, xf + m0 * k, k, wb + b * bstride, bstride, sc, bi, yb, ys, f32);
          else if (widen_once)
            T::q(nr, xf + m0 * k, k, buf + b * bstride, sc, bi, yb, ys, f32);
          else
            T::q(nr, xf + m0 * k, k, wq + b * bstride, sc, bi, yb, ys, f32);
        }
      }
    }
    std::free(buf);
  }
  std::free(xf);
  return 0;
}

}  // namespace

extern "C" {
#if SHOAL_AVX512
int shoal_fma_linear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const void* wp, int q,
                     const bf16_t* scale, const bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt) {
  return fma_linear<Avx512>(x, xs, m, k, wp, q, scale, bias, n, y, ys, ydt);
}
#endif
int shoal_avx2_linear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const void* wp, int q,
                      const bf16_t* scale, const bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt) {
  return fma_linear<Avx2>(x, xs, m, k, wp, q, scale, bias, n, y, ys, ydt);
}
}  // extern "C"
#endif  // SHOAL_AVX2
