// Linear products on packed weights for the engine on x86 CPUs with AVX2 or better: bf16 weights
// (the default there, `PackedBF16Linear`) and weight-only int8 (`--quantization int8`). Four
// bodies read the same packed layout: AMX tiles (TDPBF16PS) where the CPU has AMX-BF16 and the OS
// grants the tile state, else AVX512-BF16 dot products (VDPBF16PS, qlinear_dot.cpp: AMD Zen 4/5,
// Cooper Lake), else FMA on the weights widened to fp32 in registers (qlinear_fma.cpp: AVX-512F on
// Skylake-SP, Cascade Lake, Ice Lake; AVX2 on AMD Zen 2/3 and older Intel).
//
// Weights are packed once (shoal_qpack) in the layout of AMX's B operand: a (N, K) int8 matrix
// (N % 16 == 0, K % 32 == 0) becomes blocks of 16 output rows x 32 inputs,
//   packed[nb][kb][kk][j][p] = w[16 nb + j][32 kb + 2 kk + p]     (nb < N/16, kb < K/32)
// so rows [16a, 16b) of W are one contiguous run of the packed bytes (row slices and row
// concatenations of packed matrices are packed matrices: fused projections stay views). For
// int8 each 64-byte group of a block is stored in `group_order` (the widening's interleave).
//
// y = x @ (w * scale[:, None]).T per row of x (bf16), each output an fp32 sum over K (AMX:
// TDPBF16PS in 32-wide steps; int8 values widened exactly to bf16 first), times its scale (int8
// only), plus the bias, rounded once to bf16 (or kept fp32 for fp32 models). The tiles compute
// every row from that row alone (measured: a row's bits do not depend on the row count or its
// position), so the product is batch-invariant at any size. Each weight block is widened once
// per call whatever the row count (decode: the widening is the cost; prefill: the tiles are).
// The other bodies keep the same contract, each with its own sum order.

#include <sys/syscall.h>
#include <unistd.h>

#include "widen.h"

