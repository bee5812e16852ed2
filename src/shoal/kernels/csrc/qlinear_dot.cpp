// The packed products' AVX512-BF16 body (`qlinear.cpp` calls it where the CPU has no AMX: AMD
// Zen 4/5, Intel Cooper Lake): the same packed weights, bf16 or int8 (see qlinear.cpp for the
// layout), read by VDPBF16PS dot products instead of tiles.
//
// A packed block's line kk (64 bytes) holds w[16 nb + j][32 kb + 2 kk + p] for j < 16, p < 2:
// the 16 outputs' pairs of inputs 2 kk, 2 kk + 1, exactly VDPBF16PS's operand (16 fp32 lanes,
// each adding a pair of bf16 products). So a row's output j is one fp32 chain over K:
//   acc_j += x[2i] w[j][2i] + x[2i+1] w[j][2i+1],  i = 0 .. K/2 - 1 in order
// (bf16 products are exact in fp32; the instruction rounds each add to nearest even), times the
// scale (int8), plus the bias, rounded once to bf16. That chain does not depend on how many rows
// are computed together or where the row sits: the product is batch-invariant at any size.
//
// Work: strips of 2 or 4 blocks (32 or 64 outputs) split over the threads; within a strip, tiles
// of up to 4 rows (above 8 rows with bf16 weights, and int8 ones widened once: 6 rows in strips of
// 3-4 blocks, 12 in strips of 1-2), the rows split evenly, each weight line loaded once for the
// tile's rows (4 x 4, 6 x 4 or 12 x 2 accumulators). int8 blocks are widened on the
// fly at up to 16 rows, else once per strip into a buffer (the same values: the bits are the same
// either way). Measured (bench/cpu_products.py, AMD EPYC, 2
// threads): widening once from 5 rows made int8 slower than bf16 at 8-32 rows (32 rows: 16.8 vs
// 14.8 ms a step); on the fly up to 32 rows it is on par (16.0 vs 15.7), at 8 rows 6.7 vs 9.1
// (Zen 4, before the 12-row tiles; on Zen 5 with them, widening once pays from 17 rows: see
// `widen_once`).

#include "widen.h"

#if SHOAL_DPBF16
namespace {
using namespace shoal;

constexpr int kRows = 4;  // rows an int8 tile, and a bf16 tile at up to 8 rows
// rows a bf16 tile above 8 rows: 6 x 4 blocks (24 accumulators). Measured (the 120 decoder
// products of a decode step, bf16, AMD EPYC, 2 threads, builds alternated twice), ms at 8 / 32 /
// 128 rows: 4 x 4 6.73-6.89 / 13.05-13.21 / 38.45-38.47; 6 x 4 6.81-8.15 / 12.08-12.20 /
// 33.15-33.80; 8 x 2 7.48-7.50 / 12.65-12.75 / 33.20-33.35
constexpr int kRowsWide = 6;

// The thread's next strip of weights, fetched into L2 a few lines per K step of the current
// strip's tiles: the first tile of a strip otherwise waits on memory alone while the others
// (weights in L2) compute with memory idle. The 120 decoder products of a decode step (AMD EPYC
// Zen 5, 2 threads, the two builds alternated in one process), ms: bf16 32 rows 11.96 -> 9.68,
// 128 rows 34.3 -> 32.1; int8 8 rows 5.74 -> 3.73, 32 rows 12.2 -> 10.4. Into L1 instead: within
// 3%. Also for strips of one tile (1-4 rows, memory-bound): one row 4.70 -> 5.21, so not there.
struct Prefetch {
  const char* p;
  const char* end;
  int64_t lines;  // per step
  void step() {
    for (int64_t i = 0; i < lines && p < end; ++i, p += 64) _mm_prefetch(p, _MM_HINT_T1);
  }
};

inline __m512i pair(const bf16_t* x) {  // x[0], x[1] broadcast to every 32-bit lane
  int32_t v;
  __builtin_memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}

inline __m512 dot(__m512 acc, __m512i x, __m512i w) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(x), reinterpret_cast<__m512bh>(w));
}

