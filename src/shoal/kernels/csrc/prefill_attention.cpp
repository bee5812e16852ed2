// Prefill attention over a paged KV cache: every prompt chunk of a step in one call a layer,
// bf16 queries and cache (or int8 with scales), head size D = 64 or 128, causal (and an optional
// sliding window).
//
// Shapes: q, out (N, H, D) (row strides qs, os); kc, vc (Hkv, num_slots, D) one layer's cache;
// chunk c has q_len[c] query rows from q_start[c], and its keys at slots[off[c]:off[c + 1]] in
// position order (L = off[c + 1] - off[c] keys, the chunk's own already written), so its queries
// are positions L - q_len[c] .. L - 1. Query head j reads kv head j / (H / Hkv).
//
// Steps, for each (chunk, kv head):
//  1) pack its keys and values once, in VDPBF16PS's operand order (pairs of bf16 in 32-bit lanes):
//     keys per block of 16: kp[block][t][i] = (k[16 block + i][2t], k[..][2t + 1]), t < D / 2;
//     values per pair of keys: vp[u][c][i] = (v[2u][16c + i], v[2u + 1][16c + i]), c < D / 16;
//     both zero past L (to a multiple of 32 keys).
//  2) per tile of query positions (its rows: position x query head of the group):
//     s = (q . k) * scale for the keys the tile may see (16 keys a vector, a dot product chain over
//     the D / 2 pairs of q in order), -inf where the row may not look (a later position, outside the
//     window); per row m = max, p = exp(s - m) rounded to bf16 (0 where masked), sum = the
//     rounded p's in fp32; out = (sum over key pairs of p v, one dot-product chain in key order)
//     / sum, rounded to bf16.
//
// Batch invariance: a row's bits depend on that row alone (its query, its keys, its position),
// not on the chunk, the tile, or the other rows. Its scores are per key; its max and sum run over
// its own range [k0, k1) (32-aligned ends fixed by its position); its p.v chain visits key pairs
// in position order, and pairs outside its range (another row of the tile reaching further) add
// an exact 0 (p = 0). So chunking a prompt differently gives the same bits, as the tests check.
// The products are bf16 x bf16 -> fp32 (exact) as in PyTorch's flash kernel on CPU, which also
// rounds p to bf16 for the second product.
//
// An int8 cache (`kv_cache_dtype="int8"`: rows q with an fp32 scale each): the pack widens q to
// bf16 (exact) and keeps each key's two scales; a score is the chain times its key's scale, then
// the softmax scale; the rounded p is multiplied by its value's scale and rounded again.
//
// Bodies: AMX tiles where the packed products run on them (the same packed operands; below),
// else VDPBF16PS (AVX512-BF16), else AVX-512F FMAs on the widened pairs (the same chain as two
// fused multiply-adds: other roundings, the same invariance). No AVX-512: returns 1 and the
// caller keeps PyTorch's SDPA. Measured (`bench/prefill_attention.py`, Xeon with AMX, 2 threads,
// one layer's 512-token prompt): VDPBF16PS 2.22 ms, AMX 0.99 (PyTorch's causal SDPA 0.94-1.00,
// not batch-invariant); 2048 tokens 31.0 -> 11.1 ms; the engine's prefill 3110-3146 -> 3735-3949
// prompt tok/s (8 prompts of 512, alternated twice).

#include <type_traits>
#include <utility>
#include <vector>

#include "attention.h"
#include "prefill_attention_amx.h"

extern "C" int shoal_packed_isa(int want);  // qlinear.cpp

#if SHOAL_AVX512
namespace {
using namespace shoal;
#if SHOAL_AMX
using namespace shoal::prefill;  // the AMX body (prefill_attention_amx.h)
#endif

constexpr int kScoreRows = 12;  // rows a score tile (12 accumulators of 16 keys)

// the AMX body: compiled in, and the packed products' body is AMX (the OS granted the tiles;
// `shoal_packed_isa` caps it for tests and benchmarks)
inline bool amx_body() {
#if SHOAL_AMX
  return shoal_packed_isa(-1) >= 4;
#else
  return false;
#endif
}
// rows a p.v tile: 6 x 4 accumulators of 16 outputs at head size 64, 3 x 8 at 128
template <int D> constexpr int kValueRows = D == 64 ? 6 : 3;

inline int64_t up32(int64_t x) { return (x + 31) & ~int64_t(31); }
inline int64_t down32(int64_t x) { return x & ~int64_t(31); }

// a cache row of D values as bf16: the row itself, or an int8 row widened into buf (exact)
template <int D> inline const bf16_t* bf16_row(const bf16_t* r, bf16_t*) { return r; }
template <int D> inline const bf16_t* bf16_row(const int8_t* r, bf16_t* buf) {
  for (int c = 0; c < D / 16; ++c) {  // 16 int8 -> fp32 (exact) -> its top 16 bits
    const __m512i f = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 16 * c)))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf + 16 * c), _mm512_cvtepi32_epi16(_mm512_srli_epi32(f, 16)));
  }
  return buf;
}

