// Int8-weight matrix-vector products for a few rows at a time (decode steps): out =
// x @ W^T with W int8 per output channel and x quantized per row to integers, on
// AVX512-VNNI (vpdpbusd: u8 x s8 -> s32). Built at first use by
// pagedserve/layers/quantization/gemv.py (plain C ABI, no torch headers, OpenMP threads
// shared with torch).
//
// Why: at one to a few rows, torch's int8 kernels (_int_mm, _weight_int8pack_mm) read the
// weights well under the memory bandwidth; this kernel streams each weight row once per
// pass of up to 8 activation rows.
//
// Activations (act_bits):
//   8:  symmetric int8 per row, exactly as kernels.quantize_per_token (division, round half
//       to even); stored shifted to u8 (q + 128), the shift taken back exactly with the
//       weight row sums: sum((q + 128) * w) - 128 * sum(w). Same integers as _int_mm.
//   16: symmetric 16-bit per row (scale amax / 32767): q = 256 * h + l with h in
//       [-128, 127] (stored as h + 128) and l in [0, 255], two vpdpbusd per weight vector;
//       sum(q * w) = 256 * (sum((h + 128) * w) - 128 * sum(w)) + sum(l * w), exact in
//       integers. A 16-bit fixed-point row keeps 2^-15 of its largest value: finer than
//       bf16's 8-bit mantissa for all but the smallest entries, so this is weight-only
//       int8 quality (no activation-outlier loss), at int8 weight-streaming speed.
// x is float32 or bf16 (dtype 0 / 1) rows `x_stride` apart; out float32 or bf16 rows
// `out_stride` apart.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define PAGEDSERVE_HAVE_VNNI 1
#endif

namespace {

constexpr int kMaxRows = 16;
// Rows per pass over the weights: beyond 8 the accumulators no longer stay in registers
// (measured 3.5x slower per pass at 16), so 9..16 rows take two passes.
constexpr int kRowsPerPass = 8;
constexpr int kRowsPerTask = 64;  // output channels per scheduling unit

typedef uint16_t bf16_t;

inline float bf16_to_f(bf16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline bf16_t f_to_bf16(float x) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return bf16_t(u >> 16);
}

struct Out {
  void* data;
  int64_t stride;
  bool bf16;
  inline void store(int64_t m, int64_t n, float v) const {
    if (bf16)
      static_cast<bf16_t*>(data)[m * stride + n] = f_to_bf16(v);
    else
      static_cast<float*>(data)[m * stride + n] = v;
  }
};

#ifdef PAGEDSERVE_HAVE_VNNI
// xq: per row, k_padded bytes of the (high) u8 part, then for A16 k_padded of the low part.
template <int M, bool A16>
void gemv_rows(const uint8_t* xq, int64_t k_padded, const float* x_scale, const int8_t* w,
               int64_t K, const float* w_scale, const int32_t* w_sum, const Out& out,
               int64_t m0, int64_t n_begin, int64_t n_end) {
  const int64_t full = K / 64;
  const __mmask64 tail_mask = (K % 64) ? (~0ULL >> (64 - K % 64)) : 0;
  const int64_t row_bytes = A16 ? 2 * k_padded : k_padded;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* row = w + n * K;
    __m512i acc[M], acc_lo[A16 ? M : 1];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
    if (A16)
      for (int m = 0; m < M; ++m) acc_lo[m] = _mm512_setzero_si512();
    for (int64_t c = 0; c <= full; ++c) {
      __m512i wv;
      if (c < full)
        wv = _mm512_loadu_si512(row + c * 64);
      else if (tail_mask)
        wv = _mm512_maskz_loadu_epi8(tail_mask, row + full * 64);
      else
        break;
      for (int m = 0; m < M; ++m) {
        const uint8_t* xm = xq + m * row_bytes + c * 64;
        acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_loadu_si512(xm), wv);
        if (A16) acc_lo[m] = _mm512_dpbusd_epi32(acc_lo[m], _mm512_loadu_si512(xm + k_padded), wv);
      }
    }
    const int32_t shift = 128 * w_sum[n];
    for (int m = 0; m < M; ++m) {
      const int32_t hi = _mm512_reduce_add_epi32(acc[m]) - shift;
      float dot;
      if (A16)
        dot = float(256.0 * double(hi) + double(_mm512_reduce_add_epi32(acc_lo[m])));
      else
        dot = float(hi);
      out.store(m0 + m, n, dot * w_scale[n] * x_scale[m]);
    }
  }
}

