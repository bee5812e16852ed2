// The packed products' AVX-512F body, for CPUs with AVX-512 but no bf16 dot products (Intel
// Skylake-SP, Cascade Lake, Ice Lake: `qlinear.cpp` calls it when neither AMX nor AVX512-BF16
// runs). The same packed weights, bf16 or int8 (layout in qlinear.cpp), turned into fp32 in
// registers and summed by FMA; the activations are bf16 as for the other bodies (widened to fp32
// once a tile, exact), so every product is exact and each FMA rounds one add.
//
// bf16 blocks: a line kk (64 bytes) is 16 outputs' pairs (w[j][2kk], w[j][2kk + 1]) in 32-bit
// lanes; `lane << 16` is the first as fp32, `lane & 0xffff0000` the second. Output j of a row is
// one fp32 chain over K in order (acc += x[2i] w[j][2i]; acc += x[2i+1] w[j][2i+1]).
//
// int8 blocks: a 64-value group (inputs 4g .. 4g + 3 of 16 outputs) is stored in `group_order`,
// whose 16-byte chunk c holds outputs 4c .. 4c + 3: bytes 0-7 their pairs of inputs 4g, 4g + 1,
// bytes 8-15 those of 4g + 2, 4g + 3. Each chunk is sign-extended to 16 fp32 lanes as it lies and
// multiplied by the row's inputs in the matching pattern (x[4g + {0,1,0,1,..., 2,3,2,3,...}]), so
// no shuffle of the weights: lane (c, i) sums one (output, input mod 4) class over K, and the
// four classes of an output are added at the end in a fixed order.
//
// Both sums depend on the row alone: the same bits at any row count or position (batch-invariant).
// Work as in qlinear_dot.cpp: strips of 2 or 4 blocks over the threads, tiles of up to 4 rows
// (bf16: x 4 blocks, each weight line loaded once for the tile's rows; int8: one block, 4 x 4
// accumulators). int8 at more than 32 rows is widened once per strip to fp32 in the same order
// (the same values and sums).

#include "widen.h"

#if SHOAL_AVX512
namespace {
using namespace shoal;

constexpr int kRows = 4;  // rows a tile
// Weights are fetched this many bytes ahead of the loads (int8 / bf16): one row is bound by how
// fast a core pulls the weights from memory. Measured (bench/cpu_products.py, 1 row, Cascade Lake,
// 2 threads, ms a step): int8 12.1-13.2 without, 9.1-9.8 at 1 KB, 8.8-9.6 at 2 KB; bf16 15.5-15.7
// without, 13.9-14.4 at 1 KB, 14.9-15.2 at 2 KB.
constexpr int kAheadQ = 2048, kAheadB = 1024;

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

// int8 values (whole groups, group_order) -> fp32 in the same order (dst 64-byte aligned)
void widen_block_fma(const int8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 16) _mm512_store_ps(dst + i, chunk(src + i));
}

using TileB = void (*)(const float*, int64_t, const bf16_t*, int64_t, const bf16_t*, const bf16_t*, void*, int64_t,
                       bool);
template <typename W>
using TileQ = void (*)(const float*, int64_t, const W*, const bf16_t*, const bf16_t*, void*, int64_t, bool);
#define SHOAL_TILES(r) {tile_b<r, 1>, tile_b<r, 2>, tile_b<r, 3>, tile_b<r, 4>}
const TileB kTilesB[kRows][4] = {SHOAL_TILES(1), SHOAL_TILES(2), SHOAL_TILES(3), SHOAL_TILES(4)};
#undef SHOAL_TILES
const TileQ<int8_t> kTilesQ[kRows] = {tile_q<1, int8_t>, tile_q<2, int8_t>, tile_q<3, int8_t>, tile_q<4, int8_t>};
const TileQ<float> kTilesF[kRows] = {tile_q<1, float>, tile_q<2, float>, tile_q<3, float>, tile_q<4, float>};

}  // namespace

extern "C" {
// y (m, n) = x (m, k) bf16 @ the packed weight (int8 when q, with scale; else bf16, scale null)
// + bias, as `shoal_qlinear` / `shoal_blinear` describe (ydt 1 = bf16, 0 = fp32); n % 16 == 0,
// k % 32 == 0.
int shoal_fma_linear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const void* wp, int q,
                     const bf16_t* scale, const bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt) {
  if (m <= 0) return 0;
  const int64_t nblocks = n / 16, bstride = k * 16;
  const int width = nblocks >= 128 ? 4 : 2;  // blocks a strip (as qlinear_dot.cpp)
  const int64_t strips = (nblocks + width - 1) / width;
  const bool widen_once = q && m > 8 * kRows;  // 9+ row tiles: widen the strip once
  const size_t ysize = ydt == 0 ? 4 : 2;
  float* xf = static_cast<float*>(std::aligned_alloc(64, ((m * k * sizeof(float)) + 63) / 64 * 64));
  for (int64_t r = 0; r < m; ++r)  // the activations in fp32, once (exact; one pass, no barrier)
    for (int64_t i = 0; i < k; i += 16) _mm512_storeu_ps(xf + r * k + i, load16(x + r * xs + i));
#pragma omp parallel if (strips > 1)
  {
    float* buf = widen_once ? static_cast<float*>(std::aligned_alloc(64, width * bstride * sizeof(float))) : nullptr;
#pragma omp for schedule(static)
    for (int64_t s = 0; s < strips; ++s) {
      const int64_t b0 = s * width;
      const int nb = static_cast<int>(nblocks - b0 < width ? nblocks - b0 : width);
      const bf16_t* sc = scale ? scale + b0 * 16 : nullptr;
      const bf16_t* bi = bias ? bias + b0 * 16 : nullptr;
      const bf16_t* wb = static_cast<const bf16_t*>(wp) + b0 * bstride;  // bf16 weights
      const int8_t* wq = static_cast<const int8_t*>(wp) + b0 * bstride;  // int8 weights
      if (widen_once) widen_block_fma(wq, nb * bstride, buf);
      for (int64_t m0 = 0; m0 < m; m0 += kRows) {
        const int nr = static_cast<int>(m - m0 < kRows ? m - m0 : kRows);
        char* yt = static_cast<char*>(y) + (m0 * ys + b0 * 16) * ysize;
        if (q) {
          for (int b = 0; b < nb; ++b) {
            const bf16_t* bb = bi ? bi + 16 * b : nullptr;
            char* yb = yt + 16 * b * ysize;
            if (widen_once)
              kTilesF[nr - 1](xf + m0 * k, k, buf + b * bstride, sc + 16 * b, bb, yb, ys, ydt == 0);
            else
              kTilesQ[nr - 1](xf + m0 * k, k, wq + b * bstride, sc + 16 * b, bb, yb, ys, ydt == 0);
          }
        } else {
          kTilesB[nr - 1][nb - 1](xf + m0 * k, k, wb, bstride, sc, bi, yt, ys, ydt == 0);
        }
      }
    }
    std::free(buf);
  }
  std::free(xf);
  return 0;
}
}  // extern "C"
#endif  // SHOAL_AVX512