// 1) pack keys [k0, k0 + 32) of one (chunk, kv head): kp, vp as in the header; keys >= len are 0.
// An int8 cache (TC int8_t): its values widened to bf16, and each key's scales into ksc, vsc
// (indexed by key; 0 past len).
template <typename TC, int D>
void pack32(const TC* kbase, const TC* vbase, const float* ks, const float* vs, const int64_t* slots,
            int64_t len, int64_t k0, uint32_t* kp, uint32_t* vp, float* ksc, float* vsc) {
  alignas(64) bf16_t buf[2][D];
  for (int64_t b = k0 / 16; b < k0 / 16 + 2; ++b) {
    uint32_t* blk = kp + b * 8 * D;  // [t][i], t < D / 2
    for (int i = 0; i < 16; ++i) {
      const int64_t key = b * 16 + i;
      if (key < len) {
        const uint32_t* kr = reinterpret_cast<const uint32_t*>(bf16_row<D>(kbase + slots[key] * D, buf[0]));
        for (int t = 0; t < D / 2; ++t) blk[t * 16 + i] = kr[t];
      } else {
        for (int t = 0; t < D / 2; ++t) blk[t * 16 + i] = 0;
      }
    }
  }
  for (int64_t u = k0 / 2; u < k0 / 2 + 16; ++u) {
    uint32_t* pr = vp + u * D;  // [c][i], c < D / 16
    const bf16_t* v0 = 2 * u < len ? bf16_row<D>(vbase + slots[2 * u] * D, buf[0]) : nullptr;
    const bf16_t* v1 = 2 * u + 1 < len ? bf16_row<D>(vbase + slots[2 * u + 1] * D, buf[1]) : nullptr;
    for (int e = 0; e < D; ++e) pr[e] = (v0 ? v0[e] : 0u) | (static_cast<uint32_t>(v1 ? v1[e] : 0u) << 16);
  }
  if (ksc)
    for (int64_t key = k0; key < k0 + 32; ++key) {
      ksc[key] = key < len ? ks[slots[key]] : 0.0f;
      vsc[key] = key < len ? vs[slots[key]] : 0.0f;
    }
}

// scores of nr <= kScoreRows rows (queries qrow[r], D / 2 pairs each) against key blocks [b0, b1):
// s[r][16 (b - b0) + i] = (q_r . k_{16 b + i}) * scale
template <int NR, int D>
void score_tile(const uint32_t* const* qrow, const uint32_t* kp, const float* ksc, int64_t b0, int64_t b1,
                float scale, float* s, int64_t ss) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t* blk = kp + b * 8 * D;
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int t = 0; t < D / 2; ++t) {
      const __m512i k = _mm512_loadu_si512(blk + t * 16);
      for (int r = 0; r < NR; ++r) acc[r] = dot2(acc[r], _mm512_set1_epi32(static_cast<int32_t>(qrow[r][t])), k);
    }
    if (ksc) {  // int8 keys: times each key's scale first
      const __m512 kv = _mm512_loadu_ps(ksc + b * 16);
      for (int r = 0; r < NR; ++r) acc[r] = _mm512_mul_ps(acc[r], kv);
    }
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(s + r * ss + (b - b0) * 16, _mm512_mul_ps(acc[r], sc));
  }
}

// p.v of nr <= kValueRows rows over key pairs [u0, u1) (p: bf16 pairs, row r at p + r * ps,
// starting at pair u0), each row's D sums times inv[r], rounded to bf16 into orow[r]
template <int NR, int D>
void value_tile(const uint32_t* p, int64_t ps, const uint32_t* vp, int64_t u0, int64_t u1,
                const float* inv, bf16_t* const* orow) {
  constexpr int C = D / 16;
  __m512 acc[NR][C];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t u = u0; u < u1; ++u) {
    const uint32_t* pr = vp + u * D;
    __m512i v[C];
    for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_si512(pr + 16 * c);
    for (int r = 0; r < NR; ++r) {
      const __m512i pp = _mm512_set1_epi32(static_cast<int32_t>(p[r * ps + (u - u0)]));
      for (int c = 0; c < C; ++c) acc[r][c] = dot2(acc[r][c], pp, v[c]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    const __m512 iv = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < C; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow[r] + 16 * c), to_bf16(_mm512_mul_ps(acc[r][c], iv)));
  }
}

