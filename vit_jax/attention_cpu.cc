// Scaled dot-product attention for small heads, fused into one CPU kernel per direction.
//
// What vit_jax.attention.attend computes, for float32 (..., N, D) queries, keys and values
// with D a multiple of 16: weights = softmax(Q K^T / sqrt(D)) and out = weights V, and the
// backward pass from the saved weights. XLA runs these as separate batched products of
// 50x16 by 16x50 matrices and a softmax between them, each reading and writing memory; here
// one head's products and softmax stay in registers and L1, four queries at a time.
// Built and loaded by vit_jax/fused_attention.py (g++ -O3 -march=native), which falls back
// to the XLA path where this cannot be built. Needs AVX-512: 16-float vectors hold a head
// row of 16 (or 32, 64) values.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifndef __AVX512F__
#error "vit_jax's fused attention kernel is written for AVX-512"
#endif

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16v __attribute__((vector_size(64)));

static inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
static inline void store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
static inline v16 splat(float x) { return v16{} + x; }

// exp(x) on 16 lanes: Cody-Waite reduction and a degree-6 polynomial (about 1 ulp).
static inline v16 exp16(v16 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const v16 shifter = splat(12582912.0f);  // 1.5 * 2^23: rounds to an integer
  v16 n = (x * 1.44269504088896341f + shifter) - shifter;
  v16 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, 64);
  return p * scale;
}

template <typename F>
static inline float reduce16(v16 x, F f) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a = f(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7),
           __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
  v4 b = f(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
  v4 c = f(b, __builtin_shufflevector(b, b, 2, 3, 0, 1));
  v4 d = f(c, __builtin_shufflevector(c, c, 1, 0, 3, 2));
  return d[0];
}
static inline float hmax(v16 x) { return reduce16(x, [](auto a, auto b) { return a > b ? a : b; }); }
static inline float hsum(v16 x) { return reduce16(x, [](auto a, auto b) { return a + b; }); }

constexpr int R = 4;  // rows (queries) per block

template <int DV>  // head dim = 16 * DV
struct Head {
  static constexpr int D = 16 * DV;
  int n, nb, nr;  // tokens, 16-lane key blocks, rows padded to R
  float inv_sqrt_d;
  std::vector<float> kt, vt, qp, gp, pp, row;  // padded copies
  std::vector<float> pad_bias;

