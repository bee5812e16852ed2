// The AMX body of `prefill_attention.cpp` (TDPBF16PS tiles), compiled where the CPU has AMX-BF16:
// its score and p.v tiles. Semantics, shapes and the packed operands: prefill_attention.cpp.
#pragma once

#include <cstring>

#include "attention.h"

#if SHOAL_AVX512 && SHOAL_AMX
namespace shoal::prefill {

// ---- AMX body (TDPBF16PS), where the CPU has AMX-BF16 and the packed products use it ----------
// The same steps on tiles of up to 16 rows: scores are each row's query (bf16) times the packed
// key blocks (kp: AMX's B order already, 16 pairs of dimensions x 16 keys a tile), 32 dimensions
// a tile step in order; p.v is each row's bf16 p times the packed value pairs (vp: 16 key pairs x
// 16 outputs a tile), 32 keys a step in key order. A tile row is computed from that row alone, so
// the invariance above holds; the sums round as the tiles round, not as the VDPBF16PS chains do,
// and every prefill row of a process runs on one body.
// Tiles: 0-3 C (rows r x 16 fp32), 4 A (rows r x 32 bf16), 6, 7 B (16 x 32 bf16 pairs).
inline void amx_configure(int r) {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = static_cast<uint8_t>(t >= 6 ? 16 : r);
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// a stored C tile (cb) -> rows [0, nr) of s (stride ss floats) at column col: (c * key scale) * scale
inline void score_out(const float* cb, int nr, const float* ksc, float scale, float* s, int64_t ss, int64_t col) {
  const __m512 sc = _mm512_set1_ps(scale);
  const __m512 kv = ksc ? _mm512_loadu_ps(ksc) : sc;
  for (int r = 0; r < nr; ++r) {
    __m512 v = _mm512_load_ps(cb + 16 * r);
    if (ksc) v = _mm512_mul_ps(v, kv);  // int8 keys: times each key's scale first
    _mm512_storeu_ps(s + r * ss + col, _mm512_mul_ps(v, sc));
  }
}

// scores of nr <= 16 rows (queries at qa, (nr, D) bf16 contiguous) against key blocks [b0, b1),
// as score_tile: s[r][16 (b - b0) + i] = (q_r . k_{16 b + i}) * scale
template <int D>
void score_tile_amx(const bf16_t* qa, int nr, const uint32_t* kp, const float* ksc, int64_t b0, int64_t b1,
                    float scale, float* s, int64_t ss) {
  alignas(64) float cb[16 * 16];
  int64_t b = b0;
  for (; b + 4 <= b1; b += 4) {  // four key blocks a pass, sharing each query load
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int j = 0; j < D / 32; ++j) {  // dimensions 32 j .. 32 j + 31: pair rows 16 j .. 16 j + 15
      const uint32_t* kb = kp + b * 8 * D + 16 * j * 16;
      _tile_loadd(4, qa + 32 * j, D * 2);
      _tile_loadd(6, kb, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, kb + 8 * D, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(6, kb + 16 * D, 64);
      _tile_dpbf16ps(2, 4, 6);
      _tile_loadd(7, kb + 24 * D, 64);
      _tile_dpbf16ps(3, 4, 7);
    }
    const int64_t col = (b - b0) * 16;
    _tile_stored(0, cb, 64);
    score_out(cb, nr, ksc ? ksc + b * 16 : nullptr, scale, s, ss, col);
    _tile_stored(1, cb, 64);
    score_out(cb, nr, ksc ? ksc + b * 16 + 16 : nullptr, scale, s, ss, col + 16);
    _tile_stored(2, cb, 64);
    score_out(cb, nr, ksc ? ksc + b * 16 + 32 : nullptr, scale, s, ss, col + 32);
    _tile_stored(3, cb, 64);
    score_out(cb, nr, ksc ? ksc + b * 16 + 48 : nullptr, scale, s, ss, col + 48);
  }
  for (; b < b1; ++b) {
    _tile_zero(0);
    for (int j = 0; j < D / 32; ++j) {
      _tile_loadd(4, qa + 32 * j, D * 2);
      _tile_loadd(6, kp + b * 8 * D + 16 * j * 16, 64);
      _tile_dpbf16ps(0, 4, 6);
    }
    _tile_stored(0, cb, 64);
    score_out(cb, nr, ksc ? ksc + b * 16 : nullptr, scale, s, ss, (b - b0) * 16);
  }
}

// a stored C tile (cb) -> rows' outputs [16 c, 16 c + 16): times inv[r], rounded to bf16
inline void value_out(const float* cb, int nr, const float* inv, bf16_t* const* orow, int c) {
  for (int r = 0; r < nr; ++r)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow[r] + 16 * c),
                        to_bf16(_mm512_mul_ps(_mm512_load_ps(cb + 16 * r), _mm512_set1_ps(inv[r]))));
}

// p.v of nr <= 16 rows (p: bf16, row r at p + r * ps elements, from key 2 u0) over key pairs
// [u0, u1) (whole groups of 16), as value_tile
template <int D>
void value_tile_amx(const bf16_t* p, int64_t ps, int nr, const uint32_t* vp, int64_t u0, int64_t u1,
                    const float* inv, bf16_t* const* orow) {
  alignas(64) float cb[16 * 16];
  for (int c0 = 0; c0 < D / 16; c0 += 4) {  // four blocks of 16 outputs a pass
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t u = u0; u < u1; u += 16) {  // 32 keys a step, in key order
      const uint32_t* vb = vp + u * D + 16 * c0;
      _tile_loadd(4, p + 2 * (u - u0), ps * 2);
      _tile_loadd(6, vb, D * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, vb + 16, D * 4);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(6, vb + 32, D * 4);
      _tile_dpbf16ps(2, 4, 6);
      _tile_loadd(7, vb + 48, D * 4);
      _tile_dpbf16ps(3, 4, 7);
    }
    _tile_stored(0, cb, 64);
    value_out(cb, nr, inv, orow, c0);
    _tile_stored(1, cb, 64);
    value_out(cb, nr, inv, orow, c0 + 1);
    _tile_stored(2, cb, 64);
    value_out(cb, nr, inv, orow, c0 + 2);
    _tile_stored(3, cb, 64);
    value_out(cb, nr, inv, orow, c0 + 3);
  }
}

}  // namespace shoal::prefill
#endif  // SHOAL_AVX512 && SHOAL_AMX