template <typename F, int... N>
void by_rows(int n, F&& f, std::integer_sequence<int, N...>) {  // f(std::integral_constant<int, n>)
  ((n == N + 1 ? (f(std::integral_constant<int, N + 1>{}), 0) : 0), ...);
}

// one task: a chunk's positions [p0, p1) on kv head kh (its g query heads)
struct Tile {
  int64_t kh, p0, p1;
};

struct Scratch {  // per thread: scores (rows, keys) fp32 and p (rows, keys) bf16
  std::vector<float> s;
  std::vector<bf16_t> p;
  int tile_rows = -1;  // AMX: the rows the tiles are configured for (-1: not configured)
};

template <int D>
void attend_tile(const Tile& tl, const bf16_t* q, int64_t qs, int64_t qrow0, int64_t a, int64_t g,
                 const uint32_t* kp, const uint32_t* vp, const float* ksc, const float* vsc, int64_t window,
                 float scale, bf16_t* out, int64_t os, Scratch& sc, bool amx) {
  const int64_t np = tl.p1 - tl.p0, nr = np * g;
  // the keys any row of the tile may see: [K0, K1), 32-aligned
  const int64_t K0 = window > 0 ? down32(tl.p0 - window + 1 > 0 ? tl.p0 - window + 1 : 0) : 0;
  const int64_t K1 = up32(tl.p1);
  const int64_t nk = K1 - K0;
  if (static_cast<int64_t>(sc.s.size()) < nr * nk) sc.s.resize(nr * nk);
  if (static_cast<int64_t>(sc.p.size()) < nr * nk) sc.p.resize(nr * nk);
  float* s = sc.s.data();
  bf16_t* p = sc.p.data();
  // rows r = position i x head j (i major); their queries as D / 2 bf16 pairs
  const uint32_t* qrow[64];
  bf16_t* orow[64];
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t row = qrow0 + (tl.p0 - a) + r / g, head = tl.kh * g + r % g;
    qrow[r] = reinterpret_cast<const uint32_t*>(q + row * qs + head * D);
    orow[r] = out + row * os + head * D;
  }
  // 2a) scores
#if SHOAL_AMX
  if (amx) {
    alignas(64) bf16_t qa[16 * D];
    for (int64_t r0 = 0; r0 < nr; r0 += 16) {
      const int n = static_cast<int>(nr - r0 < 16 ? nr - r0 : 16);
      if (sc.tile_rows != n) amx_configure(n), sc.tile_rows = n;
      for (int r = 0; r < n; ++r) std::memcpy(qa + r * D, qrow[r0 + r], D * sizeof(bf16_t));
      score_tile_amx<D>(qa, n, kp, ksc, K0 / 16, K1 / 16, scale, s + r0 * nk, nk);
    }
  }
#endif
  for (int64_t r0 = 0; r0 < nr && !amx; r0 += kScoreRows) {
    const int n = static_cast<int>(nr - r0 < kScoreRows ? nr - r0 : kScoreRows);
    by_rows(n, [&](auto NR) { score_tile<decltype(NR)::value, D>(qrow + r0, kp, ksc, K0 / 16, K1 / 16, scale, s + r0 * nk, nk); },
            std::make_integer_sequence<int, kScoreRows>{});
  }
  // 2b) per row: mask, max, p = exp(s - max) rounded to bf16, sum of the rounded p's
  float inv[64];
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t pos = tl.p0 + r / g;
    const int64_t lo = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;  // keys [lo, pos]
    const int64_t k0 = down32(lo), k1 = up32(pos + 1);  // this row's own range
    float* sr = s + r * nk - K0;  // indexed by key
    bf16_t* pr = p + r * nk - K0;
    __m512 m = ninf;
    for (int64_t k = k0; k < k1; k += 16) {
      const __m512i key = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(k)), lane);
      const __mmask16 ok = _mm512_cmp_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(lo)), _MM_CMPINT_NLT) &
                           _mm512_cmp_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(pos)), _MM_CMPINT_LE);
      const __m512 v = _mm512_mask_blend_ps(ok, ninf, _mm512_loadu_ps(sr + k));
      _mm512_storeu_ps(sr + k, v);
      m = _mm512_max_ps(m, v);
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = K0; k < K1; k += 16) {
      if (k < k0 || k >= k1) {  // outside the row's range: exact zeros
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + k), _mm256_setzero_si256());
        continue;
      }
      const __m512 v = _mm512_loadu_ps(sr + k);
      const __mmask16 live = _mm512_cmp_ps_mask(v, ninf, _CMP_NEQ_OQ);
      const __m256i pb = to_bf16(_mm512_maskz_mov_ps(live, exp_neg16(_mm512_sub_ps(v, mx))));
      const __m256i w = vsc ? to_bf16(_mm512_mul_ps(widen16(pb), _mm512_loadu_ps(vsc + k))) : pb;  // int8: p x v scale
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + k), w);
      sum = _mm512_add_ps(sum, widen16(pb));
    }
    inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  // 2c) out = p.v / sum
