// All Llama blocks of a decode step in one call, for bf16 models whose products run on packed
// weights (`qlinear.cpp`: int8 or bf16 weights on any body; `q4linear.cpp`: 4-bit): the same
// kernel calls, in the same order and on the same buffers' values, as
// `shoal.engine.cpu_decode.CPUDecodeForward` makes from Python, so the bits are the same (tested);
// what goes is the Python between them (~300 calls a step; at one row that was about a third of
// the step's time outside the weight reads).

#include <chrono>

#include "common.h"

namespace {
// Opt-in timing of the kernel calls, for benchmarks (`shoal_decode_profile`): steady-clock ns per
// stage, summed over the calls made while it is on (off: one untaken branch a kernel call).
enum Stage { kNorm, kQkv, kQkvLora, kRope, kCacheWrite, kAttention, kO, kOLora, kMlpNorm, kGateUp, kGateUpLora,
             kSilu, kDown, kDownLora, kFinalNorm, kStages };
bool profile_on = false;
double profile_ns[kStages + 1];  // the stages' sums, then the calls counted

template <typename F>
inline int timed(int stage, F&& call) {
  if (!profile_on) return call();
  const auto t0 = std::chrono::steady_clock::now();
  const int r = call();
  profile_ns[stage] += std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  return r;
}
}  // namespace

