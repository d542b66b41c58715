// Scaled dot-product attention for small heads, one CPU kernel per direction.
//
// What vit_jax.attention.attend computes, for float32 queries, keys and values packed as
// (..., N, 3, H, D) (tokens before heads and Q, K, V side by side, as the fused projection
// lays them out, so that chunking, splitting and merging the heads moves no data; separate
// W_Q, W_K, W_V cost one concatenation; every axis before N a batch axis): weights =
// softmax(Q K^T / sqrt(D)), out = weights V, and the gradients of out, from each query's
// log-sum-exp saved by the forward pass (the weights are computed again, not saved:
// FlashAttention's trade). XLA runs these as separate batched
// products (50x16 by 16x50 for the `seed` model) with a softmax between them, each through
// memory; here a head's products and softmax stay in registers and L1, four queries at a
// time, and the heads are shared out over XLA's intra-op threads.
//
// Built by vit_jax/kernels/build.py (g++ -O3 -march=native, or $VIT_JAX_KERNEL_MARCH);
// where it cannot be built the model takes the einsum path. Written for vectors of kLanes
// floats: 16 with AVX-512, 8 with AVX2 (16 registers instead of 32, so the scores are
// computed a few vectors at a time).
// A vector holds kLanes of a row's scores; a head's row (4 to 64 wide) is held in vectors of
// min(D, kLanes) floats, so that heads of 4 and 8 (16 or 8 heads over a width of 64) take
// the kernel too.
// Under a bfloat16 model (the handlers' bf16 attribute), a build with AVX-512 BF16 rounds
// the products' operands to bfloat16 and sums them in float32 with vdpbf16ps, as the
// einsum path rounds its own (but for where the scale is applied: Q / sqrt(D) is rounded,
// not Q; the weights rounded before they are normalised, not after; and denormals, which
// these instructions flush to zero): Q K^T (forward, and again in the backward) and dO V^T; for
// heads of 8 or more Q^T dS and P^T dO; for heads of 4 and of 32 or more the weights times V
// and dS K (each where it measured faster than float32); the softmax and its gradient stay
// float32. Other builds ignore the attribute.
// Results: out and dqkv in float32, or in bfloat16 where the caller declares them so (a
// bfloat16 model: the products that read them round them anyway), rounded here as XLA
// rounds (to nearest, ties to even): XLA's own conversion was a pass through memory.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#if defined(__AVX512BF16__)
constexpr bool kHasBf16 = true;  // vdpbf16ps: two bfloat16 products a lane, float32 sums
#else
constexpr bool kHasBf16 = false;
#endif

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kRegisters = 32;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
#else
#error "vit_jax's fused attention kernel is written for AVX-512 or AVX2 with FMA"
#endif

#include "xla/ffi/api/ffi.h"

namespace {

// --- Vectors of kLanes floats (GCC vector extensions) ----------------------------------

// Of the machine's own width: wider ones, split in two by the compiler, run ten times slower.
typedef float vec __attribute__((vector_size(4 * kLanes)));
typedef float vec_unaligned __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(4 * kLanes)));

inline vec load(const float* p) { return *reinterpret_cast<const vec_unaligned*>(p); }
inline void store(float* p, vec x) { *reinterpret_cast<vec_unaligned*>(p) = x; }
inline vec splat(float x) { return vec{} + x; }

// A head's row of D floats as D / Row<D>::kWidth vectors: of the machine's width, or of the
// whole row where it is narrower (an SSE or AVX2 vector).
template <int D>
struct Row {
  static constexpr int kWidth = D < kLanes ? D : kLanes;
  static constexpr int kCount = D / kWidth;
  typedef float type __attribute__((vector_size(4 * kWidth)));
  typedef float unaligned __attribute__((vector_size(4 * kWidth), aligned(4)));
  static type load(const float* p) { return *reinterpret_cast<const unaligned*>(p); }
  static void store(float* p, type x) { *reinterpret_cast<unaligned*>(p) = x; }
};

// Where a weight must be 0: the padded keys' scores, and minus a padded query row's lse in
// the backward pass. Finite, so that exp_nonpositive needs no clamp on AVX-512 (without
// AVX-512 DQ, t - floor(t) of -inf would be NaN); its exp is 0 there, and about 1.6e-38
// under AVX2's clamp, beside a row's exp(0) = 1.
constexpr float kNoWeight = -1e30f;

// exp(x) for finite x <= 0, as 2^t with t = x / ln 2.
// AVX-512: t = n + f with n = floor(t), f in [0, 1); a degree-5 polynomial for 2^f (a
// relative-minimax fit with 2^0 = 1 exactly, within 1.5e-7 in float32: about 1 ulp) and
// vscalefps, which multiplies by 2^floor(t) itself, down to 0 (or a denormal) for any t
// below -150 however large: 8 instructions, no clamp, and a NaN stays NaN. Rounding t costs exp(x)
// a relative 2^-24 |t|, under 1e-6 where the weight is over 1e-7 (x > -16), and nothing that
// shows beside the row's larger weights.
// AVX2: Cody-Waite reduction to r in [-ln2/2, ln2/2] (ln 2 in two parts, so that r keeps its
// low bits), a degree-6 polynomial for exp(r), times 2^n built in the exponent bits. About 1
// ulp.
inline vec exp_nonpositive(vec x) {
#if defined(__AVX512F__)
  const vec t = x * 1.44269504088896341f;
#if defined(__AVX512DQ__)
  const vec f = _mm512_reduce_ps(t, 0x09);  // t - floor(t) (0x09: round down, no exceptions)
#else
  const vec f = t - _mm512_roundscale_ps(t, 0x09);
#endif
  vec p = splat(1.8671301659e-3f);
  p = p * f + 9.0170297772e-3f;
  p = p * f + 5.5799912661e-2f;
  p = p * f + 2.4016444385e-1f;
  p = p * f + 6.9315129519e-1f;
  p = p * f + 1.0f;
  return _mm512_scalef_ps(p, t);  // p 2^floor(t)
#else
  // exp(-87), about 1.6e-38, for anything lower; maxps returns its second operand where
  // either is NaN, so a NaN stays NaN (as with AVX-512, and the einsum path).
  x = _mm256_max_ps(splat(-87.0f), x);
  const vec round = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vec n = (x * 1.44269504088896341f + round) - round;
  vec r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vec p = splat(1.3814612757e-3f);  // a relative-minimax fit, within 7e-8 in float32
  p = p * r + 8.3687100559e-3f;
  p = p * r + 4.1668388993e-2f;
  p = p * r + 1.6666521132e-1f;
  p = p * r + 4.9999994040e-1f;
  p = p * r * r + r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof two_to_n);
  return p * two_to_n;
#endif
}