  Head(int n_) : n(n_), nb((n_ + 15) / 16), nr((n_ + R - 1) / R * R),
      inv_sqrt_d(1.0f / std::sqrt(float(D))),
      kt(D * nb * 16), vt(D * nb * 16), qp(nr * D), gp(nr * D), pp(nr * nb * 16), row(R * nb * 16),
      pad_bias(nb * 16, 0.0f) {
    for (int j = n; j < nb * 16; ++j) pad_bias[j] = -INFINITY;
  }
  void transpose(const float* x, float* xt) {  // (n, D) -> (D, nb*16), zero padded
    std::fill(xt, xt + D * nb * 16, 0.0f);
    for (int j = 0; j < n; ++j) for (int c = 0; c < D; ++c) xt[c * nb * 16 + j] = x[j * D + c];
  }
  void pad_rows(const float* x, float* xp, int width, int stride) {  // (n, width) -> (nr, stride)
    std::fill(xp, xp + nr * stride, 0.0f);
    for (int i = 0; i < n; ++i) std::memcpy(xp + i * stride, x + i * width, width * 4);
  }
  // rows[r][0:nb*16] = a[i0+r] @ bt, for the R rows of a block.
  template <int NB>
  void rows_times(const float* a, const float* bt, float* rows) {
    v16 acc[R][NB];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) for (int b = 0; b < NB; ++b) acc[r][b] = v16{};
    for (int c = 0; c < D; ++c) {
      v16 bc[NB];
      #pragma GCC unroll 16
      for (int b = 0; b < NB; ++b) bc[b] = load(bt + c * NB * 16 + b * 16);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const float ar = a[r * D + c];
        #pragma GCC unroll 16
        for (int b = 0; b < NB; ++b) acc[r][b] += ar * bc[b];
      }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) for (int b = 0; b < NB; ++b) store(rows + (r * NB + b) * 16, acc[r][b]);
  }

  template <int NB>
  void forward(const float* q, const float* k, const float* v, float* out, float* weights) {
    transpose(k, kt.data());
    pad_rows(q, qp.data(), D, D);
    float* rows = row.data();
    for (int i0 = 0; i0 < nr; i0 += R) {
      rows_times<NB>(qp.data() + i0 * D, kt.data(), rows);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        float* s = rows + r * NB * 16;
        v16 x[NB], m = splat(-INFINITY);
        #pragma GCC unroll 16
        for (int b = 0; b < NB; ++b) {
          x[b] = load(s + b * 16) * inv_sqrt_d + load(pad_bias.data() + b * 16);
          m = x[b] > m ? x[b] : m;
        }
        const float mx = hmax(m);
        v16 sum = v16{};
        #pragma GCC unroll 16
        for (int b = 0; b < NB; ++b) { x[b] = exp16(x[b] - mx); sum += x[b]; }
        const float inv = 1.0f / hsum(sum);
        #pragma GCC unroll 16
        for (int b = 0; b < NB; ++b) store(s + b * 16, x[b] * inv);
      }
      v16 o[R][DV];
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) for (int c = 0; c < DV; ++c) o[r][c] = v16{};
      for (int j = 0; j < n; ++j) {
        v16 vj[DV];
        #pragma GCC unroll 16
        for (int c = 0; c < DV; ++c) vj[c] = load(v + j * D + c * 16);
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const float p = rows[r * NB * 16 + j];
          #pragma GCC unroll 16
          for (int c = 0; c < DV; ++c) o[r][c] += p * vj[c];
        }
      }
            for (int r = 0; r < R && i0 + r < n; ++r) {
        #pragma GCC unroll 16
        for (int c = 0; c < DV; ++c) store(out + (i0 + r) * D + c * 16, o[r][c]);
        std::memcpy(weights + (i0 + r) * n, rows + r * NB * 16, n * 4);
      }
    }
  }

  template <int NB>
  void backward(const float* q, const float* k, const float* v, const float* weights,
                const float* d_out, const float* d_weights, float* dq, float* dk, float* dv) {
    transpose(v, vt.data());
    pad_rows(q, qp.data(), D, D);
    pad_rows(d_out, gp.data(), D, D);
    pad_rows(weights, pp.data(), n, NB * 16);
    std::fill(dk, dk + n * D, 0.0f);
    std::fill(dv, dv + n * D, 0.0f);
    float* rows = row.data();
    for (int i0 = 0; i0 < nr; i0 += R) {
      rows_times<NB>(gp.data() + i0 * D, vt.data(), rows);  // dP = dO V^T
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        float* dp = rows + r * NB * 16;
        const float* p = pp.data() + (i0 + r) * NB * 16;
        if (d_weights && i0 + r < n)
          for (int j = 0; j < n; ++j) dp[j] += d_weights[(i0 + r) * n + j];
        v16 dot = v16{};
        #pragma GCC unroll 16
        for (int b = 0; b < NB; ++b) dot += load(p + b * 16) * load(dp + b * 16);
        const float dt = hsum(dot);
        #pragma GCC unroll 16
        for (int b = 0; b < NB; ++b)  // dS = P * (dP - rowsum(P dP)) / sqrt(D)
          store(dp + b * 16, load(p + b * 16) * (load(dp + b * 16) - dt) * inv_sqrt_d);
      }
      v16 gq[R][DV], qi[R][DV], gi[R][DV];
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) for (int c = 0; c < DV; ++c) {
        gq[r][c] = v16{};
        qi[r][c] = load(qp.data() + (i0 + r) * D + c * 16);
        gi[r][c] = load(gp.data() + (i0 + r) * D + c * 16);
      }
      for (int j = 0; j < n; ++j) {
        #pragma GCC unroll 16
        for (int c = 0; c < DV; ++c) {
          const v16 kj = load(k + j * D + c * 16);
          v16 gk = load(dk + j * D + c * 16), gv = load(dv + j * D + c * 16);
          #pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
            const float ds = rows[r * NB * 16 + j];
            const float p = pp[(i0 + r) * NB * 16 + j];
            gq[r][c] += ds * kj;
            gk += ds * qi[r][c];
            gv += p * gi[r][c];
          }
          store(dk + j * D + c * 16, gk);
          store(dv + j * D + c * 16, gv);
        }
      }
            for (int r = 0; r < R && i0 + r < n; ++r)
        #pragma GCC unroll 16
        for (int c = 0; c < DV; ++c) store(dq + (i0 + r) * D + c * 16, gq[r][c]);
    }
  }
};


constexpr int kMaxBlocks = 8;  // up to 128 tokens

