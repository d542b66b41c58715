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
// the kernel too. Heads of 4 that come kLanes or a multiple of it to a token (16 over a
// width of 64) go one head to each lane instead (LaneHeads): a vector then holds one score
// of each of kLanes heads, no key is padded to whole vectors and no maximum or sum is
// folded across lanes (1.45-1.59x the time of a row at a time, forward and backward).
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
#include <type_traits>
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

// x rounded to bfloat16 as XLA converts float32 (to nearest, ties to even; a NaN stays a
// quiet NaN, its payload kept), into kLanes bfloat16 at `to`.
inline void store_bfloat16(uint16_t* to, vec x) {
  typedef uint32_t bits_t __attribute__((vector_size(4 * kLanes)));
  typedef uint16_t half_t __attribute__((vector_size(2 * kLanes)));
  bits_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const bits_t nearest = (bits + 0x7fff + (bits >> 16 & 1)) >> 16;
  const half_t half = __builtin_convertvector(x != x ? (bits >> 16 | 0x40) : nearest, half_t);
  std::memcpy(to, &half, sizeof half);
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

#if defined(__AVX512BF16__)
// The permutation that interleaves a vector's two halves of bfloat16: lane 2i takes lane i,
// lane 2i + 1 lane 16 + i.
inline __m512i interleave_halves() {
  return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                          22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}

// first and second rounded to bfloat16 side by side, lane i of each in lane i of the result:
// the pairs vdpbf16ps multiplies.
inline __m512bh bfloat16_pairs(vec first, vec second) {
  return (__m512bh)_mm512_permutexvar_epi16(
      interleave_halves(), (__m512i)_mm512_cvtne2ps_pbh((__m512)second, (__m512)first));
}
#endif

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
    for (int i = 0; i < n_ * parts * D; i += kLanes)
      store_bfloat16(results16_.data() + i, load(results_.data() + i));
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
    const __m512i pairs = interleave_halves();
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
      const __m512i pairs = interleave_halves();
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
    const __m512i pairs = interleave_halves();
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

// --- Heads in lanes ----------------------------------------------------------------------

#if defined(__AVX512BF16__)
// x rounded to bfloat16 (to nearest, ties to even, denormals to 0) and back to float32.
inline vec rounded_to_bfloat16(vec x) {
  const __m256i half = (__m256i)_mm512_cvtneps_pbh((__m512)x);
  return (vec)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#else
inline vec rounded_to_bfloat16(vec x) { return x; }  // never reached: bf16_ is false
#endif

#if defined(__AVX512F__)
// Four vectors as a 4 x 4 block of 128-bit lanes, transposed: lane t of r[m] to lane m of
// r[t].
inline void transpose_lanes_4x4(__m512 (&r)[4]) {
  const __m512 t0 = _mm512_shuffle_f32x4(r[0], r[1], 0x44),
               t1 = _mm512_shuffle_f32x4(r[0], r[1], 0xee),
               t2 = _mm512_shuffle_f32x4(r[2], r[3], 0x44),
               t3 = _mm512_shuffle_f32x4(r[2], r[3], 0xee);
  r[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
  r[1] = _mm512_shuffle_f32x4(t0, t2, 0xdd);
  r[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
  r[3] = _mm512_shuffle_f32x4(t1, t3, 0xdd);
}

// Within each 128-bit lane, the 4 x 4 floats of four vectors transposed: float c of r[t] to
// float t of r[c].
inline void transpose_within_lanes_4x4(__m512 (&r)[4]) {
  const __m512 t0 = _mm512_unpacklo_ps(r[0], r[1]), t1 = _mm512_unpackhi_ps(r[0], r[1]),
               t2 = _mm512_unpacklo_ps(r[2], r[3]), t3 = _mm512_unpackhi_ps(r[2], r[3]);
  r[0] = _mm512_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  r[1] = _mm512_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  r[2] = _mm512_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  r[3] = _mm512_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
}
#else
inline void transpose_within_lanes_4x4(__m256 (&r)[4]) {  // as above, two lanes a vector
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]),
               t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  r[0] = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  r[1] = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  r[2] = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  r[3] = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
}
#endif

// kLanes heads of 4 dims at once, one head to a lane (16 heads of 4 over a width of 64).
// Head pads a row of scores to whole vectors (50 keys to 64) and folds each row's maximum
// and sum across the lanes, which at heads of 4 cost more than the products; here a vector
// holds one score of each of kLanes heads, so no key is padded, every maximum and sum is a
// lane's own, and each product is 4 FMAs a vector of scores. The heads' rows go into lanes
// once, as they are read, and back as the results are written. The same maths as Head; bf16
// rounds the operands the header lists for heads of 4. (Heads of 8 in lanes measured 0.71x
// Head's backward with AVX-512: their rows of Q and dO do not fit in the registers.)
class LaneHeads {
  static constexpr int D = 4;
  // Query rows per block, held in registers while the keys go by: with 32 registers, 4
  // rows of Q forward, and 2 rows each of Q and dO backward.
  static constexpr int kForwardRows = kRegisters == 32 ? 4 : 2;
  static constexpr int kBackwardRows = kRegisters == 32 ? 2 : 1;
  // Under bf16 the weights times V and dS K take two keys at a time, as vdpbf16ps does,
  // where rounding each vector of weights (or dS) on its own takes three instructions beside
  // its four FMAs: forward and backward 1.10x (1.04-1.13x in three processes).
  static constexpr bool kKeyPairs = kHasBf16;

 public:
  // n tokens of h heads a token (so h D floats between tokens' rows of out and d_out, 3 h D
  // of q, k, v); bf16: products from operands rounded to bfloat16 (the header lists which).
  LaneHeads(int n, int64_t h, bool bf16)
      : n_(n), h_(h), padded_n_((n + 3) / 4 * 4), bf16_(kHasBf16 && bf16),
        memory_(std::make_unique_for_overwrite<vec[]>(
            (4 * padded_n_ + 6 * n + n / 2 * 2) * D + padded_n_ + kForwardRows * n +
            2 * kBackwardRows * n)) {
    vec* next = memory_.get();
    auto take = [&next](int count) { return std::exchange(next, next + count); };
    q_ = take(padded_n_ * D), q16_ = take(padded_n_ * D);
    d_out_ = take(padded_n_ * D), d_out16_ = take(padded_n_ * D);
    k_ = take(n * D), k16_ = take(n * D), v_ = take(n * D), v16_ = take(n * D);
    dk_ = take(n * D), dv_ = take(n * D);
    k_pairs_ = take(n / 2 * D), v_pairs_ = take(n / 2 * D);
    lse_ = take(padded_n_), scores_ = take(kForwardRows * n);
    p_ = take(kBackwardRows * n), dp_ = take(kBackwardRows * n);
  }

  // Heads g .. g + kLanes of one image: q at its first token's Q of head g (K and V h D and
  // 2 h D floats on), out at its first token's out of head g (token rows h D apart, float32
  // or bfloat16), lse at head g's row of the image's (h, n) log-sum-exps.
  template <typename Out>
  [[gnu::flatten]] void forward(const float* q, Out* out, float* lse) {
    const int64_t at = 3 * h_ * D;
    gather(q, at, 1.0f / std::sqrt(float(D)), q_, q16_, padded_n_);
    gather(q + h_ * D, at, 1.0f, k_, k16_, n_);
    gather(q + 2 * h_ * D, at, 1.0f, v_, v16_, n_);
    if (!bf16_) return forward_blocks<false>(out, lse);
    pair_keys(v_, v_pairs_);
    forward_blocks<true>(out, lse);
  }

  // dq, dk, dv at the first token's dQ of head g (rows 3 h D apart, as q's; dK and dV h D
  // and 2 h D floats on), from q, lse as forward's and d_out, out's cotangent, laid out as out.
  template <typename Grad>
  [[gnu::flatten]] void backward(const float* q, const float* lse, const float* d_out,
                                 Grad* dq) {
    const int64_t at = 3 * h_ * D;
    gather(q, at, 1.0f / std::sqrt(float(D)), q_, q16_, padded_n_);
    gather(q + h_ * D, at, 1.0f, k_, k16_, n_);
    gather(q + 2 * h_ * D, at, 1.0f, v_, v16_, n_);
    gather(d_out, h_ * D, 1.0f, d_out_, d_out16_, padded_n_);
    for (int i = 0; i < padded_n_; ++i)  // a padded query row gets zero weights
      for (int g = 0; g < kLanes; ++g) lse_[i][g] = i < n_ ? lse[g * n_ + i] : -kNoWeight;
    std::fill(dk_, dk_ + n_ * D, vec{});
    std::fill(dv_, dv_ + n_ * D, vec{});
    if (bf16_) {
      pair_keys(k_, k_pairs_);
      backward_blocks<true>(dq);
    } else {
      backward_blocks<false>(dq);
    }
    for (int j = 0; j < n_; ++j) {
      put(dk_ + j * D, dq + h_ * D + j * at);
      put(dv_ + j * D, dq + 2 * h_ * D + j * at);
    }
  }

 private:
  template <bool Rounds, typename Out>
  void forward_blocks(Out* out, float* lse) {
    constexpr int R = kForwardRows;
    const vec* q = Rounds ? q16_ : q_;
    const vec* k = Rounds ? k16_ : k_;
    const vec* v = Rounds ? v16_ : v_;
    vec* scores = scores_;
    for (int i0 = 0; i0 < n_; i0 += R) {
      vec rows[R][D], high[R];
      for (int r = 0; r < R; ++r) {
        high[r] = splat(-INFINITY);
        for (int c = 0; c < D; ++c) rows[r][c] = q[(i0 + r) * D + c];
      }
      for (int j = 0; j < n_; ++j)  // Q K^T, each row's maximum
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const vec s = dot(rows[r], k + j * D);
          scores[r * n_ + j] = s;
          high[r] = s > high[r] ? s : high[r];
        }
      // exp(scores - maximum), their sum, times V
      vec sum[R] = {}, acc[R][D] = {};
      int j = 0;
#if defined(__AVX512BF16__)
      if constexpr (Rounds && kKeyPairs)
        for (; j + 1 < n_; j += 2)
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const vec p0 = exp_nonpositive(scores[r * n_ + j] - high[r]);
            const vec p1 = exp_nonpositive(scores[r * n_ + j + 1] - high[r]);
            sum[r] += p0;
            sum[r] += p1;
            const __m512bh pair = bfloat16_pairs(p0, p1);
#pragma GCC unroll 8
            for (int c = 0; c < D; ++c)
              acc[r][c] = (vec)_mm512_dpbf16_ps((__m512)acc[r][c], pair,
                                                (__m512bh)v_pairs_[j / 2 * D + c]);
          }
#endif
      for (; j < n_; ++j)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          vec p = exp_nonpositive(scores[r * n_ + j] - high[r]);
          sum[r] += p;
          if constexpr (Rounds) p = rounded_to_bfloat16(p);
#pragma GCC unroll 8
          for (int c = 0; c < D; ++c) acc[r][c] += p * v[j * D + c];
        }
      for (int r = 0; r < std::min(R, n_ - i0); ++r) {
        const vec inv_sum = 1.0f / sum[r];
        vec o[D];
        for (int c = 0; c < D; ++c) o[c] = acc[r][c] * inv_sum;
        put(o, out + (i0 + r) * h_ * D);
        const vec row_lse = high[r] + log_at_least_one(sum[r]);
        for (int g = 0; g < kLanes; ++g) lse[g * n_ + i0 + r] = row_lse[g];
      }
    }
  }

  template <bool Rounds, typename Grad>
  void backward_blocks(Grad* dq) {
    constexpr int R = kBackwardRows;
    const vec* scores_q = Rounds ? q16_ : q_;        // Q K^T
    const vec* scores_k = Rounds ? k16_ : k_;
    const vec* dp_d_out = Rounds ? d_out16_ : d_out_;  // dP = dO V^T
    const vec* dp_v = Rounds ? v16_ : v_;
    const vec* dq_k = Rounds ? k16_ : k_;  // dQ = dS K; dK = dS^T Q and dV = P^T dO stay float32
    const int64_t at = 3 * h_ * D;
    for (int i0 = 0; i0 < n_; i0 += R) {
      vec rows[R][D], d_rows[R][D], row_lse[R], dot_p_dp[R] = {};
      for (int r = 0; r < R; ++r) {
        row_lse[r] = lse_[i0 + r];
        for (int c = 0; c < D; ++c) {
          rows[r][c] = scores_q[(i0 + r) * D + c];
          d_rows[r][c] = dp_d_out[(i0 + r) * D + c];
        }
      }
      for (int j = 0; j < n_; ++j)  // the weights again, dP, and sum(P dP) of each row
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const vec pj = exp_nonpositive(dot(rows[r], scores_k + j * D) - row_lse[r]);
          const vec dpj = dot(d_rows[r], dp_v + j * D);
          p_[r * n_ + j] = pj;
          dp_[r * n_ + j] = dpj;
          dot_p_dp[r] += pj * dpj;
        }
      // Key j's dS = P (dP - sum(P dP)) of each row, into ds; key j's dK and dV from them.
      auto key = [&](int j, vec (&ds)[R]) {
        vec dk_j[D], dv_j[D];
        for (int c = 0; c < D; ++c) dk_j[c] = dk_[j * D + c], dv_j[c] = dv_[j * D + c];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const vec pj = p_[r * n_ + j];
          ds[r] = pj * (dp_[r * n_ + j] - dot_p_dp[r]);
#pragma GCC unroll 8
          for (int c = 0; c < D; ++c) {
            dk_j[c] += ds[r] * q_[(i0 + r) * D + c];
            dv_j[c] += pj * d_out_[(i0 + r) * D + c];
          }
        }
        for (int c = 0; c < D; ++c) dk_[j * D + c] = dk_j[c], dv_[j * D + c] = dv_j[c];
      };
      vec dq_acc[R][D] = {};
      int j = 0;