// log(x) for x >= 1 (a softmax row's sum, to which its maximum adds exp(0)): x = m 2^e with
// m in [sqrt(1/2), sqrt(2)), Cephes' degree-9 polynomial for log(m), e ln 2 in two parts.
// About 1 ulp; a vector of rows at once, where std::log took 7 % of the kernel at heads of 4.
inline vec log_at_least_one(vec x) {
  ivec bits;
  std::memcpy(&bits, &x, sizeof bits);
  ivec e = (bits >> 23) - 127;
  bits = (bits & 0x007fffff) | 0x3f800000;  // the mantissa, in [1, 2)
  vec m;
  std::memcpy(&m, &bits, sizeof m);
  const ivec high = m >= 1.41421356f;  // -1 where true
  m = high ? m * 0.5f : m;
  e -= high;
  const vec f = m - 1.0f, f2 = f * f;
  vec p = splat(7.0376836292e-2f);
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const vec n = __builtin_convertvector(e, vec);
  return ((p * f * f2 + n * -2.12194440e-4f) - 0.5f * f2 + f) + n * 0.693359375f;
}

#if defined(__AVX512F__)
// The sum of each of sixteen vectors, in lane i for vector i: pairs, then fours, eights and
// sixteens of lanes added at each step (15 additions, where sixteen reductions take 64).
inline vec sum_each(const vec (&a)[16]) {
  vec z[8], y[4], x[2];
  for (int k = 0; k < 8; ++k)
    z[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24,
                                   10, 26, 12, 28, 14, 30) +
           __builtin_shufflevector(a[2 * k], a[2 * k + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25,
                                   11, 27, 13, 29, 15, 31);
  for (int m = 0; m < 4; ++m)
    y[m] = __builtin_shufflevector(z[2 * m], z[2 * m + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9,
                                   24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(z[2 * m], z[2 * m + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11,
                                   26, 27, 14, 15, 30, 31);
  for (int p = 0; p < 2; ++p)
    x[p] = __builtin_shufflevector(y[2 * p], y[2 * p + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9,
                                   10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(y[2 * p], y[2 * p + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13,
                                   14, 15, 28, 29, 30, 31);
  return __builtin_shufflevector(x[0], x[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                                 22, 23) +
         __builtin_shufflevector(x[0], x[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                 29, 30, 31);
}

// Sixteen rows of sixteen floats -> their transpose, in place (lane j of row i to lane i of
// row j): pairs of rows interleaved, then fours, eights and sixteens, 64 shuffles where
// element by element took 256 loads and 256 stores.
inline void transpose_16x16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 16; i += 8)
    for (int k = 0; k < 4; ++k) {
      t[i + k] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0x88);
      t[i + k + 4] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0xdd);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xdd);
  }
}

// The 16 x 16 block at src (rows src_stride floats apart; rows from `rows` on read as 0)
// transposed into dst (rows dst_stride apart; only the first `stored` written).
inline void move_transposed_16x16(const float* src, int64_t src_stride, int rows, float* dst,
                                  int64_t dst_stride, int stored) {
  __m512 block[16];
  for (int i = 0; i < 16; ++i)
    block[i] = i < rows ? _mm512_loadu_ps(src + i * src_stride) : _mm512_setzero_ps();
  transpose_16x16(block);
  for (int i = 0; i < std::min(16, stored); ++i) _mm512_storeu_ps(dst + i * dst_stride, block[i]);
}
#else
inline vec sum_each(const vec (&a)[kLanes]);  // used with AVX-512 only
#endif

// The 4 x 4 block at src (rows src_stride floats apart) transposed into dst (rows dst_stride
// apart), with SSE.
inline void move_transposed_4x4(const float* src, int64_t src_stride, float* dst,
                                int64_t dst_stride) {
  __m128 r0 = _mm_loadu_ps(src), r1 = _mm_loadu_ps(src + src_stride),
         r2 = _mm_loadu_ps(src + 2 * src_stride), r3 = _mm_loadu_ps(src + 3 * src_stride);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(dst, r0);
  _mm_storeu_ps(dst + dst_stride, r1);
  _mm_storeu_ps(dst + 2 * dst_stride, r2);
  _mm_storeu_ps(dst + 3 * dst_stride, r3);
}

// f (commutative) folded over the lanes of each of four vectors, a[r]'s in every lane of the
// result's quarter r: a block's four rows in one chain of shuffles, where each row's
// own chain, then a broadcast of its result, held the softmax's hottest instructions.
template <typename F>
inline vec fold_each_of_4(const vec (&a)[4], F f) {
#if defined(__AVX512F__)
  const vec x = f(__builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                          20, 21, 22, 23),
                  __builtin_shufflevector(a[0], a[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26,
                                          27, 28, 29, 30, 31));
  const vec y = f(__builtin_shufflevector(a[2], a[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                          20, 21, 22, 23),
                  __builtin_shufflevector(a[2], a[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26,
                                          27, 28, 29, 30, 31));
  const vec z = f(__builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24,
                                          25, 26, 27),
                  __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28,
                                          29, 30, 31));
  const vec w = f(z, __builtin_shufflevector(z, z, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14,
                                             15, 12, 13));
  return f(w, __builtin_shufflevector(w, w, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15,
                                      14));
#else
  const vec x = f(__builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 8, 9, 10, 11),
                  __builtin_shufflevector(a[0], a[1], 4, 5, 6, 7, 12, 13, 14, 15));
  const vec y = f(__builtin_shufflevector(a[2], a[3], 0, 1, 2, 3, 8, 9, 10, 11),
                  __builtin_shufflevector(a[2], a[3], 4, 5, 6, 7, 12, 13, 14, 15));
  const vec z = f(__builtin_shufflevector(x, y, 0, 1, 4, 5, 8, 9, 12, 13),
                  __builtin_shufflevector(x, y, 2, 3, 6, 7, 10, 11, 14, 15));
  return f(z, __builtin_shufflevector(z, z, 1, 0, 3, 2, 5, 4, 7, 6));
#endif
}
constexpr int kFoldStride = kLanes / 4;  // a lane of each of fold_each_of_4's quarters

inline vec max_each_of_4(const vec (&a)[4]) {
  return fold_each_of_4(a, [](vec x, vec y) { return x > y ? x : y; });
}
inline vec sum_each_of_4(const vec (&a)[4]) {
  return fold_each_of_4(a, [](vec x, vec y) { return x + y; });
}

// --- One head ---------------------------------------------------------------------------

// A product's vectors as they are (rows_times_transposed's default `then`).
constexpr auto kKeep = [](vec x, int, int) { return x; };

constexpr int kRows = 4;  // queries per block: the key (or value) loaded once serves four

// One head of n tokens and D dims, a token's D at `stride` floats from the next one's in q,
// k and v (3 H D: the heads and Q, K, V interleaved) and at `out_stride` in d_out (H D); the
// results' strides are forward's and backward's arguments. NB = ceil(n / kLanes) vectors span
// a row of scores. Holds the padded copies a head needs; one per chunk of heads, reused over them.
template <int D, int NB>
class Head {
  using R = Row<D>;
  using rvec = typename R::type;
  static constexpr int DV = R::kCount, kRowLanes = R::kWidth;

 public:
  static constexpr int W = kLanes * NB;  // a row of scores, padded to whole vectors
  static constexpr int W2 = (W + 2 * kLanes - 1) / (2 * kLanes) * 2 * kLanes;  // and to pairs
  // Score vectors per pass of rows_times_transposed: kRows accumulators for each, its
  // column and a broadcast factor must all fit in the registers.
  static constexpr int kTile = (kRegisters - 1) / (kRows + 1);

  // bf16: products from operands rounded to bfloat16, those the header lists (a no-op
  // without AVX-512 BF16).
  Head(int n, int64_t stride, int64_t out_stride, bool bf16)
      : n_(n), stride_(stride), out_stride_(out_stride),
        padded_n_((n + kRows - 1) / kRows * kRows),
        bf16_(kHasBf16 && bf16),
        inv_sqrt_d_(1.0f / std::sqrt(float(D))),
        transposed_k_(D * W), transposed_v_(D * W), dk_t_(D * W), dv_t_(D * W),
        q_(padded_n_ * D), d_out_(padded_n_ * D),
        weights_(kRows * W), scores_(kRows * W), row_max_(W, 0.0f), row_sum_(W, 1.0f),
        pad_(W, 0.0f),
        results_((n * 3 * D + kLanes - 1) / kLanes * kLanes),
        results16_(results_.size()) {
    if (bf16_) {
      q16_.resize(padded_n_ * D);
      d_out16_.resize(padded_n_ * D);
      k16_t_.resize(D * W);
      v16_t_.resize(D * W);
      if constexpr (kDotProducts) {
        k16_x_.resize(D * W2);
        v16_x_.resize(D * W2);
      }
      if constexpr (kPairedKeys) {
        k16_x_.resize((n + 1) / 2 * 2 * D);
        v16_x_.resize((n + 1) / 2 * 2 * D);
      }
    }
    std::fill(pad_.begin() + n, pad_.end(), kNoWeight);  // padded keys get no weight
  }

  // out (n, D) and each query's log-sum-exp of its scaled scores, lse (n), from q, k, v
  // (n, D), each token's row `stride` floats apart (out's `out_at` apart): the weights are
  // exp(scores - lse), which the backward pass computes again instead of reading (n, n)
  // weights saved for it (16 heads of 50 tokens: 160 KB an image and layer, which spilled
  // out of the caches).
  // Flattened (every call inside inlined), as GCC inlined all by itself until the FFI
  // handlers grew a second path: without it heads of 4 ran 1.23x slower.
  [[gnu::flatten]]
  void forward(const float* q, const float* k, const float* v, float* out, int64_t out_at,
               float* lse) {
    transpose(k, transposed_k_.data());
    if constexpr (kDotProducts) transpose(v, transposed_v_.data());
    scale_rows(q, q_.data());
    round_for_products(q_.data(), transposed_k_.data(), q16_.data(), k16_t_.data());
    round_for_weights(v, transposed_v_.data(), v16_x_.data());
    for (int i0 = 0; i0 < padded_n_; i0 += kRows) {
      float* scores = scores_.data();
      products(i0, q_.data(), q16_.data(), transposed_k_.data(), k16_t_.data(), scores);  // Q K^T
      const vec inv_sums = softmax(scores, i0);
      weights_times(scores, v, transposed_v_.data(), v16_x_.data(), out + i0 * out_at, out_at,
                    std::min(kRows, n_ - i0), inv_sums);
    }
    // row_max_ becomes the log-sum-exp in place; past padded_n_ it stays 0 (0 + log 1).
    for (int b = 0; b < NB; ++b)
      store(row_max_.data() + b * kLanes, load(row_max_.data() + b * kLanes) +
                                          log_at_least_one(load(row_sum_.data() + b * kLanes)));
    std::memcpy(lse, row_max_.data(), n_ * sizeof(float));
  }

  // dq, dk, dv (n, D), each token's row `grad_at` floats apart, from q, k, v, the forward
  // pass's lse (n) and d_out (n, D), the cotangent of out (at `stride` and `out_stride`).
  [[gnu::flatten]]  // as forward
  void backward(const float* q, const float* k, const float* v, const float* lse,
                const float* d_out, float* dq, float* dk, float* dv, int64_t grad_at) {
    transpose(k, transposed_k_.data());
    transpose(v, transposed_v_.data());
    scale_rows(q, q_.data());
    pad_rows(d_out, out_stride_, d_out_.data());
    round_for_products(q_.data(), transposed_k_.data(), q16_.data(), k16_t_.data());
    round_for_products(d_out_.data(), transposed_v_.data(), d_out16_.data(), v16_t_.data());
    round_for_weights(k, transposed_k_.data(), k16_x_.data());
    std::fill(dk_t_.begin(), dk_t_.end(), 0.0f);
    std::fill(dv_t_.begin(), dv_t_.end(), 0.0f);
    for (int i0 = 0; i0 < padded_n_; i0 += kRows) {
      float* ds = scores_.data();
      float* p = weights_.data();
      float row_lse[kRows];  // a padded query row (zero d_out) gets zero weights too
      for (int r = 0; r < kRows; ++r) row_lse[r] = i0 + r < n_ ? lse[i0 + r] : -kNoWeight;
      // The forward's weights again, exp(Q K^T - lse), as each vector of Q K^T is done.
      products(i0, q_.data(), q16_.data(), transposed_k_.data(), k16_t_.data(), p,
               [&](vec scores, int r, int b) {
                 // Rounding may leave the row's largest a hair above 0; exp_nonpositive
                 // still holds.
                 return exp_nonpositive(masked(scores, b) - row_lse[r]);
               });
      products(i0, d_out_.data(), d_out16_.data(), transposed_v_.data(), v16_t_.data(),
               ds);  // dP = dO V^T
      softmax_backward(p, ds);
      // dK^T += Q^T dS and dV^T += dO^T P, a row of keys per vector: whole vectors however
      // small the head (a padded query row has zero q and d_out, so adds nothing).
      transposed_products(i0, q_.data(), q16_.data(), ds, dk_t_.data());
      transposed_products(i0, d_out_.data(), d_out16_.data(), p, dv_t_.data());
      // dQ = dS K / sqrt(D): softmax_backward leaves the scale to here (see scale_rows).
      weights_times(ds, k, transposed_k_.data(), k16_x_.data(), dq + i0 * grad_at, grad_at,
                    std::min(kRows, n_ - i0), splat(inv_sqrt_d_));
    }
    untranspose(dk_t_.data(), dk, grad_at);
    untranspose(dv_t_.data(), dv, grad_at);
  }

  // Room for a head's results (n, 3, D), contiguous, for those that go to a bfloat16 array.
  float* results() { return results_.data(); }

  // The first n x parts x D of results() rounded to bfloat16 as XLA converts float32 (to
  // nearest, ties to even; a NaN stays a quiet NaN, its payload kept) into `to`: token j's
  // part p at j * token_at + p * part_at. For a bfloat16 model, whose products would round
  // them anyway: XLA's conversions, passes through memory of their own, took 2.4 % of the
  // step's device time. Whole vectors first, then a row's D at a time, so that heads of 4
  // round sixteen floats at once.
  void round_results_into(int parts, uint16_t* to, int64_t token_at, int64_t part_at) {
    typedef uint32_t bits_t __attribute__((vector_size(4 * kLanes)));
    typedef uint16_t half_t __attribute__((vector_size(2 * kLanes)));
    for (int i = 0; i < n_ * parts * D; i += kLanes) {
      const vec x = load(results_.data() + i);
      bits_t bits;
      std::memcpy(&bits, &x, sizeof bits);
      const bits_t nearest = (bits + 0x7fff + (bits >> 16 & 1)) >> 16;
      const half_t half = __builtin_convertvector(x != x ? (bits >> 16 | 0x40) : nearest, half_t);
      std::memcpy(results16_.data() + i, &half, sizeof half);
    }
    for (int j = 0; j < n_; ++j)
      for (int p = 0; p < parts; ++p)
        std::memcpy(to + j * token_at + p * part_at, results16_.data() + (j * parts + p) * D,
                    D * sizeof(uint16_t));
  }

 private:
  // Heads of 4 with AVX-512: a block's kRows x D products of rows and a head's (n, D) are
  // sixteen dot products over the keys, a vector of keys at a time, where the rows of 4
  // would fill a quarter of a vector each.
  static constexpr bool kDotProducts = kLanes == 16 && D * kRows == kLanes;

  // out (rows, D) = diag(scales) block (kRows, W) @ x (n, D): the first `rows` of a block's
  // products with a head's K or V (x, and transposed, its (D, W) copy), row r's scaled by
  // each lane of scales' quarter r; x's rows at stride, out's at out_stride.
  void rows_times(const float* block, const float* x, const float* transposed, float* out,
                  int64_t out_stride, int rows, vec scales) {
    if constexpr (kDotProducts) {
      vec acc[kLanes] = {};
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b)
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
          const vec a = load(block + r * W + b * kLanes);
#pragma GCC unroll 4
          for (int c = 0; c < D; ++c) acc[r * D + c] += a * load(transposed + c * W + b * kLanes);
        }
      float sums[kLanes];
      // (r, c) in lane r D + c, in quarter r (kLanes = kRows D), as row r's scale is
      store(sums, sum_each(acc) * scales);
      for (int r = 0; r < rows; ++r)
        std::memcpy(out + r * out_stride, sums + r * D, D * sizeof(float));
    } else {
      rvec o[kSplit][kRows][DV] = {};
      OverKeys([&](int j, rvec (&acc)[kRows][DV]) {
#pragma GCC unroll 4
        for (int c = 0; c < DV; ++c) {
          const rvec xj = R::load(x + j * stride_ + c * kRowLanes);
#pragma GCC unroll 4
          for (int r = 0; r < kRows; ++r) acc[r][c] += block[r * W + j] * xj;
        }
      }, o);
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < DV; ++c)
          R::store(out + r * out_stride + c * kRowLanes, o[0][r][c] * scales[r * kFoldStride]);
    }
  }

  // Partial sums per accumulator over the keys: an FMA's result is ready four cycles after
  // it starts and two can start a cycle, so a block needs eight independent sums in flight;
  // with heads of one vector (D <= kLanes) a block's kRows rows give only four.
  static constexpr int kSplit = std::max(1, 8 / (kRows * DV));

  // f(j, acc[j % kSplit]) for every key j, then acc[0] = their sum: the same result as one
  // accumulator, up to the order of the additions.
  template <typename F>
  void OverKeys(F f, rvec (&acc)[kSplit][kRows][DV]) {
    int j = 0;
    for (; j + kSplit <= n_; j += kSplit)
#pragma GCC unroll 4
      for (int s = 0; s < kSplit; ++s) f(j + s, acc[s]);
    for (; j < n_; ++j) f(j, acc[0]);
    for (int s = 1; s < kSplit; ++s)
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < DV; ++c) acc[0][r][c] += acc[s][r][c];
  }

  // With AVX-512, heads of 16 or more are moved in blocks of 16 keys by 16 dims
  // (transpose_16x16); others in blocks of 4 by 4 (SSE), all but a last partial block of
  // keys. Element by element, these moves took about 8 % of the kernel at 4 heads of 16, 6 % at 16
  // heads of 4.
