// The 4-bit products (q4linear.cpp) on AMX-INT8 tiles, for batches and prefill on CPUs with AMX.
//
// The same arithmetic as the vector bodies, so the same bits: per 32-input group c, the exact
// int32 sum isum_c = sum_i q_i xq_i comes from one TDPBSUD (A: up to 16 rows x 32 int8
// activations; B: the block's codes unpacked to bytes, 8 rows of 4-input quads x 16 outputs,
// VNNI order), is stored, and folded into each row's fp32 accumulators by the vector bodies' two
// steps in their order:
//   acc = fma(float(isum_c), d_c * xd_c, acc);  acc = fma(m_c, xs_c, acc)
// A row's bits therefore do not depend on which body ran it, the row count or its position.
//
// Work: strips of 2 blocks (32 outputs) over the threads; each strip's codes are unpacked once
// per call into a per-thread buffer (kb x 2 x 512 bytes: 48 KB at K = 1536), then rows go through
// in chunks of 32 (tiles 0-3: C, 16 rows x 16 outputs each; 4, 5: A; 6, 7: B).

#include <vector>

#include "widen.h"

#if SHOAL_AMX_INT8
namespace shoal {
namespace {

constexpr int64_t kBlockBytes = 320;  // q4linear.cpp's packed block

// tiles: C 0,1 (rows r0), 2,3 (rows r1) x 16 int32; A 4 (r0), 5 (r1) x 32 bytes; B 6, 7: 8 x 64
void configure(int r0, int r1) {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  const int rows[8] = {r0, r0, r1, r1, r0, r1, 8, 8};
  const int cols[8] = {64, 64, 64, 64, 32, 32, 64, 64};
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = static_cast<uint8_t>(rows[t] > 0 ? rows[t] : 1);
    c.colsb[t] = static_cast<uint16_t>(cols[t]);
  }
  _tile_loadconfig(&c);
}

// block b's group c (256 bytes of nibbles) -> out[8][64]: row 2 g = the low nibbles of bytes
// [64 g, 64 g + 64) (inputs 8 g .. 8 g + 3 of the 16 outputs), row 2 g + 1 the high (8 g + 4 ..)
inline void unpack_group(const uint8_t* src, uint8_t* out) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
  for (int g = 0; g < 4; ++g) {
    const __m512i raw = _mm512_loadu_si512(src + g * 64);
    _mm512_store_si512(out + (2 * g) * 64, _mm512_and_si512(raw, mask));
    _mm512_store_si512(out + (2 * g + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask));
  }
}