#if defined(__AVX512BF16__)
      if constexpr (Rounds && kKeyPairs)
        for (; j + 1 < n_; j += 2) {
          vec ds0[R], ds1[R];
          key(j, ds0);
          key(j + 1, ds1);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m512bh pair = bfloat16_pairs(ds0[r], ds1[r]);
#pragma GCC unroll 8
            for (int c = 0; c < D; ++c)
              dq_acc[r][c] = (vec)_mm512_dpbf16_ps((__m512)dq_acc[r][c], pair,
                                                   (__m512bh)k_pairs_[j / 2 * D + c]);
          }
        }
#endif
      for (; j < n_; ++j) {
        vec ds[R];
        key(j, ds);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const vec ds_k = Rounds ? rounded_to_bfloat16(ds[r]) : ds[r];
#pragma GCC unroll 8
          for (int c = 0; c < D; ++c) dq_acc[r][c] += ds_k * dq_k[j * D + c];
        }
      }
      const vec scale = splat(1.0f / std::sqrt(float(D)));
      for (int r = 0; r < std::min(R, n_ - i0); ++r) {
        vec g[D];
        for (int c = 0; c < D; ++c) g[c] = dq_acc[r][c] * scale;
        put(g, dq + (i0 + r) * at);
      }
    }
  }

  static vec dot(const vec (&row)[D], const vec* x) {
    vec s = row[0] * x[0];
#pragma GCC unroll 8
    for (int c = 1; c < D; ++c) s += row[c] * x[c];
    return s;
  }

  // Every token's rows of the kLanes heads at src (D floats each, side by side; tokens `at`
  // floats apart) times scale, into lanes: dim c of token i in dst[i D + c], lane g head g's;
  // with bf16_ also rounded to bfloat16, into dst16. Rows from n to `rows` are zero.
  void gather(const float* src, int64_t at, float scale, vec* dst, vec* dst16, int rows) {
    for (int i = 0; i < n_; ++i) {
      vec x[D];
      to_lanes(src + i * at, x);
      for (int c = 0; c < D; ++c) {
        dst[i * D + c] = x[c] * scale;
        if (bf16_) dst16[i * D + c] = rounded_to_bfloat16(x[c] * scale);
      }
    }
    std::fill(dst + n_ * D, dst + rows * D, vec{});
    std::fill(dst16 + n_ * D, dst16 + rows * D, vec{});
  }

  // With kKeyPairs, x (n, D, in lanes) as bfloat16 pairs of keys: keys 2i and 2i + 1's dim c
  // in pairs[i D + c], as bfloat16_pairs makes them (an odd n's last key left out).
  void pair_keys(const vec* x, vec* pairs) {
#if defined(__AVX512BF16__)
    if constexpr (kKeyPairs)
      for (int i = 0; i < n_ / 2; ++i)
        for (int c = 0; c < D; ++c)
          pairs[i * D + c] =
              (vec)(__m512)bfloat16_pairs(x[2 * i * D + c], x[(2 * i + 1) * D + c]);
#endif
    (void)x, (void)pairs;
  }

  // A token's rows of the kLanes heads (D floats each, side by side) -> D vectors, head g's
  // dim c in lane g of x[c].
  static void to_lanes(const float* rows, vec (&x)[D]) {
#if defined(__AVX512F__)
    __m512 r[4];  // four heads' rows in each, one per 128-bit lane
    for (int m = 0; m < 4; ++m) r[m] = _mm512_loadu_ps(rows + 16 * m);
    transpose_lanes_4x4(r);
    transpose_within_lanes_4x4(r);
    for (int c = 0; c < D; ++c) x[c] = (vec)r[c];
#else
    __m256 r[4];  // two heads' rows in each
    for (int m = 0; m < 4; ++m) r[m] = _mm256_loadu_ps(rows + 8 * m);
    transpose_within_lanes_4x4(r);  // heads 0, 2, 4, 6, 1, 3, 5, 7 in each
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int c = 0; c < D; ++c) x[c] = (vec)_mm256_permutevar8x32_ps(r[c], order);
#endif
  }

  // to_lanes' inverse, written to `to` as float32 or rounded to bfloat16 (uint16_t).
  template <typename T>
  static void put(const vec* x, T* to) {
    float rows[kLanes * D];
#if defined(__AVX512F__)
    __m512 r[4];
    for (int c = 0; c < D; ++c) r[c] = (__m512)x[c];
    transpose_within_lanes_4x4(r);
    transpose_lanes_4x4(r);
    for (int m = 0; m < 4; ++m) store(rows + 16 * m, (vec)r[m]);
#else
    __m256 r[4];
    const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (int c = 0; c < D; ++c) r[c] = _mm256_permutevar8x32_ps((__m256)x[c], order);
    transpose_within_lanes_4x4(r);
    for (int m = 0; m < 4; ++m) store(rows + 8 * m, (vec)r[m]);
#endif
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(to, rows, sizeof rows);
    } else {
      for (int i = 0; i < kLanes * D; i += kLanes) store_bfloat16(to + i, load(rows + i));
    }
  }

  const int n_;
  const int64_t h_;
  const int padded_n_;  // n rounded up to whole blocks of query rows
  const bool bf16_;
  std::unique_ptr<vec[]> memory_;  // all of the below, uninitialised until written
  // In lanes: Q / sqrt(D) and dO (padded_n_ rows), K and V, each also rounded to bfloat16
  // (for bf16_); K and V as pairs of keys (kKeyPairs); dK and dV as they are summed.
  vec *q_, *q16_, *d_out_, *d_out16_, *k_, *k16_, *v_, *v16_, *dk_, *dv_, *k_pairs_, *v_pairs_;
  vec *lse_, *scores_, *p_, *dp_;  // the backward's log-sum-exps; a block's rows of scores,
                                   // of weights and of dP
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