#if defined(__AVX512F__)
  static constexpr bool kBlockTranspose = D % 16 == 0;
#else
  static constexpr bool kBlockTranspose = false;
#endif

  // (n, D) at stride -> transposed (D, W), zero padded: a row's products become whole vectors.
  void transpose(const float* x, float* transposed) {
#if defined(__AVX512F__)
    if constexpr (kBlockTranspose) {
      for (int j0 = 0; j0 < W; j0 += 16)  // j0 < n: W is n rounded up to 16; the rest is 0
        for (int c0 = 0; c0 < D; c0 += 16)
          move_transposed_16x16(x + j0 * stride_ + c0, stride_, n_ - j0,
                                transposed + c0 * W + j0, W, 16);
      return;
    }
#endif
    std::fill(transposed, transposed + D * W, 0.0f);
    const int whole = n_ / 4 * 4;
    for (int j = 0; j < whole; j += 4)
      for (int c = 0; c < D; c += 4)
        move_transposed_4x4(x + j * stride_ + c, stride_, transposed + c * W + j, W);
    for (int j = whole; j < n_; ++j)
      for (int c = 0; c < D; ++c) transposed[c * W + j] = x[j * stride_ + c];
  }

  // transposed (D, W) -> x (n, D), rows x_at apart: transpose's inverse, for dK and dV.
  void untranspose(const float* transposed, float* x, int64_t x_at) {
#if defined(__AVX512F__)
    if constexpr (kBlockTranspose) {
      for (int j0 = 0; j0 < n_; j0 += 16)
        for (int c0 = 0; c0 < D; c0 += 16)
          move_transposed_16x16(transposed + c0 * W + j0, W, 16, x + j0 * x_at + c0, x_at,
                                n_ - j0);
      return;
    }
#endif
    const int whole = n_ / 4 * 4;
    for (int j = 0; j < whole; j += 4)
      for (int c = 0; c < D; c += 4)
        move_transposed_4x4(transposed + c * W + j, W, x + j * x_at + c, x_at);
    for (int j = whole; j < n_; ++j)
      for (int c = 0; c < D; ++c) x[j * x_at + c] = transposed[c * W + j];
  }

  // (n, D) at stride -> (padded_n, D), zero padded.
  void pad_rows(const float* x, int64_t stride, float* padded) {
    std::fill(padded + n_ * D, padded + padded_n_ * D, 0.0f);
    for (int i = 0; i < n_; ++i) std::memcpy(padded + i * D, x + i * stride, D * sizeof(float));
  }

  // The queries, padded and scaled by 1 / sqrt(D): Q K^T is then the scaled scores, which
  // saves the softmax a multiplication per score in both passes (exact for D = 4, 16, 64).
  // dK = Q^T dS takes the scale with these queries; dQ = dS K takes it at the end.
  void scale_rows(const float* q, float* padded) {
    pad_rows(q, stride_, padded);
    for (int i = 0; i < n_ * D; ++i) padded[i] *= inv_sqrt_d_;
  }

  // Scores with kNoWeight added to the padded keys, which only a row's last vector holds.
  vec masked(vec scores, int b) const {
    return b == NB - 1 ? scores + load(pad_.data() + b * kLanes) : scores;
  }

  // A block's rows_times_transposed from query row i0 on: of the float32 rows and transposed
  // operand, or with bf16_ of their bfloat16 copies (round_for_products), the same result
  // but for the operands' rounding (the sums stay float32).
  template <typename Then = decltype(kKeep)>
  void products(int i0, const float* rows, const uint16_t* rows16, const float* transposed,
                const uint16_t* transposed16, float* out, const Then& then = kKeep) {
#if defined(__AVX512BF16__)
    if (bf16_) return bf16_rows_times_transposed(rows16 + i0 * D, transposed16, out, then);
#endif
    (void)rows16, (void)transposed16;
    rows_times_transposed(rows + i0 * D, transposed, out, then);
  }

  // With bf16_: rows (padded_n_, D) and transposed (D, W) rounded to bfloat16 (to nearest,
  // ties to even, as XLA's convert), the latter as (D / 2, W, 2).
  void round_for_products(const float* rows, const float* transposed, uint16_t* rows16,
                          uint16_t* transposed16) {
#if defined(__AVX512BF16__)
    if (!bf16_) return;
    // As one row: padded_n_ D is a multiple of 16 (padded_n_ of 4, D >= 4).
    round_rows(rows, 0, rows16, padded_n_ * D, 1, padded_n_ * D);
    // Lane 2j of the result takes key j of dim c, lane 2j + 1 key j of dim c + 1.
    const __m512i pairs = kInterleave();
    for (int c = 0; c < D; c += 2)
      for (int j = 0; j < W; j += 16) {
        const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(transposed + (c + 1) * W + j),
                                                  _mm512_loadu_ps(transposed + c * W + j));
        _mm512_storeu_si512(transposed16 + c * W + 2 * j,
                            _mm512_permutexvar_epi16(pairs, (__m512i)both));
      }