#if SHOAL_AMX
  if (amx)
    for (int64_t r0 = 0; r0 < nr; r0 += 16) {
      const int n = static_cast<int>(nr - r0 < 16 ? nr - r0 : 16);
      if (sc.tile_rows != n) amx_configure(n), sc.tile_rows = n;
      value_tile_amx<D>(p + r0 * nk, nk, n, vp, K0 / 2, K1 / 2, inv + r0, orow + r0);
    }
#endif
  constexpr int VR = kValueRows<D>;
  for (int64_t r0 = 0; r0 < nr && !amx; r0 += VR) {
    const int n = static_cast<int>(nr - r0 < VR ? nr - r0 : VR);
    const uint32_t* pp = reinterpret_cast<const uint32_t*>(p + r0 * nk);
    by_rows(n, [&](auto NR) { value_tile<decltype(NR)::value, D>(pp, nk / 2, vp, K0 / 2, K1 / 2, inv + r0, orow + r0); },
            std::make_integer_sequence<int, VR>{});
  }
}

template <typename TC, int D>
void prefill_attention_impl(const bf16_t* q, int64_t qs, int64_t h, int64_t hkv, const TC* kc, const TC* vc,
                            const float* kscale, const float* vscale, int64_t num_slots, int64_t nc,
                            const int64_t* q_start, const int64_t* q_len, const int64_t* slots,
                            const int64_t* off, int64_t window, float scale, bf16_t* out, int64_t os) {
  const int64_t g = h / hkv;
  const bool amx = amx_body();
  const int64_t rows = amx ? 16 : kScoreRows;           // rows a tile fills
  const int64_t tp = g >= rows ? 1 : rows / g;  // positions a tile
  const bool i8 = std::is_same_v<TC, int8_t>;
  // 1) packed keys and values of every (chunk, kv head), then (int8) its keys' k and v scales:
  //    base offsets in 32-bit units
  std::vector<int64_t> base(nc * hkv + 1, 0), tiles_before(nc + 1, 0);
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t lp = up32(off[c + 1] - off[c]);
    for (int64_t kh = 0; kh < hkv; ++kh)
      base[c * hkv + kh + 1] = base[c * hkv + kh] + lp * D + (i8 ? 2 * lp : 0);  // kp + vp (+ scales)
    tiles_before[c + 1] = tiles_before[c] + hkv * ((q_len[c] + tp - 1) / tp);
  }
  static thread_local std::vector<uint32_t> pack;  // the calling thread's, grown as needed
  if (pack.size() < static_cast<size_t>(base[nc * hkv])) pack.resize(base[nc * hkv]);
  uint32_t* pk = pack.data();
  std::vector<int64_t> groups_before(nc * hkv + 1, 0);  // 32-key groups to pack
  for (int64_t ch = 0; ch < nc * hkv; ++ch) {
    const int64_t c = ch / hkv;
    groups_before[ch + 1] = groups_before[ch] + up32(off[c + 1] - off[c]) / 32;
  }
  // a (chunk, kv head)'s parts: kp, vp, and the scales (int8) or null
  auto parts = [&](int64_t ch, int64_t lp, uint32_t*& kp, uint32_t*& vp, float*& ksc, float*& vsc) {
    kp = pk + base[ch];
    vp = kp + lp * D / 2;
    ksc = i8 ? reinterpret_cast<float*>(kp + lp * D) : nullptr;
    vsc = i8 ? ksc + lp : nullptr;
  };
  const int64_t n_groups = groups_before[nc * hkv], n_tiles = tiles_before[nc];
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t w = 0; w < n_groups; ++w) {
      int64_t ch = 0;
      while (groups_before[ch + 1] <= w) ++ch;
      const int64_t c = ch / hkv, kh = ch % hkv;
      const int64_t len = off[c + 1] - off[c];
      uint32_t *kp, *vp;
      float *ksc, *vsc;
      parts(ch, up32(len), kp, vp, ksc, vsc);
      pack32<TC, D>(kc + kh * num_slots * D, vc + kh * num_slots * D, i8 ? kscale + kh * num_slots : nullptr,
                 i8 ? vscale + kh * num_slots : nullptr, slots + off[c], len, (w - groups_before[ch]) * 32,
                 kp, vp, ksc, vsc);
    }
    // (implicit barrier: every pack is done)
    Scratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < n_tiles; ++w) {
      int64_t c = 0;
      while (tiles_before[c + 1] <= w) ++c;
      const int64_t per_head = (w - tiles_before[c]) / hkv, kh = (w - tiles_before[c]) % hkv;
      const int64_t len = off[c + 1] - off[c], a = len - q_len[c];
      const int64_t p0 = a + per_head * tp, p1 = p0 + tp < len ? p0 + tp : len;
      uint32_t *kp, *vp;
      float *ksc, *vsc;
      parts(c * hkv + kh, up32(len), kp, vp, ksc, vsc);
      attend_tile<D>(Tile{kh, p0, p1}, q, qs, q_start[c], a, g, kp, vp, ksc, vsc, window, scale, out, os, sc, amx);
    }