// Runs work(begin, end) over [0, count) in chunks of `chunk`, on the calling thread and on
// XLA's intra-op threads. The caller waits only for chunks a helper has already taken, never for
// a helper still queued (the pool's threads may all be busy, e.g. running other devices'
// programs): a helper that starts after the last chunk is gone returns without calling
// `work`, whose references into the caller's frame may be gone by then.
template <typename Work>
void ForEachChunk(ffi::ThreadPool& pool, int64_t count, int64_t chunk, const Work& work) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count / chunk) - 1;
  if (helpers <= 0) return work(0, count);
  struct Progress {
    std::atomic<int64_t> next{0}, busy{0};
  };
  auto progress = std::make_shared<Progress>();
  auto take_chunks = [count, chunk](Progress& p, const Work& w) {
    for (int64_t i; (i = p.next.fetch_add(chunk)) < count;) w(i, std::min(i + chunk, count));
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
    ForEachChunk(pool, s.heads(), 8, [&](int64_t begin, int64_t end) {
      Head<D, NB> head(s.n, 3 * s.width(), s.width(), bf16);
      for (int64_t g = begin; g < end; ++g) per_head(head, g);
    });
  });
  return ok ? ffi::Error::Success() : Unsupported(s);
}

// Whether the heads go kLanes to a vector (LaneHeads): heads of 4, kLanes or a multiple of
// it to a token.
bool InLanes(const Shape& s) {
  return s.d == 4 && s.h % kLanes == 0 && s.n >= 1 && s.n <= kMaxTokens;
}