extern "C" {
int shoal_rms_norm(int dt, const void* x, int64_t xs, const void* res, int64_t rs, void* res_out,
                   int64_t ros, const void* w, void* out, int64_t os, int64_t n, int64_t d, float eps);
int shoal_rope(int dt, void* x, int64_t xs, int64_t n, int64_t heads, int64_t d, const void* cs,
               const void* sn);
int shoal_cache_write(int dti, const void* k, int64_t ks, const void* v, int64_t vs, int64_t n,
                      int64_t hkv, int64_t d, const int64_t* slots, int dtc, void* kc, void* vc,
                      int64_t num_slots, float* ksc, float* vsc);
int shoal_decode_attention(int dt, const void* q, int64_t qs, const int64_t* rows, int64_t n_rows,
                           int64_t h, int64_t hkv, int64_t d, int dtc, const void* kc, const void* vc,
                           int64_t num_slots, const int64_t* slots, const int64_t* offsets,
                           int64_t window, float scale, void* out, int64_t os, const float* ksc,
                           const float* vsc);
int shoal_silu_mul(int dt, const void* y, int64_t ys, int64_t n, int64_t m, void* out);
int shoal_lora_bgmv(int dtx, int dtw, const void* x, int64_t xs, int64_t n_tok, int64_t k,
                    const int64_t* slot, int64_t sa, int64_t n_layers, const int64_t* a_ptr,
                    const int64_t* b_ptr, const int64_t* b_stride, const int64_t* scale_ptr,
                    const int64_t* rank_ptr, const int64_t* out_ptr, const int64_t* out_stride,
                    const int64_t* width, int accumulate, const int64_t* asc_ptr, const int64_t* bsc_ptr);
int shoal_qlinear(const shoal::bf16_t* x, int64_t xs, int64_t m, int64_t k, const int8_t* wp,
                  const shoal::bf16_t* scale, const shoal::bf16_t* bias, int64_t n, void* y, int64_t ys,
                  int ydt);
int shoal_blinear(const shoal::bf16_t* x, int64_t xs, int64_t m, int64_t k, const shoal::bf16_t* wp,
                  const shoal::bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt);
int shoal_q4linear(const shoal::bf16_t* x, int64_t xs, int64_t m, int64_t k, const uint8_t* wp,
                   const shoal::bf16_t* bias, int64_t n, void* y, int64_t ys, int ydt);


enum { LN1, QKV_W, QKV_S, O_W, O_S, LN2, GU_W, GU_S, DN_W, DN_S, K_CACHE, V_CACHE, QKV_B, K_SCALE, V_SCALE,
       PER_LAYER };

// n decode rows through n_layers blocks. table: PER_LAYER pointers a layer (above; QKV_B 0 or the
// q|k|v bias, bf16; K_SCALE, V_SCALE the int8 cache's scales, else 0). dims:
// hidden, heads, kv heads, head size, intermediate size, cache slots, window (0 = none), cache
// dtype (0 fp32, 1 bf16, 2 int8), weight kind (0 int8 with bf16 scales, 1 bf16 without, 2 q4), LoRA slots'
// dtype. h (n, hidden) bf16: the embeddings in, the residual stream out (in place); out (n,
// hidden) = the final norm of it. cos, sin (n, head size) bf16. slot_mapping (n,): where each
// row's key and value go; rows (n_rows,), slots, offsets: the decode attention's (see
// `kernels.decode_attention`). scratch: n * (3 hidden + qkv + heads * head size + 3 inter)
// bf16. LoRA (lora null: none): lora (n_layers, 4 products x 4) int64, per product (q|k|v, o,
// gate|up, down) [its LoRA layers L (0 = none), A slot stride, a BGMVLayers pointer table
// (8, L), column offsets (L,) of the layers in the product's output]; slot (n,) each row's
// adapter slot (-1 = base). Each product's deltas are added to its output right after it, as
// the LoRA layers do. Returns 0, or the first failing kernel's code.
int shoal_llama_decode(int64_t n, int64_t n_layers, const int64_t* table, const int64_t* dims,
                       float eps, float final_eps, float scale, shoal::bf16_t* h, const void* cos,
                       const void* sin, const int64_t* slot_mapping, const int64_t* rows,
                       int64_t n_rows, const int64_t* slots, const int64_t* offsets, const void* final_w,
                       shoal::bf16_t* out, shoal::bf16_t* scratch, const int64_t* lora,
                       const int64_t* slot) {
  using shoal::bf16_t;
  const int64_t hid = dims[0], nh = dims[1], hkv = dims[2], d = dims[3], inter = dims[4];
  const int64_t num_slots = dims[5], window = dims[6];
  const int dtc = static_cast<int>(dims[7]);
  const int64_t kind = dims[8];
  const int dtw = static_cast<int>(dims[9]);
  const int64_t nqkv = (nh + 2 * hkv) * d, na = nh * d;
  bf16_t* x = scratch;               // (n, hid) the normed input of a product
  bf16_t* y = x + n * hid;           // (n, nqkv) q | k | v
  bf16_t* att = y + n * nqkv;        // (n, na) attention output
  bf16_t* a = att + n * na;          // (n, hid) o_proj output
  bf16_t* gu = a + n * hid;          // (n, 2 inter) gate | up
  bf16_t* act = gu + n * 2 * inter;  // (n, inter) SiLU(gate) * up
  bf16_t* m = act + n * inter;       // (n, hid) the MLP output, added by the next norm
  int rc = 0;
  if (profile_on) profile_ns[kStages] += 1;
#define SHOAL_TRY(call)            \
  do {                             \
    if ((rc = (call)) != 0) return rc; \
  } while (0)
  for (int64_t li = 0; li < n_layers; ++li) {
    const int64_t* p = table + li * PER_LAYER;
    auto ptr = [&](int i) { return reinterpret_cast<void*>(p[i]); };
    auto b16 = [&](int i) { return reinterpret_cast<const bf16_t*>(p[i]); };
    // y (n, out) = x (n, k) @ the product at table entries w, w + 1 (weights, scales) + its bias
    // (q|k|v only: QKV_B, Qwen2's; 0 = none), then product g's LoRA deltas added in place
    auto product = [&](const bf16_t* xin, int64_t k, int w, int64_t nout, bf16_t* yout, int g) {
      const bf16_t* bias = g == 0 ? b16(QKV_B) : nullptr;
      static constexpr int kProduct[4] = {kQkv, kO, kGateUp, kDown}, kLora[4] = {kQkvLora, kOLora, kGateUpLora, kDownLora};
      int r = timed(kProduct[g], [&] {
        return kind == 0   ? shoal_qlinear(xin, k, n, k, reinterpret_cast<const int8_t*>(p[w]), b16(w + 1), bias,
                                           nout, yout, nout, 1)
               : kind == 1 ? shoal_blinear(xin, k, n, k, b16(w), bias, nout, yout, nout, 1)
                           : shoal_q4linear(xin, k, n, k, reinterpret_cast<const uint8_t*>(p[w]), bias, nout, yout,
                                            nout, 1);
      });
      const int64_t* lg = lora ? lora + (li * 4 + g) * 4 : nullptr;
      if (r != 0 || lg == nullptr || lg[0] == 0) return r;
      const int64_t nl = lg[0];
      const int64_t* tab = reinterpret_cast<const int64_t*>(lg[2]);  // rows a, b, bst, sc, rk, wd, asc, bsc
      const int64_t* off = reinterpret_cast<const int64_t*>(lg[3]);
      int64_t outp[8], outs[8];
      if (nl > 8) return 2;
      for (int64_t i = 0; i < nl; ++i) outp[i] = reinterpret_cast<int64_t>(yout + off[i]), outs[i] = nout;
      return timed(kLora[g], [&] {
        return shoal_lora_bgmv(1, dtw, xin, k, n, k, slot, lg[1], nl, tab, tab + nl, tab + 2 * nl, tab + 3 * nl,
                               tab + 4 * nl, outp, outs, tab + 5 * nl, 1, tab + 6 * nl, tab + 7 * nl);
      });
    };
    // 1) (h += m;) x = norm(h)
    if (li == 0) {
      SHOAL_TRY(timed(kNorm, [&] { return shoal_rms_norm(1, h, hid, nullptr, 0, nullptr, hid, ptr(LN1), x, hid, n, hid, eps); }));
    } else {
      SHOAL_TRY(timed(kNorm, [&] { return shoal_rms_norm(1, m, hid, h, hid, h, hid, ptr(LN1), x, hid, n, hid, eps); }));
    }
    // 2) q | k | v; RoPE on q and k in place; this step's k, v into the cache; attention
    SHOAL_TRY(product(x, hid, QKV_W, nqkv, y, 0));
    SHOAL_TRY(timed(kRope, [&] { return shoal_rope(1, y, nqkv, n, nh + hkv, d, cos, sin); }));
    SHOAL_TRY(timed(kCacheWrite, [&] {
      return shoal_cache_write(1, y + nh * d, nqkv, y + (nh + hkv) * d, nqkv, n, hkv, d, slot_mapping, dtc, ptr(K_CACHE),
                               ptr(V_CACHE), num_slots, static_cast<float*>(ptr(K_SCALE)), static_cast<float*>(ptr(V_SCALE)));
    }));
    SHOAL_TRY(timed(kAttention, [&] {
      return shoal_decode_attention(1, y, nqkv, rows, n_rows, nh, hkv, d, dtc, ptr(K_CACHE), ptr(V_CACHE), num_slots,
                                    slots, offsets, window, scale, att, na, static_cast<const float*>(ptr(K_SCALE)),
                                    static_cast<const float*>(ptr(V_SCALE)));
    }));
    SHOAL_TRY(product(att, na, O_W, hid, a, 1));
    // 3) h += a; x = norm(h); the MLP
    SHOAL_TRY(timed(kMlpNorm, [&] { return shoal_rms_norm(1, a, hid, h, hid, h, hid, ptr(LN2), x, hid, n, hid, eps); }));
    SHOAL_TRY(product(x, hid, GU_W, 2 * inter, gu, 2));
    SHOAL_TRY(timed(kSilu, [&] { return shoal_silu_mul(1, gu, 2 * inter, n, inter, act); }));
    SHOAL_TRY(product(act, inter, DN_W, hid, m, 3));
  }
  // the final norm of h + m
  SHOAL_TRY(timed(kFinalNorm, [&] { return shoal_rms_norm(1, m, hid, h, hid, h, hid, final_w, out, hid, n, hid, final_eps); }));
#undef SHOAL_TRY
  return 0;
}

// Timing of the calls above, for benchmarks: on = 1 clears the sums and starts, 0 stops; out (null
// or kStages + 1 doubles) receives each stage's summed ns (norm, q|k|v, its LoRA, RoPE, cache
// write, attention, o, its LoRA, MLP norm, gate|up, its LoRA, SiLU, down, its LoRA, final norm)
// and the calls counted. Returns kStages.
int shoal_decode_profile(int on, double* out) {
  if (on)
    for (double& v : profile_ns) v = 0.0;
  profile_on = on != 0;
  if (out)
    for (int i = 0; i <= kStages; ++i) out[i] = profile_ns[i];
  return kStages;
}

}  // extern "C"