namespace {
using namespace shoal;

#if SHOAL_AMX
inline void* out_at(void* y, int64_t off, bool f32) {  // y + off elements of y's dtype
  return static_cast<char*>(y) + off * (f32 ? 4 : 2);
}

// Tiles: 0,1 = C rows [0, r0) x two 16-column blocks; 2,3 = C rows [16, 16 + r1); 4, 5 = A for
// those rows (32 bf16 of K each); 6, 7 = B, the two column blocks (16 x (16 pairs)).
void configure(int r0, int r1) {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  const int rows[8] = {r0, r0, r1, r1, r0, r1, 16, 16};
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = static_cast<uint8_t>(rows[t] > 0 ? rows[t] : 1);
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// C tiles -> y[rows, cols]: y = c * scale + bias, rounded to bf16 unless y is fp32 (f32): no
// scale for bf16 weights, no bias when null (the bias added in fp32 before the one rounding, as
// F.linear adds it); `nb` = 1 or 2 column blocks of 16. In registers: written as scalar loops,
// GCC left the unscaled case (bf16 weights) unvectorized, and it took half the time of a 512-row
// product (3072 x 576, one thread: 22.6 ms against 11.6 with a scale of ones; measured).
inline void epilogue(const float* c, int rows, int nb, const bf16_t* scale, const bf16_t* bias,
                     void* y, int64_t ys, bool f32) {
  for (int i = 0; i < rows; ++i)
    for (int b = 0; b < nb; ++b)
      store16(_mm512_load_ps(c + i * 32 + 16 * b), scale ? scale + 16 * b : nullptr, bias ? bias + 16 * b : nullptr,
              out_at(y, i * ys + 16 * b, f32), f32);
}

constexpr int64_t kAhead = 4;  // int8 weights fetched this many K steps ahead (strip below)

// One strip: output columns [16 b0, 16 (b0 + nb)) for all m rows. W = int8_t: each weight block
// is widened into `buf` (the whole strip, kb x nb blocks, when m > 32, else one K step of it,
// reused); W = bf16_t: the tiles read the packed weights in place.
template <typename W>
void strip(const bf16_t* x, int64_t xs, int64_t m, int64_t kb, const W* wp, const bf16_t* scale, const bf16_t* bias,
           int64_t b0, int nb, void* y, int64_t ys, bool f32, bf16_t* buf, int* cfg) {
  constexpr bool widen = sizeof(W) == 1;
  const W* w = wp + b0 * kb * 512;  // block b0 + t at w + t * kb * 512
  const bool whole = widen && m > 32;
  const Widener wd;
  if (whole)
    for (int64_t c = 0; c < kb; ++c)
      for (int t = 0; t < nb; ++t)
        widen_block(wd, reinterpret_cast<const int8_t*>(w) + (t * kb + c) * 512, buf + (c * 2 + t) * 512);
  alignas(64) float cbuf[32 * 32];
  for (int64_t m0 = 0; m0 < m; m0 += 32) {
    const int r0 = static_cast<int>(m - m0 < 16 ? m - m0 : 16);
    const int r1 = static_cast<int>(m - m0 - 16 > 16 ? 16 : (m - m0 - 16 > 0 ? m - m0 - 16 : 0));
    if (cfg[0] != r0 || cfg[1] != r1) {
      configure(r0, r1);
      cfg[0] = r0, cfg[1] = r1;
    }
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    const bf16_t* xa = x + m0 * xs;
    const bf16_t* xb = x + (m0 + 16) * xs;
    for (int64_t c = 0; c < kb; ++c) {
      // int8: the blocks kAhead K steps ahead fetched on the first row chunk. The products of a
      // decode step (bench/cpu_products.py, Xeon with AMX, alternated four times), ms: 1 row
      // 7.65-7.97 -> 6.23-7.12, 8 rows 8.1-8.6 -> 7.4-8.0, 32 rows 9.5-10.2 -> 8.8-9.1 (8 steps
      // ahead no better; bf16 weights, read in place by the tiles, gained nothing from it)
      if (widen && m0 == 0 && c + kAhead < kb)
        for (int t = 0; t < nb; ++t) {
          const char* pf = reinterpret_cast<const char*>(w + (t * kb + c + kAhead) * 512);
          for (int l = 0; l < 512; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
        }
      const bf16_t* b0p;  // this K step's B blocks: b0p (block 0), b0p + bstep (block 1)
      int64_t bstep;
      if constexpr (widen) {
        bf16_t* bc = buf + (whole ? c * 2 : 0) * 512;
        if (!whole)
          for (int t = 0; t < nb; ++t)
            widen_block(wd, reinterpret_cast<const int8_t*>(w) + (t * kb + c) * 512, bc + t * 512);
        b0p = bc, bstep = 512;
      } else {
        b0p = reinterpret_cast<const bf16_t*>(w) + c * 512, bstep = kb * 512;
      }
      _tile_loadd(4, xa + c * 32, xs * 2);
      _tile_loadd(6, b0p, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (nb == 2) {
        _tile_loadd(7, b0p + bstep, 64);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (r1 > 0) {
        _tile_loadd(5, xb + c * 32, xs * 2);
        _tile_dpbf16ps(2, 5, 6);
        if (nb == 2) _tile_dpbf16ps(3, 5, 7);
      }
    }
    const bf16_t* sc = scale ? scale + b0 * 16 : nullptr;
    const bf16_t* bi = bias ? bias + b0 * 16 : nullptr;
    _tile_stored(0, cbuf, 128);
    if (nb == 2) _tile_stored(1, cbuf + 16, 128);
    epilogue(cbuf, r0, nb, sc, bi, out_at(y, m0 * ys + b0 * 16, f32), ys, f32);
    if (r1 > 0) {
      _tile_stored(2, cbuf, 128);
      if (nb == 2) _tile_stored(3, cbuf + 16, 128);
      epilogue(cbuf, r1, nb, sc, bi, out_at(y, (m0 + 16) * ys + b0 * 16, f32), ys, f32);
    }
  }
}

template <typename W>
int amx_linear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const W* wp, const bf16_t* scale, const bf16_t* bias,
               int64_t n, void* y, int64_t ys, bool f32) {
  if (m <= 0) return 0;
  const int64_t kb = k / 32, nblocks = n / 16, strips = (nblocks + 1) / 2;
  const int64_t buf_elems = sizeof(W) == 1 ? (m > 32 ? kb : 1) * 2 * 512 : 32;
#pragma omp parallel if (strips > 1)
  {
    bf16_t* buf = static_cast<bf16_t*>(std::aligned_alloc(64, buf_elems * sizeof(bf16_t)));
    int cfg[2] = {-1, -1};
#pragma omp for schedule(static)
    for (int64_t s = 0; s < strips; ++s) {
      const int nb = 2 * s + 1 < nblocks ? 2 : 1;
      strip<W>(x, xs, m, kb, wp, scale, bias, 2 * s, nb, y, ys, f32, buf, cfg);
    }
    if (cfg[0] >= 0) _tile_release();
    std::free(buf);
  }
  return 0;
}
#endif

// Where value e (0..63) of a 64-value group of the B order is stored, for int8 weights: the
// byte interleave of `widen_block` takes bytes 0-7 of each 16-byte lane to values 0-31 and
// bytes 8-15 to values 32-63.
inline int group_order(int e) { return e < 32 ? (e / 8) * 16 + e % 8 : ((e - 32) / 8) * 16 + 8 + (e - 32) % 8; }

// w (n, k) row-major -> out (n * k) in the packed layout above; n % 16 == 0, k % 32 == 0.
template <typename W>
int pack(const W* w, int64_t n, int64_t k, W* out) {
  if (n % 16 || k % 32) return 1;
  const int64_t kb = k / 32;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n / 16; ++b)
    for (int64_t c = 0; c < kb; ++c) {
      W* o = out + (b * kb + c) * 512;
      for (int kk = 0; kk < 16; ++kk)
        for (int j = 0; j < 16; ++j)
          for (int p = 0; p < 2; ++p) {
            const int v = kk * 32 + j * 2 + p;  // the value's place in the B order
            const int at = sizeof(W) == 1 ? (v / 64) * 64 + group_order(v % 64) : v;
            o[at] = w[(b * 16 + j) * k + c * 32 + kk * 2 + p];
          }
    }
  return 0;
}

}  // namespace

extern "C" {

#if SHOAL_DPBF16
int shoal_dot_linear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const void* wp, int q,
                     const bf16_t* scale, const bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt);
#endif
#if SHOAL_AVX512
int shoal_fma_linear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const void* wp, int q,
                     const bf16_t* scale, const bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt);
#endif
#if SHOAL_AVX2
int shoal_avx2_linear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const void* wp, int q,
                      const bf16_t* scale, const bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt);