// y[NR rows, 16 NB outputs] = x[NR rows, K] . blocks [0, NB) (block b at w + b * bstride values),
// then * scale, + bias (either may be null), rounded to bf16 unless y is fp32 (f32). Q: w holds
// packed int8 widened here.
template <int NR, int NB, bool Q>
void tile(const bf16_t* x, int64_t xs, int64_t kb, const void* w, int64_t bstride, const bf16_t* scale,
          const bf16_t* bias, void* y, int64_t ys, bool f32, Prefetch* pf) {
  __m512 acc[NR][NB];
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  [[maybe_unused]] const Widener wd;
  for (int64_t c = 0; c < kb; ++c) {
    const bf16_t* xc = x + c * 32;
    if (pf) pf->step();
    if constexpr (Q) {
      const int8_t* wc = static_cast<const int8_t*>(w) + c * 512;
      for (int g = 0; g < 8; ++g) {  // group g = lines 2g and 2g + 1
        __m512i lo[NB], hi[NB];
        for (int b = 0; b < NB; ++b) wd(wc + b * bstride + g * 64, lo[b], hi[b]);
        for (int r = 0; r < NR; ++r) {
          const __m512i x0 = pair(xc + r * xs + 4 * g), x1 = pair(xc + r * xs + 4 * g + 2);
          for (int b = 0; b < NB; ++b) acc[r][b] = dot(dot(acc[r][b], x0, lo[b]), x1, hi[b]);
        }
      }
    } else {
      const bf16_t* wc = static_cast<const bf16_t*>(w) + c * 512;
      for (int kk = 0; kk < 16; ++kk) {
        __m512i wv[NB];
        for (int b = 0; b < NB; ++b)
          wv[b] = _mm512_loadu_si512(wc + b * bstride + kk * 32);
        for (int r = 0; r < NR; ++r) {
          const __m512i xv = pair(xc + r * xs + 2 * kk);
          for (int b = 0; b < NB; ++b) acc[r][b] = dot(acc[r][b], xv, wv[b]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b)
      store16(acc[r][b], scale ? scale + 16 * b : nullptr, bias ? bias + 16 * b : nullptr,
              static_cast<char*>(y) + (r * ys + 16 * b) * (f32 ? 4 : 2), f32);
}

using TileFn = void (*)(const bf16_t*, int64_t, int64_t, const void*, int64_t, const bf16_t*, const bf16_t*,
                        void*, int64_t, bool, Prefetch*);
#define SHOAL_TILES(r, q) {tile<r, 1, q>, tile<r, 2, q>, tile<r, 3, q>, tile<r, 4, q>}
const TileFn kTilesQ[kRows][4] = {SHOAL_TILES(1, true), SHOAL_TILES(2, true), SHOAL_TILES(3, true),
                                  SHOAL_TILES(4, true)};
#undef SHOAL_TILES
#define SHOAL_TILES(r) {tile<r, 1, false>, tile<r, 2, false>, tile<r, 3, false>, tile<r, 4, false>}
const TileFn kTilesB[kRowsWide][4] = {SHOAL_TILES(1), SHOAL_TILES(2), SHOAL_TILES(3),
                                      SHOAL_TILES(4), SHOAL_TILES(5), SHOAL_TILES(6)};
#undef SHOAL_TILES
// narrow strips (1-2 blocks: q|k|v, o and down of a small model) above 8 rows: tiles of up to 12
// rows (24 accumulators, each weight load serving 12 rows). With the rows split evenly over the
// tiles (below), the 120 decoder products of a decode step (Zen 5, 2 threads, builds alternated
// in one process), ms: 32 rows 9.20 -> 8.44, 128 rows 31.9 -> 30.4, 512 rows 122.5 -> 115.8;
// 8-24 rows within 2%.
constexpr int kRowsNarrow = 12;
#define SHOAL_TILES(r) {tile<r, 1, false>, tile<r, 2, false>}
const TileFn kTilesN[kRowsNarrow][2] = {SHOAL_TILES(1), SHOAL_TILES(2), SHOAL_TILES(3), SHOAL_TILES(4),
                                        SHOAL_TILES(5), SHOAL_TILES(6), SHOAL_TILES(7), SHOAL_TILES(8),
                                        SHOAL_TILES(9), SHOAL_TILES(10), SHOAL_TILES(11), SHOAL_TILES(12)};
#undef SHOAL_TILES

}  // namespace

extern "C" {
// y (m, n) bf16 = x (m, k) @ the packed weight (int8 when q, with scale; else bf16, scale null)
// + bias, as `shoal_qlinear` / `shoal_blinear` describe (ydt 1 = bf16, 0 = fp32); n % 16 == 0,
// k % 32 == 0.
int shoal_dot_linear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const void* wp, int q,
                     const bf16_t* scale, const bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt) {
  if (m <= 0) return 0;
  const int64_t kb = k / 32, nblocks = n / 16, bstride = kb * 512;
  const int width = nblocks >= 128 ? 4 : 2;  // blocks a strip: small layers in narrow strips (balance)
  const int64_t strips = (nblocks + width - 1) / width;
  // 5+ row tiles read the strip: widen it once (Zen 5, with the tiles above, the decode-step int8
  // products, builds alternated in one process, ms: 17 rows 6.76 -> 5.84, 20 rows 7.07 -> 6.36,
  // 32 rows 11.08 -> 9.81 against widening on the fly up to 32 rows; 12-16 rows within 1%)
  const bool widen_once = q && m > 4 * kRows;
  const size_t esize = q ? 1 : 2, ysize = ydt == 0 ? 4 : 2;
#pragma omp parallel if (strips > 1)
  {
    bf16_t* buf = widen_once ? static_cast<bf16_t*>(std::aligned_alloc(64, width * bstride * sizeof(bf16_t)))
                             : nullptr;
    const Widener wd;
#pragma omp for schedule(static)
    for (int64_t s = 0; s < strips; ++s) {
      const int64_t b0 = s * width;
      const int nb = static_cast<int>(nblocks - b0 < width ? nblocks - b0 : width);
      const void* w = static_cast<const char*>(wp) + b0 * bstride * esize;
      // static schedule: this thread's next strip follows (if it is another thread's, its lines
      // are fetched for nothing); only when a strip is read by more than one tile
      const int64_t next_nb = s + 1 < strips ? (nblocks - b0 - nb < width ? nblocks - b0 - nb : width) : 0;
      Prefetch pf{static_cast<const char*>(w) + nb * bstride * esize, nullptr, 0};
      pf.end = pf.p + next_nb * bstride * esize;
      bool qt = q;
      if (widen_once) {
        for (int64_t i = 0; i < nb * kb; ++i)
          widen_block(wd, static_cast<const int8_t*>(w) + i * 512, buf + i * 512);
        w = buf, qt = false;
      }
      const bool narrow = !qt && m > 8 && nb <= 2;
      const int rows = qt || m <= 8 ? kRows : narrow ? kRowsNarrow : kRowsWide;
      const int64_t tiles = (m + rows - 1) / rows;
      pf.lines = ((pf.end - pf.p) / 64 + tiles * kb - 1) / (tiles * kb);
      Prefetch* pfp = tiles > 1 && pf.end > pf.p ? &pf : nullptr;
      const bf16_t* sc = scale ? scale + b0 * 16 : nullptr;
      const bf16_t* bi = bias ? bias + b0 * 16 : nullptr;
      // the rows split evenly over the fewest tiles of at most `rows` (32 rows, 6: 6 x 5-6 rows,
      // not 5 x 6 + 2)
      const int64_t base = m / tiles, extra = m % tiles;
      for (int64_t ti = 0, m0 = 0; ti < tiles; ++ti) {
        const int nr = static_cast<int>(base + (ti < extra ? 1 : 0));
        void* yt = static_cast<char*>(y) + (m0 * ys + b0 * 16) * ysize;
        const TileFn fn = narrow ? kTilesN[nr - 1][nb - 1] : (qt ? kTilesQ : kTilesB)[nr - 1][nb - 1];
        fn(x + m0 * xs, xs, kb, w, bstride, sc, bi, yt, ys, ydt == 0, pfp);
        m0 += nr;
      }
    }
    std::free(buf);
  }
  return 0;
}
}  // extern "C"
#endif  // SHOAL_DPBF16
