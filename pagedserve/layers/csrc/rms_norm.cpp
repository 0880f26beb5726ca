// Fused RMSNorm for bf16 activations on CPU: one call instead of the ~7 torch ops (and
// their dispatch, ~5 us each) of layers/layernorm.py's bf16 path, optionally adding the
// residual. Built at first use by pagedserve/layers/native_norm.py (plain C ABI, no torch
// headers, OpenMP threads shared with torch).
//
// x: [T, R, D] bf16 (token stride `x_stride` elements, heads contiguous rows of D);
// factor: [FR, D] float32 with FR == 1 (one weight) or FR == R (one row per head);
// out: [T, R, D] bf16 contiguous; residual (optional): [T, R * D] bf16, token stride
// `res_stride`. Per row: inv = rsqrt(mean(x^2) + eps) in float32 (sum of squares
// accumulated in float32), then
//   mode 0 (Gemma): y = bf16(x * inv * factor)              (factor = 1 + weight)
//   mode 1 (Llama): y = bf16(float(bf16(x * inv)) * factor)  (factor = weight)
// and with a residual: out = bf16(float(y) + float(residual)) (transformers' order: the
// normalized value is rounded to bf16 before the add). Rounding: nearest even.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

typedef uint16_t bf16_t;

inline float to_f(bf16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline bf16_t to_bf16(float x) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return bf16_t(u >> 16);
}

void norm_row(const bf16_t* x, bf16_t* out, const bf16_t* residual, const float* factor,
              int64_t D, float eps, int mode) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) {
    const float v = to_f(x[d]);
    sum += v * v;
  }
  const float inv = 1.0f / std::sqrt(sum / float(D) + eps);
  if (mode == 0) {
    if (residual) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d)
        out[d] = to_bf16(to_f(to_bf16(to_f(x[d]) * inv * factor[d])) + to_f(residual[d]));
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[d] = to_bf16(to_f(x[d]) * inv * factor[d]);
    }
  } else {
    if (residual) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const float y = to_f(to_bf16(to_f(to_bf16(to_f(x[d]) * inv)) * factor[d]));
        out[d] = to_bf16(y + to_f(residual[d]));
      }
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d)
        out[d] = to_bf16(to_f(to_bf16(to_f(x[d]) * inv)) * factor[d]);
    }
  }
}

}  // namespace

// 0: done; -1: bad arguments.
extern "C" int pagedserve_rms_norm(const bf16_t* x, int64_t x_stride, bf16_t* out,
                                   const bf16_t* residual, int64_t res_stride,
                                   const float* factor, int64_t factor_rows, int64_t T,
                                   int64_t R, int64_t D, float eps, int mode,
                                   int num_threads) {
  if (T < 0 || R < 1 || D < 1 || (factor_rows != 1 && factor_rows != R) ||
      (mode != 0 && mode != 1))
    return -1;
  const int64_t rows = T * R;
  // Small steps (decode) stay on the calling thread: a parallel region costs more.
  const int threads = rows * D >= (1 << 16) ? num_threads : 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = i / R, r = i % R;
    norm_row(x + t * x_stride + r * D, out + i * D,
             residual ? residual + t * res_stride + r * D : nullptr,
             factor + (factor_rows == 1 ? 0 : r * D), D, eps, mode);
  }
  return 0;
}