typedef void (*GemvFn)(const uint8_t*, int64_t, const float*, const int8_t*, int64_t,
                       const float*, const int32_t*, const Out&, int64_t, int64_t, int64_t);

template <bool A16, int... Ms>
struct Table {
  static constexpr GemvFn fns[] = {gemv_rows<Ms, A16>...};
};
template <bool A16, int... Ms>
constexpr GemvFn Table<A16, Ms...>::fns[];
using Gemvs8 = Table<false, 1, 2, 3, 4, 5, 6, 7, 8>;
using Gemvs16 = Table<true, 1, 2, 3, 4, 5, 6, 7, 8>;

template <typename T>
inline float load_x(const T* p, int64_t k);
template <>
inline float load_x<float>(const float* p, int64_t k) { return p[k]; }
template <>
inline float load_x<bf16_t>(const bf16_t* p, int64_t k) { return bf16_to_f(p[k]); }

// Quantize row `row` of x into xq (u8 parts as described above); returns the scale.
template <typename T>
float quantize_row(const T* row, int64_t K, int64_t k_padded, bool a16, uint8_t* xq) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(load_x(row, k)));
  const float qmax = a16 ? 32767.0f : 127.0f;
  const float scale = std::fmax(amax / qmax, 1e-12f);
  for (int64_t k = 0; k < K; ++k) {
    const int q = int(std::nearbyint(load_x(row, k) / scale));
    if (a16) {
      xq[k] = uint8_t((q >> 8) + 128);  // arithmetic shift: floor(q / 256)
      xq[k_padded + k] = uint8_t(q & 255);
    } else {
      xq[k] = uint8_t(q + 128);
    }
  }
  return scale;
}
#endif

}  // namespace

// 0: done; -1: bad arguments; -2: built without AVX512-VNNI.
extern "C" int pagedserve_int8_gemv(int x_dtype, const void* x, int64_t x_stride,
                                    const int8_t* w, const float* w_scale,
                                    const int32_t* w_sum, int out_bf16, void* out,
                                    int64_t out_stride, int64_t M, int64_t N, int64_t K,
                                    int act_bits, int num_threads) {
#ifndef PAGEDSERVE_HAVE_VNNI
  (void)x_dtype; (void)x; (void)x_stride; (void)w; (void)w_scale; (void)w_sum;
  (void)out_bf16; (void)out; (void)out_stride; (void)M; (void)N; (void)K; (void)act_bits;
  (void)num_threads;
  return -2;
#else
  if (M < 1 || M > kMaxRows || N < 1 || K < 1 || num_threads < 1 ||
      (act_bits != 8 && act_bits != 16) || (x_dtype != 0 && x_dtype != 1))
    return -1;
  const bool a16 = act_bits == 16;
  const int64_t k_padded = (K + 63) / 64 * 64;
  const int64_t row_bytes = a16 ? 2 * k_padded : k_padded;
  // Padding: 128 in the (high) u8 part is a zero, 0 in the low part is a zero.
  std::vector<uint8_t> xq(M * row_bytes, 0);
  float x_scale[kMaxRows];
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* dst = xq.data() + m * row_bytes;
    std::memset(dst, 128, k_padded);
    x_scale[m] = x_dtype == 0
        ? quantize_row(static_cast<const float*>(x) + m * x_stride, K, k_padded, a16, dst)
        : quantize_row(static_cast<const bf16_t*>(x) + m * x_stride, K, k_padded, a16, dst);
  }
  const Out o{out, out_stride, out_bf16 != 0};
  const int64_t num_tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
    const int64_t rows = M - m0 < kRowsPerPass ? M - m0 : kRowsPerPass;
    const GemvFn fn = a16 ? Gemvs16::fns[rows - 1] : Gemvs8::fns[rows - 1];
    const uint8_t* xq_pass = xq.data() + m0 * row_bytes;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const int64_t begin = t * kRowsPerTask;
      const int64_t end = begin + kRowsPerTask < N ? begin + kRowsPerTask : N;
      fn(xq_pass, k_padded, x_scale + m0, w, K, w_scale, w_sum, o, m0, begin, end);
    }
  }
  return 0;
#endif
}