#else
    (void)rows, (void)transposed, (void)rows16, (void)transposed16;
#endif
  }

  // add_transposed_products of a block from query row i0 on, or with bf16_ the same from
  // bfloat16 operands: a's copy a16 and the block's rows rounded.
  void transposed_products(int i0, const float* a, const uint16_t* a16, const float* rows,
                           float* out_t) {
#if defined(__AVX512BF16__)
    // At D = 4 the rounding cost more than the products saved (forward and backward 0.99x
    // the float32 kernel's with it, 1.08x without).
    if (bf16_ && D >= 8) return bf16_add_transposed_products(a16 + i0 * D, rows, out_t);
#endif
    (void)a16;
    add_transposed_products(a + i0 * D, rows, out_t);
  }

  // Weights (or dS) times V (or K) from bfloat16 operands where bf16_ asks and a head's row
  // is two vectors or more (D >= 32 with AVX-512 BF16): pairs of keys, as vdpbf16ps takes
  // them. At D = 16 the float32 products measured faster (forward and backward 1.42x the
  // float32 kernel's without this, 1.24x with it; at D = 32 1.45x and 1.67x).
  static constexpr bool kPairedKeys = kHasBf16 && D >= 2 * kLanes;

  // rows_times, or with bf16_ (kPairedKeys or kDotProducts) the same from the block rounded
  // to bfloat16 and x16, x's bfloat16 copy (round_for_weights).
  void weights_times(const float* block, const float* x, const float* transposed,
                     const uint16_t* x16, float* out, int64_t out_stride, int rows,
                     vec scales) {
#if defined(__AVX512BF16__)
    if constexpr (kPairedKeys)
      if (bf16_) return bf16_weights_times(block, x16, out, out_stride, rows, scales);
    if constexpr (kDotProducts)
      if (bf16_) return bf16_dot_products(block, x16, out, out_stride, rows, scales);
#endif
    (void)x16;
    rows_times(block, x, transposed, out, out_stride, rows, scales);
  }

  // With bf16_, x16 for weights_times from x (n, D) at stride or its transposed (D, W): with
  // kPairedKeys (n / 2, D, 2), key 2i's dim c at (i, c, 0) and key 2i + 1's at (i, c, 1), an
  // odd n's last pair padded with 0; with kDotProducts the transposed (D, W2), zero padded.
  void round_for_weights(const float* x, const float* transposed, uint16_t* x16) {
#if defined(__AVX512BF16__)
    if (!bf16_) return;
    if constexpr (kDotProducts) round_rows(transposed, W, x16, W2, D, W);
    if constexpr (kPairedKeys) {
      const __m512i pairs = kInterleave();
      for (int j = 0; j < n_; j += 2)
        for (int c = 0; c < D; c += kLanes) {
          const __m512 second = j + 1 < n_ ? _mm512_loadu_ps(x + (j + 1) * stride_ + c)
                                           : _mm512_setzero_ps();
          const __m512bh both = _mm512_cvtne2ps_pbh(second, _mm512_loadu_ps(x + j * stride_ + c));
          _mm512_storeu_si512(x16 + j * D + 2 * c, _mm512_permutexvar_epi16(pairs, (__m512i)both));
        }
    }
#endif
    (void)x, (void)transposed, (void)x16;
  }