#endif

// 1 when the AMX kernel is compiled in and the OS grants this process the tile state
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; asked once, idempotent), else 0.
int shoal_amx_ready() {
#if SHOAL_AMX
  static const int ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ready;
#else
  return 0;
#endif
}

namespace {
int body_cap = 4;  // the best body the products may use (shoal_packed_isa)
}

// The body the packed products run: 4 = AMX tiles, 3 = AVX512-BF16 dot products, 2 = AVX-512F
// FMA, 1 = AVX2 FMA, 0 = none (the products refuse; callers keep their PyTorch paths). want >= 0
// caps it (tests and benchmarks compare the bodies on one CPU; 4 restores the default); returns
// the body in effect.
int shoal_packed_isa(int want) {
  if (want >= 0) body_cap = want;
  const int have = shoal_amx_ready() ? 4 : SHOAL_DPBF16 ? 3 : SHOAL_AVX512 ? 2 : SHOAL_AVX2;
  return have < body_cap ? have : body_cap;
}

// w (n, k) row-major -> out (n * k) in the packed order; 1 when n % 16 or k % 32
int shoal_qpack(const int8_t* w, int64_t n, int64_t k, int8_t* out) { return pack(w, n, k, out); }
int shoal_bpack(const bf16_t* w, int64_t n, int64_t k, bf16_t* out) { return pack(w, n, k, out); }

}  // extern "C"

namespace {
// both entry points: the shape check, then the body in effect (W = int8_t: scaled int8 weights)
template <typename W>
int packed_linear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const W* wp, const bf16_t* scale,
                  const bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt) {
  if (n % 16 || k % 32) return 1;
  switch (shoal_packed_isa(-1)) {
#if SHOAL_AMX
    case 4: return amx_linear<W>(x, xs, m, k, wp, scale, bias, n, y, ys, ydt == 0);
#endif
#if SHOAL_DPBF16
    case 3: return shoal_dot_linear(x, xs, m, k, wp, sizeof(W) == 1, scale, bias, n, y, ys, ydt);
#endif
#if SHOAL_AVX512
    case 2: return shoal_fma_linear(x, xs, m, k, wp, sizeof(W) == 1, scale, bias, n, y, ys, ydt);
#endif
#if SHOAL_AVX2
    case 1: return shoal_avx2_linear(x, xs, m, k, wp, sizeof(W) == 1, scale, bias, n, y, ys, ydt);
#endif
    default: return 1;
  }
}
}  // namespace

extern "C" {

// y (m, n) (row stride ys; ydt 1 = bf16, 0 = fp32: the sum unrounded) = x (m, k) bf16 (row
// stride xs, xs >= k) @ (unpack(wp) * scale[:, None]).T + bias, scale and bias (n,) bf16 (bias
// may be null); n % 16 == 0, k % 32 == 0. Returns 1 without a body (shoal_packed_isa() == 0).
int shoal_qlinear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const int8_t* wp,
                  const bf16_t* scale, const bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt) {
  return packed_linear(x, xs, m, k, wp, scale, bias, n, y, ys, ydt);
}

// The same product on bf16 weights packed in the same order (`shoal_bpack`): y = bf16(x @ w.T +
// bias), the weights read in place.
int shoal_blinear(const bf16_t* x, int64_t xs, int64_t m, int64_t k, const bf16_t* wp,
                  const bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt) {
  return packed_linear<bf16_t>(x, xs, m, k, wp, nullptr, bias, n, y, ys, ydt);
}

}  // extern "C"