// Runs per_group(heads, g) for every group of kLanes heads from head g, with a LaneHeads for
// each chunk of groups (one group: as much work as 16 heads of Head's chunks of 8).
template <typename PerGroup>
void OverLaneGroups(ffi::ThreadPool& pool, const Shape& s, bool bf16, PerGroup per_group) {
  ForEachChunk(pool, s.heads() / kLanes, 1, [&](int64_t begin, int64_t end) {
    LaneHeads heads(s.n, s.h, bf16);
    for (int64_t group = begin; group < end; ++group) per_group(heads, group * kLanes);
  });
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
  if (InLanes(*shape)) {
    OverLaneGroups(pool, *shape, bf16, [&](auto& heads, int64_t g) {
      const float* q = qkv.typed_data() + shape->packed_offset(g);
      float* group_lse = lse->typed_data() + g * shape->n;
      if (*rounded)
        return heads.forward(q, out->reinterpret_data<uint16_t>() + shape->offset(g), group_lse);
      heads.forward(q, out->reinterpret_data<float>() + shape->offset(g), group_lse);
    });
    return ffi::Error::Success();
  }
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
  if (InLanes(*shape)) {
    OverLaneGroups(pool, *shape, bf16, [&](auto& heads, int64_t g) {
      const int64_t at = shape->packed_offset(g);
      const float* group_d_out = d_out.typed_data() + shape->offset(g);
      const float* group_lse = lse.typed_data() + g * shape->n;
      if (*rounded)
        return heads.backward(qkv.typed_data() + at, group_lse, group_d_out,
                              dqkv->reinterpret_data<uint16_t>() + at);
      heads.backward(qkv.typed_data() + at, group_lse, group_d_out,
                     dqkv->reinterpret_data<float>() + at);
    });
    return ffi::Error::Success();
  }
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