#if defined(__AVX512BF16__)
  // rows_times_transposed of bfloat16 operands: a (kRows, D) and transposed (D / 2, W, 2);
  // each vdpbf16ps adds two of a row's products to each of sixteen scores.
  template <int B0 = 0, typename Then = decltype(kKeep)>
  void bf16_rows_times_transposed(const uint16_t* a, const uint16_t* transposed, float* out,
                                  const Then& then) {
    constexpr int T = std::min(kTile, NB - B0);
    __m512 acc[kRows][T];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
      for (int b = 0; b < T; ++b) acc[r][b] = _mm512_setzero_ps();
    for (int c = 0; c < D; c += 2) {
      __m512bh column[T];
#pragma GCC unroll 8
      for (int b = 0; b < T; ++b)
        column[b] = (__m512bh)_mm512_loadu_si512(transposed + c * W + 2 * (B0 + b) * kLanes);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        uint32_t pair;
        std::memcpy(&pair, a + r * D + c, sizeof pair);
        const __m512bh both = (__m512bh)_mm512_set1_epi32(int32_t(pair));
#pragma GCC unroll 8
        for (int b = 0; b < T; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], both, column[b]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
      for (int b = 0; b < T; ++b)
        store(out + r * W + (B0 + b) * kLanes, then((vec)acc[r][b], r, B0 + b));
    if constexpr (B0 + T < NB) bf16_rows_times_transposed<B0 + T>(a, transposed, out, then);
  }

  // rows_times for kPairedKeys from bfloat16: the block's rows rounded, x16 pairs of keys;
  // each vdpbf16ps adds two keys' products to sixteen of a row's outputs.
  void bf16_weights_times(const float* block, const uint16_t* x16, float* out,
                          int64_t out_stride, int rows, vec scales) {
    constexpr int DV = D / kLanes;
    alignas(64) uint16_t rounded[kRows * W];
    round_rows(block, W, rounded, W, kRows, W);
    constexpr int kSplit2 = DV == 1 ? 2 : 1;  // eight sums in flight, as OverKeys keeps
    __m512 acc[kSplit2][kRows][DV];
    for (auto& split : acc)
      for (auto& row : split)
        for (auto& a : row) a = _mm512_setzero_ps();
    const int key_pairs = (n_ + 1) / 2;
    for (int i = 0; i < key_pairs; ++i) {
      auto& sums = acc[i % kSplit2];
#pragma GCC unroll 4
      for (int c = 0; c < DV; ++c) {
        const __m512bh xi = (__m512bh)_mm512_loadu_si512(x16 + i * 2 * D + c * 2 * kLanes);
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
          uint32_t pair;
          std::memcpy(&pair, rounded + r * W + 2 * i, sizeof pair);
          sums[r][c] = _mm512_dpbf16_ps(sums[r][c], (__m512bh)_mm512_set1_epi32(int32_t(pair)), xi);
        }
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < DV; ++c) {
        __m512 sum = acc[0][r][c];
        if constexpr (kSplit2 == 2) sum = _mm512_add_ps(sum, acc[1][r][c]);
        store(out + r * out_stride + c * kLanes, (vec)sum * scales[r * kFoldStride]);
      }
  }

  // add_transposed_products from bfloat16: a (kRows, D) and the block's rows, rounded, two
  // rows side by side; each vdpbf16ps adds two rows' products to sixteen keys of a dim.
  void bf16_add_transposed_products(const uint16_t* a, const float* rows, float* out_t) {
    static_assert(kRows == 4);
    const __m512i pairs = kInterleave();
    __m512bh rows16[2][NB];  // (rows 0 and 1, rows 2 and 3) x keys, interleaved
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b)
        rows16[h][b] = (__m512bh)_mm512_permutexvar_epi16(
            pairs, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(rows + (2 * h + 1) * W + b * kLanes),
                                                _mm512_loadu_ps(rows + 2 * h * W + b * kLanes)));
    for (int c = 0; c < D; ++c) {
      __m512bh column[2];
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h)
        column[h] = (__m512bh)_mm512_set1_epi32(int32_t(uint32_t(a[2 * h * D + c]) |
                                                        uint32_t(a[(2 * h + 1) * D + c]) << 16));
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        __m512 acc = _mm512_loadu_ps(out_t + c * W + b * kLanes);
        acc = _mm512_dpbf16_ps(acc, column[0], rows16[0][b]);
        acc = _mm512_dpbf16_ps(acc, column[1], rows16[1][b]);
        _mm512_storeu_ps(out_t + c * W + b * kLanes, acc);
      }
    }
  }

  // rows_times' sixteen dot products over the keys (kDotProducts) from bfloat16: the block's
  // rows rounded and keys16 (round_for_weights); each vdpbf16ps adds two keys to each lane.
  void bf16_dot_products(const float* block, const uint16_t* keys16, float* out,
                         int64_t out_stride, int rows, vec scales) {
    alignas(64) uint16_t rounded[kRows * W2];
    round_rows(block, W, rounded, W2, kRows, W);
    vec acc[kLanes];
    for (auto& a : acc) a = vec{};
#pragma GCC unroll 4
    for (int b = 0; b < W2; b += 2 * kLanes)
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const __m512bh a = (__m512bh)_mm512_load_si512(rounded + r * W2 + b);
#pragma GCC unroll 4
        for (int c = 0; c < D; ++c)
          acc[r * D + c] = (vec)_mm512_dpbf16_ps((__m512)acc[r * D + c], a,
                                                 (__m512bh)_mm512_loadu_si512(keys16 + c * W2 + b));
      }
    float sums[kLanes];
    store(sums, sum_each(acc) * scales);
    for (int r = 0; r < rows; ++r)
      std::memcpy(out + r * out_stride, sums + r * D, D * sizeof(float));
  }

  // rows rows of width floats (a multiple of kLanes), src_stride apart, rounded to bfloat16
  // (to nearest, ties to even) into rows dst_stride apart, each zero padded past width.
  static void round_rows(const float* src, int src_stride, uint16_t* dst, int dst_stride,
                         int rows, int width) {
    for (int r = 0; r < rows; ++r) {
#pragma GCC unroll 8
      for (int j = 0; j < width; j += kLanes)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * dst_stride + j),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + r * src_stride + j)));
      std::fill(dst + r * dst_stride + width, dst + (r + 1) * dst_stride, uint16_t(0));
    }
  }

  // The permutation that interleaves a vector's two halves of bfloat16: lane 2i takes lane i,
  // lane 2i + 1 lane 16 + i.
  static __m512i kInterleave() {
    return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                            22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  }