// one strip: outputs [16 b0, 16 (b0 + nb)) of all m rows; codes: this strip's unpacked groups,
// [kb][2][512] bytes
void strip(const int8_t* xq, const float* xd, const float* xs, int64_t m, int64_t k, const uint8_t* w,
           int64_t bstride, int nb, uint8_t* codes, const bf16_t* bias, void* y, int64_t ys, bool f32, int* cfg) {
  const int64_t kb = k / 32;
  for (int64_t c = 0; c < kb; ++c)
    for (int t = 0; t < nb; ++t) unpack_group(w + t * bstride + c * kBlockBytes, codes + (c * 2 + t) * 512);
  alignas(64) float acc[32][32];
  alignas(64) int32_t isum[32][32];
  for (int64_t m0 = 0; m0 < m; m0 += 32) {
    const int r0 = static_cast<int>(m - m0 < 16 ? m - m0 : 16);
    const int r1 = static_cast<int>(m - m0 - 16 > 16 ? 16 : (m - m0 - 16 > 0 ? m - m0 - 16 : 0));
    const int rows = r0 + r1;
    if (cfg[0] != r0 || cfg[1] != r1) {
      configure(r0, r1);
      cfg[0] = r0, cfg[1] = r1;
    }
    for (int r = 0; r < rows; ++r)
      for (int v = 0; v < nb; ++v) _mm512_store_ps(&acc[r][16 * v], _mm512_setzero_ps());
    const int8_t* xa = xq + m0 * k;
    for (int64_t c = 0; c < kb; ++c) {
      // the group's int32 sums: isum[rows][16 nb]
      const uint8_t* b = codes + c * 2 * 512;
      _tile_zero(0);
      _tile_loadd(4, xa + c * 32, k);
      _tile_loadd(6, b, 64);
      _tile_dpbsud(0, 4, 6);
      if (nb == 2) {
        _tile_zero(1);
        _tile_loadd(7, b + 512, 64);
        _tile_dpbsud(1, 4, 7);
      }
      if (r1 > 0) {
        _tile_zero(2);
        _tile_loadd(5, xa + 16 * k + c * 32, k);
        _tile_dpbsud(2, 5, 6);
        if (nb == 2) {
          _tile_zero(3);
          _tile_dpbsud(3, 5, 7);
        }
      }
      _tile_stored(0, &isum[0][0], 128);
      if (nb == 2) _tile_stored(1, &isum[0][16], 128);
      if (r1 > 0) {
        _tile_stored(2, &isum[16][0], 128);
        if (nb == 2) _tile_stored(3, &isum[16][16], 128);
      }
      // the vector bodies' fp32 steps, row by row
      __m512 d[2], mn[2];
      for (int v = 0; v < nb; ++v) {
        const uint8_t* blk = w + v * bstride + c * kBlockBytes;
        d[v] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 256)));
        mn[v] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 288)));
      }
      for (int r = 0; r < rows; ++r) {
        const __m512 dx = _mm512_set1_ps(xd[(m0 + r) * kb + c]), sx = _mm512_set1_ps(xs[(m0 + r) * kb + c]);
        for (int v = 0; v < nb; ++v) {
          const __m512 s = _mm512_cvtepi32_ps(_mm512_load_si512(&isum[r][16 * v]));
          const __m512 a = _mm512_fmadd_ps(s, _mm512_mul_ps(d[v], dx), _mm512_load_ps(&acc[r][16 * v]));
          _mm512_store_ps(&acc[r][16 * v], _mm512_fmadd_ps(mn[v], sx, a));
        }
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int v = 0; v < nb; ++v)
        store16(_mm512_load_ps(&acc[r][16 * v]), nullptr, bias ? bias + 16 * v : nullptr,
                static_cast<char*>(y) + ((m0 + r) * ys + 16 * v) * (f32 ? 4 : 2), f32);
  }
}

}  // namespace

// y (m, n) = the rows' quantized activations (xq (m, k), xd and xs (m, k / 32)) . the packed
// 4-bit weight wp (+ bias), as q4linear.cpp's vector bodies compute it; 1 when the OS has not
// granted the tile state
int q4_amx(const int8_t* xq, const float* xd, const float* xs, int64_t m, int64_t k, const uint8_t* wp,
           const bf16_t* bias, int64_t n, void* y, int64_t ys, bool f32) {
  const int64_t kb = k / 32, nblocks = n / 16, bstride = kb * kBlockBytes, strips = (nblocks + 1) / 2;
#pragma omp parallel if (strips > 1)
  {
    uint8_t* codes = static_cast<uint8_t*>(std::aligned_alloc(64, kb * 2 * 512));
    int cfg[2] = {-1, -1};
#pragma omp for schedule(static)
    for (int64_t s = 0; s < strips; ++s) {
      const int nb = 2 * s + 1 < nblocks ? 2 : 1;
      strip(xq, xd, xs, m, k, wp + 2 * s * bstride, bstride, nb, codes, bias ? bias + 32 * s : nullptr,
            static_cast<char*>(y) + 32 * s * (f32 ? 4 : 2), ys, f32, cfg);
    }
    if (cfg[0] >= 0) _tile_release();
    std::free(codes);
  }
  return 0;
}

}  // namespace shoal
#endif  // SHOAL_AMX_INT8