template <int DV, int NB>
void ForwardHeads(const float* q, const float* k, const float* v, float* out, float* w,
                  int64_t heads, int n) {
  Head<DV> h(n);
  const int64_t o = int64_t(n) * 16 * DV, ow = int64_t(n) * n;
  for (int64_t i = 0; i < heads; ++i)
    h.template forward<NB>(q + i * o, k + i * o, v + i * o, out + i * o, w + i * ow);
}

template <int DV, int NB>
void BackwardHeads(const float* q, const float* k, const float* v, const float* w,
                   const float* g, const float* gw, float* dq, float* dk, float* dv,
                   int64_t heads, int n) {
  Head<DV> h(n);
  const int64_t o = int64_t(n) * 16 * DV, ow = int64_t(n) * n;
  for (int64_t i = 0; i < heads; ++i)
    h.template backward<NB>(q + i * o, k + i * o, v + i * o, w + i * ow, g + i * o,
                            gw ? gw + i * ow : nullptr, dq + i * o, dk + i * o, dv + i * o);
}

// Calls f.template operator()<DV, NB>() for the head dim d and token count n.
template <typename F>
bool Dispatch(int64_t d, int64_t n, F f) {
  auto blocks = [&](auto dv) {
    constexpr int DV = decltype(dv)::value;
    switch ((n + 15) / 16) {
      case 1: f.template operator()<DV, 1>(); return true;
      case 2: f.template operator()<DV, 2>(); return true;
      case 3: f.template operator()<DV, 3>(); return true;
      case 4: f.template operator()<DV, 4>(); return true;
      case 5: f.template operator()<DV, 5>(); return true;
      case 6: f.template operator()<DV, 6>(); return true;
      case 7: f.template operator()<DV, 7>(); return true;
      case 8: f.template operator()<DV, 8>(); return true;
      default: return false;
    }
  };
  switch (d) {
    case 16: return blocks(std::integral_constant<int, 1>{});
    case 32: return blocks(std::integral_constant<int, 2>{});
    case 64: return blocks(std::integral_constant<int, 4>{});
    default: return false;
  }
}

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

struct Shape { int64_t heads, n, d; };

ffi::ErrorOr<Shape> HeadShape(const F32& x) {
  auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Unexpected(ffi::Error::InvalidArgument("rank < 2"));
  Shape s{1, dims[dims.size() - 2], dims[dims.size() - 1]};
  for (size_t i = 0; i + 2 < dims.size(); ++i) s.heads *= dims[i];
  return s;
}

ffi::Error Unsupported(const Shape& s) {
  return ffi::Error::InvalidArgument(
      "fused attention supports head dims 16, 32, 64 and up to 128 tokens, got head dim " +
      std::to_string(s.d) + " and " + std::to_string(s.n) + " tokens");
}

ffi::Error ForwardImpl(F32 q, F32 k, F32 v, F32Out out, F32Out weights) {
  auto shape = HeadShape(q);
  if (!shape.has_value()) return shape.error();
  const Shape s = *shape;
  const bool ok = Dispatch(s.d, s.n, [&]<int DV, int NB>() {
    ForwardHeads<DV, NB>(q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(),
                         weights->typed_data(), s.heads, s.n);
  });
  return ok ? ffi::Error::Success() : Unsupported(s);
}

ffi::Error Backward(F32& q, F32& k, F32& v, F32& weights, F32& d_out, const float* d_weights,
                    F32Out& dq, F32Out& dk, F32Out& dv) {
  auto shape = HeadShape(q);
  if (!shape.has_value()) return shape.error();
  const Shape s = *shape;
  const bool ok = Dispatch(s.d, s.n, [&]<int DV, int NB>() {
    BackwardHeads<DV, NB>(q.typed_data(), k.typed_data(), v.typed_data(), weights.typed_data(),
                          d_out.typed_data(), d_weights, dq->typed_data(), dk->typed_data(),
                          dv->typed_data(), s.heads, s.n);
  });
  return ok ? ffi::Error::Success() : Unsupported(s);
}

ffi::Error BackwardImpl(F32 q, F32 k, F32 v, F32 weights, F32 d_out, F32Out dq, F32Out dk,
                        F32Out dv) {
  return Backward(q, k, v, weights, d_out, nullptr, dq, dk, dv);
}

ffi::Error BackwardWithWeightsImpl(F32 q, F32 k, F32 v, F32 weights, F32 d_out, F32 d_weights,
                                   F32Out dq, F32Out dk, F32Out dv) {
  return Backward(q, k, v, weights, d_out, d_weights.typed_data(), dq, dk, dv);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Ret<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VitAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<F32>().Ret<F32>().Ret<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VitAttentionBackwardWithWeights, BackwardWithWeightsImpl,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>().Ret<F32>());