#endif

  // out[r] (W) = then(a[r] (D) @ transposed (D, W)) for the kRows rows of a block, from the
  // score vector B0 on, kTile vectors at a time; then(x, r, b) takes a row's vector b while
  // it is still in a register.
  template <int B0 = 0, typename Then = decltype(kKeep)>
  void rows_times_transposed(const float* a, const float* transposed, float* out,
                             const Then& then = kKeep) {
    constexpr int T = std::min(kTile, NB - B0);
    vec acc[kRows][T] = {};
    for (int c = 0; c < D; ++c) {
      vec column[T];
#pragma GCC unroll 8
      for (int b = 0; b < T; ++b) column[b] = load(transposed + c * W + (B0 + b) * kLanes);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
        for (int b = 0; b < T; ++b) acc[r][b] += a[r * D + c] * column[b];
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
      for (int b = 0; b < T; ++b)
        store(out + r * W + (B0 + b) * kLanes, then(acc[r][b], r, B0 + b));
    if constexpr (B0 + T < NB) rows_times_transposed<B0 + T>(a, transposed, out, then);
  }

  // out_t (D, W) += a^T (D, kRows) @ rows (kRows, W), for the kRows rows of a block of a
  // (kRows, D) and of rows.
  void add_transposed_products(const float* a, const float* rows, float* out_t) {
    for (int c = 0; c < D; ++c) {
      vec acc[NB];
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) acc[b] = load(out_t + c * W + b * kLanes);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
        for (int b = 0; b < NB; ++b) acc[b] += a[r * D + c] * load(rows + r * W + b * kLanes);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) store(out_t + c * W + b * kLanes, acc[b]);
    }
  }

  // A block's kRows rows of Q K^T (kRows, W), from query i0 on -> their softmax weights
  // times each row's sum, exp(score - maximum), in place; returns 1 / sum, row r's in
  // quarter r: rows_times scales the block's output rows by it (D products a row
  // where the weights take W). Each row's maximum and sum, the log-sum-exp's two parts, go
  // to row_max_ and row_sum_.
  vec softmax(float* block, int i0) {
    static_assert(kRows == 4);  // fold_each_of_4
    vec x[kRows][NB], high[kRows];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      high[r] = splat(-INFINITY);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        x[r][b] = masked(load(block + r * W + b * kLanes), b);
        high[r] = x[r][b] > high[r] ? x[r][b] : high[r];
      }
    }
    const vec max = max_each_of_4(high);
    vec sum[kRows];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      sum[r] = vec{};
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        x[r][b] = exp_nonpositive(x[r][b] - max[r * kFoldStride]);
        sum[r] += x[r][b];
      }
    }
    const vec total = sum_each_of_4(sum);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) store(block + r * W + b * kLanes, x[r][b]);
      row_max_[i0 + r] = max[r * kFoldStride];
      row_sum_[i0 + r] = total[r * kFoldStride];
    }
    return 1.0f / total;
  }

  // A block's kRows rows of weights P and of dP, their cotangent (kRows, W) -> dS, the
  // scores' (Q K^T's) cotangent, in dP's place: sqrt(D) dS = P * (dP - sum(P dP)), the
  // scale left to dQ and to the scaled queries of dK.
  void softmax_backward(const float* p, float* block) {
    vec dot[kRows];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      dot[r] = vec{};
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b)
        dot[r] += load(p + r * W + b * kLanes) * load(block + r * W + b * kLanes);
    }
    const vec total = sum_each_of_4(dot);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        const int at = r * W + b * kLanes;
        store(block + at, load(p + at) * (load(block + at) - total[r * kFoldStride]));
      }
  }

  const int n_;
  const int64_t stride_;      // between tokens' rows of q, k and v
  const int64_t out_stride_;  // and of d_out
  const int padded_n_;
  const bool bf16_;
  const float inv_sqrt_d_;
  std::vector<float> transposed_k_, transposed_v_;  // K and V, (D, W)
  std::vector<float> dk_t_, dv_t_;                  // their gradients, (D, W)
  std::vector<float> q_, d_out_;                    // padded to padded_n_ rows
  std::vector<float> weights_, scores_;             // a block's rows of weights, of scores or dS
  std::vector<float> row_max_, row_sum_;            // the forward's rows' log-sum-exp parts
  std::vector<float> pad_;                        // 0 for a real key, kNoWeight for padding
  std::vector<float> results_;                    // results() and their bfloat16 copy
  std::vector<uint16_t> results16_;
  // With bf16_: q_, d_out_ rounded to bfloat16, and K, V as (D / 2, W, 2): a key's two
  // consecutive dims side by side, the pairs vdpbf16ps multiplies.
  std::vector<uint16_t> q16_, d_out16_, k16_t_, v16_t_;
  // With bf16_: K and V for weights_times (round_for_weights).
  std::vector<uint16_t> k16_x_, v16_x_;
};

