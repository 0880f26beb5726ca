// W8A8 matrix-vector products for a few rows at a time (decode steps): out = x @ W^T with
// x quantized per row (symmetric int8, as kernels.quantize_per_token) and W int8 per output
// channel, one pass over the weights per 8 rows. Built at first use by pagedserve/layers/quantization/native.py (plain C ABI, no
// torch headers, OpenMP threads shared with torch).
//
// Why: at one to a few rows, torch._int_mm on CPU reads the int8 weights at well under the
// memory bandwidth; this kernel streams each weight row once for all M <= 16 rows, with
// AVX512-VNNI (vpdpbusd: u8 x s8 -> s32). Activations are shifted to u8 (q + 128) and the
// shift is taken back exactly with the weight row sums: sum((q + 128) * w) - 128 * sum(w).
// Integer accumulation is exact, so the result equals the _int_mm path up to the order of
// the two float scale multiplies.
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

#ifdef PAGEDSERVE_HAVE_VNNI
template <int M>
void gemv_rows(const uint8_t* xq, int64_t k_padded, const float* x_scale, const int8_t* w,
               int64_t K, const float* w_scale, const int32_t* w_sum, float* out,
               int64_t out_stride, int64_t n_begin, int64_t n_end) {
  const int64_t full = K / 64;
  const __mmask64 tail_mask = (K % 64) ? (~0ULL >> (64 - K % 64)) : 0;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* row = w + n * K;
    __m512i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
    for (int64_t c = 0; c < full; ++c) {
      const __m512i wv = _mm512_loadu_si512(row + c * 64);
      for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_loadu_si512(xq + m * k_padded + c * 64);
        acc[m] = _mm512_dpbusd_epi32(acc[m], xv, wv);
      }
    }
    if (tail_mask) {
      const __m512i wv = _mm512_maskz_loadu_epi8(tail_mask, row + full * 64);
      for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_loadu_si512(xq + m * k_padded + full * 64);
        acc[m] = _mm512_dpbusd_epi32(acc[m], xv, wv);
      }
    }
    const int32_t shift = 128 * w_sum[n];
    for (int m = 0; m < M; ++m) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[m]) - shift;
      out[m * out_stride + n] = float(dot) * w_scale[n] * x_scale[m];
    }
  }
}

typedef void (*GemvFn)(const uint8_t*, int64_t, const float*, const int8_t*, int64_t,
                       const float*, const int32_t*, float*, int64_t, int64_t, int64_t);

template <int... Ms>
struct Table {
  static constexpr GemvFn fns[] = {gemv_rows<Ms>...};
};
template <int... Ms>
constexpr GemvFn Table<Ms...>::fns[];
using Gemvs = Table<1, 2, 3, 4, 5, 6, 7, 8>;
#endif

}  // namespace

// 0: done; -1: bad arguments; -2: built without AVX512-VNNI.
extern "C" int pagedserve_int8_gemv(const float* x, int64_t x_stride, const int8_t* w,
                                    const float* w_scale, const int32_t* w_sum, float* out,
                                    int64_t out_stride, int64_t M, int64_t N, int64_t K,
                                    int num_threads) {
#ifndef PAGEDSERVE_HAVE_VNNI
  (void)x; (void)x_stride; (void)w; (void)w_scale; (void)w_sum; (void)out;
  (void)out_stride; (void)M; (void)N; (void)K; (void)num_threads;
  return -2;
#else
  if (M < 1 || M > kMaxRows || N < 1 || K < 1 || num_threads < 1) return -1;
  // Per-row symmetric int8 quantization, exactly as kernels.quantize_per_token (division,
  // round half to even), stored shifted to u8; the padding holds 128 (a zero).
  const int64_t k_padded = (K + 63) / 64 * 64;
  std::vector<uint8_t> xq(M * k_padded, 128);
  float x_scale[kMaxRows];
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * x_stride;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(row[k]));
    const float scale = std::fmax(amax / 127.0f, 1e-12f);
    x_scale[m] = scale;
    for (int64_t k = 0; k < K; ++k) {
      xq[m * k_padded + k] = uint8_t(int(std::nearbyint(row[k] / scale)) + 128);
    }
  }
  const int64_t num_tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
    const int64_t rows = M - m0 < kRowsPerPass ? M - m0 : kRowsPerPass;
    const GemvFn fn = Gemvs::fns[rows - 1];
    const uint8_t* xq_pass = xq.data() + m0 * k_padded;
    float* out_pass = out + m0 * out_stride;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const int64_t begin = t * kRowsPerTask;
      const int64_t end = begin + kRowsPerTask < N ? begin + kRowsPerTask : N;
      fn(xq_pass, k_padded, x_scale + m0, w, K, w_scale, w_sum, out_pass, out_stride, begin,
         end);
    }
  }
  return 0;
#endif
}