#if SHOAL_AMX
    if (sc.tile_rows >= 0) _tile_release();
#endif
  }
}

}  // namespace
#endif  // SHOAL_AVX512

extern "C" {

// Which body serves prefill attention: 3 = AMX tiles, 2 = VDPBF16PS, 1 = AVX-512F FMAs, 0 = none
// (the caller keeps PyTorch's SDPA).
int shoal_prefill_attention_isa() {
#if SHOAL_AVX512
  if (amx_body()) return 3;
#endif
  return SHOAL_DPBF16 ? 2 : SHOAL_AVX512 ? 1 : 0;
}

// See the header. dt: 1 (bfloat16) for q and out; dtc: the cache's, 1 (bfloat16) or 2 (int8,
// with ksc, vsc: (Hkv, num_slots) fp32 scales); d: 64 or 128; at most 64 query heads a kv head.
// Returns 1 (unsupported: another dtype, head size or group, or no body) without writing.
int shoal_prefill_attention(int dt, const void* q, int64_t qs, int64_t h, int64_t hkv, int64_t d,
                            const void* kc, const void* vc, int64_t num_slots, int64_t nc,
                            const int64_t* q_start, const int64_t* q_len, const int64_t* slots,
                            const int64_t* off, int64_t window, float scale, void* out, int64_t os, int dtc,
                            const float* ksc, const float* vsc) {
#if SHOAL_AVX512
  if (dt != 1 || (d != 64 && d != 128) || hkv <= 0 || h % hkv != 0 || h / hkv > 64) return 1;
  const auto* qb = static_cast<const bf16_t*>(q);
  auto* ob = static_cast<bf16_t*>(out);
  auto run = [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    if (dtc == 1)
      prefill_attention_impl<bf16_t, D>(qb, qs, h, hkv, static_cast<const bf16_t*>(kc), static_cast<const bf16_t*>(vc),
                                        nullptr, nullptr, num_slots, nc, q_start, q_len, slots, off, window, scale,
                                        ob, os);
    else
      prefill_attention_impl<int8_t, D>(qb, qs, h, hkv, static_cast<const int8_t*>(kc),
                                        static_cast<const int8_t*>(vc), ksc, vsc, num_slots, nc, q_start, q_len,
                                        slots, off, window, scale, ob, os);
  };
  if (dtc != 1 && !(dtc == 2 && ksc && vsc)) return 1;
  by_head_size(d, run);
  return 0;
#else
  (void)dt; (void)q; (void)qs; (void)h; (void)hkv; (void)d; (void)kc; (void)vc; (void)num_slots;
  (void)nc; (void)q_start; (void)q_len; (void)slots; (void)off; (void)window; (void)scale;
  (void)out; (void)os; (void)dtc; (void)ksc; (void)vsc;
  return 1;
#endif
}

}  // extern "C"