// --- Heads, threads and the FFI handlers ------------------------------------------------

constexpr int kMaxTokens = 128;

// Calls f.template operator()<D, NB>() for the NB in 1 + Bs that equals nb.
template <int D, typename F, int... Bs>
bool ByTokens(int64_t nb, F& f, std::integer_sequence<int, Bs...>) {
  return ((nb == Bs + 1 && (f.template operator()<D, Bs + 1>(), true)) || ...);
}

// Calls f.template operator()<D, NB>() for head dim d = D and n <= kLanes NB tokens; false
// for shapes the kernel does not cover (vit_jax.kernels.supports says which).
template <typename F>
bool Dispatch(int64_t d, int64_t n, F f) {
  static_assert(kMaxTokens % kLanes == 0);
  const auto blocks = std::make_integer_sequence<int, kMaxTokens / kLanes>{};
  const int64_t nb = (n + kLanes - 1) / kLanes;
  if (n < 1 || n > kMaxTokens) return false;
  switch (d) {
    case 4: return ByTokens<4>(nb, f, blocks);
    case 8: return ByTokens<8>(nb, f, blocks);
    case 16: return ByTokens<16>(nb, f, blocks);
    case 32: return ByTokens<32>(nb, f, blocks);
    case 64: return ByTokens<64>(nb, f, blocks);
    default: return false;
  }
}

namespace ffi = xla::ffi;

// Runs work(begin, end) over [0, heads) in chunks, on the calling thread and on XLA's
// intra-op threads. The caller waits only for chunks a helper has already taken, never for
// a helper still queued (the pool's threads may all be busy, e.g. running other devices'
// programs): a helper that starts after the last chunk is gone returns without calling
// `work`, whose references into the caller's frame may be gone by then.
template <typename Work>
void ForEachChunk(ffi::ThreadPool& pool, int64_t heads, const Work& work) {
  constexpr int64_t kChunk = 8;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), heads / kChunk) - 1;
  if (helpers <= 0) return work(0, heads);
  struct Progress {
    std::atomic<int64_t> next{0}, busy{0};
  };
  auto progress = std::make_shared<Progress>();
  auto take_chunks = [heads](Progress& p, const Work& w) {
    for (int64_t i; (i = p.next.fetch_add(kChunk)) < heads;) w(i, std::min(i + kChunk, heads));
  };
  for (int64_t t = 0; t < helpers; ++t)
    pool.Schedule([progress, work, take_chunks] {
      progress->busy.fetch_add(1);  // before taking a chunk: the caller then waits for it
      take_chunks(*progress, work);
      progress->busy.fetch_sub(1);
    });
  take_chunks(*progress, work);
  while (progress->busy.load() != 0) __builtin_ia32_pause();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

// qkv (..., n, 3, h, d): each token's Q, K and V side by side, as the fused projection
// `to_qkv` lays them out (so the model's chunk and split_heads move no data: XLA folds them
// away against this layout); batch x h heads of n tokens and d dims. out, d_out (..., n, h, d).
struct Shape {
  int64_t batch, n, h, d;
  int64_t heads() const { return batch * h; }
  int64_t width() const { return h * d; }
  // Head g's first float in out or d_out: its batch's (n, h, d) block, its own d within h d.
  int64_t offset(int64_t g) const { return g / h * n * h * d + g % h * d; }
  // and its Q's in qkv (or dQ's in dqkv); K's and V's follow at width() and 2 width().
  int64_t packed_offset(int64_t g) const { return g / h * n * 3 * h * d + g % h * d; }
};

ffi::Error Invalid(const std::string& why) { return ffi::Error::InvalidArgument(why); }

// The Shape of qkv (..., n, 3, h, d).
ffi::ErrorOr<Shape> PackedShape(const F32& qkv) {
  auto dims = qkv.dimensions();
  const size_t r = dims.size();
  if (r < 4 || dims[r - 3] != 3) return ffi::Unexpected(Invalid("qkv is not (..., n, 3, h, d)"));
  Shape s{1, dims[r - 4], dims[r - 2], dims[r - 1]};
  for (size_t i = 0; i + 4 < r; ++i) s.batch *= dims[i];
  return s;
}

// Whether x is (..., tail), its "..." qkv's batch axes (every axis before qkv's n).
template <typename Buffer>
bool Follows(const Buffer& x, const F32& qkv, std::initializer_list<int64_t> tail) {
  auto dims = x.dimensions(), batch = qkv.dimensions();
  const size_t b = batch.size() - 4;
  return dims.size() == b + tail.size() &&
         std::equal(batch.begin(), batch.begin() + b, dims.begin()) &&
         std::equal(tail.begin(), tail.end(), dims.begin() + b);
}

ffi::Error Unsupported(const Shape& s) {
  return Invalid("fused attention supports head dims 4, 8, 16, 32, 64 and 1 to " +
                 std::to_string(kMaxTokens) + " tokens, got head dim " + std::to_string(s.d) +
                 " and " + std::to_string(s.n) + " tokens");
}

// Runs per_head(head, g) for every head g, with a Head<D, NB> for each chunk of heads.
template <typename PerHead>
ffi::Error OverHeads(ffi::ThreadPool& pool, const Shape& s, bool bf16, PerHead per_head) {
  const bool ok = Dispatch(s.d, s.n, [&]<int D, int NB>() {
    ForEachChunk(pool, s.heads(), [&](int64_t begin, int64_t end) {
      Head<D, NB> head(s.n, 3 * s.width(), s.width(), bf16);
      for (int64_t g = begin; g < end; ++g) per_head(head, g);
    });
  });
  return ok ? ffi::Error::Success() : Unsupported(s);
}

// Whether a result is float32 (false) or bfloat16 (true); an error for any other dtype.
ffi::ErrorOr<bool> RoundsResult(const ffi::AnyBuffer& result, const char* name) {
  if (result.element_type() == ffi::BF16) return true;
  if (result.element_type() == ffi::F32) return false;
  return ffi::Unexpected(Invalid(std::string(name) + " is neither float32 nor bfloat16"));
}

ffi::Error Forward(ffi::ThreadPool pool, F32 qkv, ffi::Result<ffi::AnyBuffer> out, F32Out lse,
                   bool bf16) {
  auto shape = PackedShape(qkv);
  if (!shape.has_value()) return shape.error();
  // The results' shapes come from the caller too: a wrong one would be written past its end.
  if (!Follows(*out, qkv, {shape->n, shape->h, shape->d}))
    return Invalid("out is not (..., n, h, d) for qkv's (..., n, 3, h, d)");
  if (!Follows(*lse, qkv, {shape->h, shape->n}))
    return Invalid("lse is not (..., h, n) for qkv's (..., n, 3, h, d)");
  auto rounded = RoundsResult(*out, "out");
  if (!rounded.has_value()) return rounded.error();
  const int64_t w = shape->width(), d = shape->d;
  return OverHeads(pool, *shape, bf16, [&](auto& head, int64_t g) {
    const float* q = qkv.typed_data() + shape->packed_offset(g);
    float* head_lse = lse->typed_data() + g * shape->n;
    if (!*rounded)
      return head.forward(q, q + w, q + 2 * w, out->reinterpret_data<float>() + shape->offset(g),
                          w, head_lse);
    head.forward(q, q + w, q + 2 * w, head.results(), d, head_lse);
    head.round_results_into(1, out->reinterpret_data<uint16_t>() + shape->offset(g), w, 0);
  });
}

ffi::Error Backward(ffi::ThreadPool pool, F32 qkv, F32 lse, F32 d_out,
                    ffi::Result<ffi::AnyBuffer> dqkv, bool bf16) {
  auto shape = PackedShape(qkv);
  if (!shape.has_value()) return shape.error();
  if (!Follows(d_out, qkv, {shape->n, shape->h, shape->d}))
    return Invalid("d_out is not (..., n, h, d) for qkv's (..., n, 3, h, d)");
  if (!Follows(lse, qkv, {shape->h, shape->n}))
    return Invalid("lse is not (..., h, n) for qkv's (..., n, 3, h, d)");
  if (!Follows(*dqkv, qkv, {shape->n, 3, shape->h, shape->d}))
    return Invalid("dqkv is not shaped as qkv (..., n, 3, h, d)");
  auto rounded = RoundsResult(*dqkv, "dqkv");
  if (!rounded.has_value()) return rounded.error();
  const int64_t w = shape->width(), d = shape->d;
  return OverHeads(pool, *shape, bf16, [&](auto& head, int64_t g) {
    const int64_t at = shape->packed_offset(g);
    const float* q = qkv.typed_data() + at;
    const float* head_lse = lse.typed_data() + g * shape->n;
    const float* head_d_out = d_out.typed_data() + shape->offset(g);
    if (!*rounded) {
      float* dq = dqkv->reinterpret_data<float>() + at;
      return head.backward(q, q + w, q + 2 * w, head_lse, head_d_out, dq, dq + w, dq + 2 * w,
                           3 * w);
    }
    float* results = head.results();
    head.backward(q, q + w, q + 2 * w, head_lse, head_d_out, results, results + d,
                  results + 2 * d, 3 * d);
    head.round_results_into(3, dqkv->reinterpret_data<uint16_t>() + at, 3 * w, w);
  });
}

}  // namespace

// qkv (..., n, 3, h, d) -> (out, lse): out (..., n, h, d), float32 or bfloat16 (rounded as
// XLA converts), lse (..., h, n). The attribute bf16: the products the header lists from
// bfloat16 operands (with AVX-512 BF16; VitAttentionBf16 says whether this build has it).
XLA_FFI_DEFINE_HANDLER_SYMBOL(VitAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Ret<ffi::AnyBuffer>().Ret<F32>()
                                  .Attr<bool>("bf16"));
// (qkv, lse, d_out) -> dqkv, laid out as qkv, float32 or bfloat16 as out; bf16 as forward's
XLA_FFI_DEFINE_HANDLER_SYMBOL(VitAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("bf16"));

// Floats per vector, 16 (AVX-512) or 8 (AVX2): which build this is.
extern "C" int VitAttentionLanes() { return kLanes; }

// Whether this build multiplies bfloat16 (AVX-512 BF16): the bf16 attribute's products.
extern "C" int VitAttentionBf16() { return kHasBf16; }
