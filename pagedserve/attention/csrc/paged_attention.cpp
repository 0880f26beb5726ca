// Paged attention for query tokens that each attend to their own context, reading K/V in
// place from the paged cache by block table (no gathered copy). Built at first use by
// pagedserve/attention/cpu_kernels.py (plain C ABI, no torch headers, OpenMP threads).
//
// Layouts: query/out [*, H, D] rows at `q_stride` / `out_stride` elements apart; K and V
// caches [num_blocks, block_size, Hkv, D] contiguous; block_table int32 rows `bt_stride`
// apart. Item n is query row token_idx[n] of block-table row req_row[n], attending to key
// positions [max(0, ctx_len[n] - window), ctx_len[n]) (window 0: no window).
//
// Work is split into units (item, kv head, key range) so a single long context still
// spreads over the threads (flash-decoding). A unit walks its keys in sub-chunks with an
// online softmax (max, sum, acc per query head); the units of a split context are merged
// by log-sum-exp at the end, a whole context writes its output directly.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int W = 16;  // floats per vector
typedef float vf __attribute__((vector_size(W * 4), aligned(4)));
typedef uint16_t vu16 __attribute__((vector_size(W * 2), aligned(2)));
typedef uint32_t vu32 __attribute__((vector_size(W * 4)));
typedef uint16_t bf16_t;

inline float to_f(float x) { return x; }
inline float to_f(bf16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store_f(float x, float* d) { *d = x; }
inline void store_f(float x, bf16_t* d) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  *d = bf16_t(u >> 16);
}
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf load(const bf16_t* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32 u = __builtin_convertvector(h, vu32) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// Software prefetch of the next block's rows (blocks are scattered: the hardware prefetcher
// cannot guess where the next one lives). Locality 3: into L1; 2: into L2.
template <int LOCALITY, typename T>
inline void prefetch_rows(const T* p, int64_t row_stride, int64_t n, int D) {
  const int64_t row_bytes = int64_t(D) * sizeof(T);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < row_bytes; b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(p + j * row_stride) + b, 0, LOCALITY);
}

// s[g * s_stride + j] = qf_g . k_j for the G query heads over n consecutive cache rows.
template <typename T>
void qk_rows(const float* qf, const T* q_raw, int G, int D, const T* k, int64_t row_stride,
             int64_t n, float* s, int64_t s_stride, float scale) {
#if defined(__AVX512BF16__)
  if constexpr (sizeof(T) == 2) {
    if (D % 32 == 0) {  // bf16 pairs: exact products, fp32 sums (scale applied after)
      for (int64_t j = 0; j < n; ++j) {
        const T* kr = k + j * row_stride;
        for (int g = 0; g < G; g += 4) {
          const int m = std::min(4, G - g);
          __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                         _mm512_setzero_ps()};
          for (int d = 0; d < D; d += 32) {
            const __m512bh kv = (__m512bh)_mm512_loadu_si512(kr + d);
            for (int i = 0; i < m; ++i)
              a[i] = _mm512_dpbf16_ps(
                  a[i], (__m512bh)_mm512_loadu_si512(q_raw + int64_t(g + i) * D + d), kv);
          }
          for (int i = 0; i < m; ++i) s[(g + i) * s_stride + j] = _mm512_reduce_add_ps(a[i]) * scale;
        }
      }
      return;
    }
  }
#endif
  (void)q_raw;
  const int dv = D - D % W;
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = k + j * row_stride;
    for (int g = 0; g < G; g += 4) {
      const int m = std::min(4, G - g);
      const float* q0 = qf + int64_t(g) * D;
      vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int d = 0; d < dv; d += W) {
        const vf kv = load(kr + d);
        a0 += load(q0 + d) * kv;
        if (m > 1) a1 += load(q0 + D + d) * kv;
        if (m > 2) a2 += load(q0 + 2 * D + d) * kv;
        if (m > 3) a3 += load(q0 + 3 * D + d) * kv;
      }
      float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      for (int d = dv; d < D; ++d)
        for (int i = 0; i < m; ++i) r[i] += q0[i * D + d] * to_f(kr[d]);
      for (int i = 0; i < m; ++i) s[(g + i) * s_stride + j] = r[i];
    }
  }
}

// acc[g][:] += sum_j p[g * p_stride + j] * v_j over n consecutive cache rows.
template <typename T>
void pv_rows(const float* p, int64_t p_stride, int G, int D, const T* v, int64_t row_stride,
             int64_t n, float* acc) {
  const int dv = D - D % W;
  for (int g = 0; g < G; g += 4) {
    const int m = std::min(4, G - g);
    const float* p0 = p + g * p_stride;
    float* c0 = acc + int64_t(g) * D;
    for (int d = 0; d < dv; d += W) {
      vf a0 = load(c0 + d), a1 = {}, a2 = {}, a3 = {};
      if (m > 1) a1 = load(c0 + D + d);
      if (m > 2) a2 = load(c0 + 2 * D + d);
      if (m > 3) a3 = load(c0 + 3 * D + d);
      for (int64_t j = 0; j < n; ++j) {
        const vf vv = load(v + j * row_stride + d);
        a0 += p0[j] * vv;
        if (m > 1) a1 += p0[p_stride + j] * vv;
        if (m > 2) a2 += p0[2 * p_stride + j] * vv;
        if (m > 3) a3 += p0[3 * p_stride + j] * vv;
      }
      store(c0 + d, a0);
      if (m > 1) store(c0 + D + d, a1);
      if (m > 2) store(c0 + 2 * D + d, a2);
      if (m > 3) store(c0 + 3 * D + d, a3);
    }
    for (int d = dv; d < D; ++d)
      for (int i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) c0[i * D + d] += p0[i * p_stride + j] * to_f(v[j * row_stride + d]);
  }
}

constexpr int64_t kSubChunk = 512;  // keys scored at a time (scores stay in cache)

struct Unit {
  int64_t item;
  int head;
  int64_t t0, t1;
  int64_t part;  // slot in the partial results, or -1: the whole context, write the output
};

struct Split {  // an (item, kv head) whose context is split over several units
  int64_t item;
  int head;
  int64_t first_part, num_parts;
};

struct Args {
  const void *q, *kc, *vc;
  void* out;
  int64_t q_stride, out_stride, bt_stride, n_items, window;
  const int32_t* block_table;
  const int64_t *token_idx, *req_row, *ctx_len;
  int H, Hkv, D, bs, num_threads;
  float scale, softcap;
};

// Online softmax: folds the scores s[g * stride + j] (j < n) into the running max m[g]
// and sum l[g], rescaling acc[g][:] when the max grows; turns s into exp(s - m[g]).
void online_softmax(float* sc, int64_t stride, int64_t n, int G, int D, float softcap,
                    float* m, float* l, float* acc) {
  for (int g = 0; g < G; ++g) {
    float* s = sc + g * stride;
    if (softcap > 0.f) {
      const float inv = 1.f / softcap;
      for (int64_t j = 0; j < n; ++j) s[j] = std::tanh(s[j] * inv) * softcap;
    }
    float mx = m[g];
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
    if (mx > m[g]) {
      if (m[g] > -FLT_MAX) {  // not the first sub-chunk: rescale what was summed so far
        const float alpha = std::exp(m[g] - mx);
        l[g] *= alpha;
        for (int d = 0; d < D; ++d) acc[int64_t(g) * D + d] *= alpha;
      }
      m[g] = mx;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - mx);
      sum += s[j];
    }
    l[g] += sum;
  }
}

// One unit: keys [t0, t1) of one item and KV head, in sub-chunks of kSubChunk keys, each
// scored from K, folded into the running softmax, then summed from V. Block by block
// through the block table, prefetching the next block.
template <typename T>
void attend_unit(const Args& a, const Unit& un, float* qf, float* sc, float* m, float* l,
                 float* acc) {
  const T* kc = static_cast<const T*>(a.kc);
  const T* vc = static_cast<const T*>(a.vc);
  const int G = a.H / a.Hkv, D = a.D, bs = a.bs;
  const T* q_raw =
      static_cast<const T*>(a.q) + a.token_idx[un.item] * a.q_stride + int64_t(un.head) * G * D;
  const int32_t* table = a.block_table + a.req_row[un.item] * a.bt_stride;
  const int64_t row_stride = int64_t(a.Hkv) * D, head_off = int64_t(un.head) * D;
  for (int64_t i = 0; i < int64_t(G) * D; ++i) qf[i] = to_f(q_raw[i]) * a.scale;
  std::fill(m, m + G, -FLT_MAX);
  std::fill(l, l + G, 0.f);
  std::fill(acc, acc + int64_t(G) * D, 0.f);
  for (int64_t sub = un.t0; sub < un.t1; sub += kSubChunk) {
    const int64_t sub_end = std::min(un.t1, sub + kSubChunk);
    for (int pass = 0; pass < 2; ++pass) {  // 0: scores from K; 1: weighted sum of V
      const T* cache = pass == 0 ? kc : vc;
      for (int64_t t = sub; t < sub_end;) {
        const int64_t off = t % bs;
        const int64_t n = std::min<int64_t>(bs - off, sub_end - t);
        const T* rows = cache + ((int64_t)table[t / bs] * bs + off) * row_stride + head_off;
        const int64_t next = t + n;
        if (next < sub_end) {
          const int64_t next_row = (int64_t)table[next / bs] * bs * row_stride + head_off;
          const int64_t next_n = std::min<int64_t>(bs, sub_end - next);
          prefetch_rows<3>(cache + next_row, row_stride, next_n, D);
          // V rows of the scores being computed: into L2 for the second pass.
          if (pass == 0) prefetch_rows<2>(vc + next_row, row_stride, next_n, D);
        }
        if (pass == 0)
          qk_rows(qf, q_raw, G, D, rows, row_stride, n, sc + (t - sub), kSubChunk, a.scale);
        else
          pv_rows(sc + (t - sub), kSubChunk, G, D, rows, row_stride, n, acc);
        t = next;
      }
      if (pass == 0) online_softmax(sc, kSubChunk, sub_end - sub, G, D, a.softcap, m, l, acc);
    }
  }
}

template <typename T>
void write_out(const Args& a, int64_t item, int head, int g, const float* acc, float l) {
  const int G = a.H / a.Hkv, D = a.D;
  T* o = static_cast<T*>(a.out) + a.token_idx[item] * a.out_stride + (int64_t(head) * G + g) * D;
  const float inv = 1.f / l;
  for (int d = 0; d < D; ++d) store_f(acc[d] * inv, o + d);
}

template <typename T>
void run(const Args& a) {
  const int G = a.H / a.Hkv, D = a.D, Hkv = a.Hkv;
  auto first_pos = [&](int64_t n) {
    return a.window > 0 ? std::max<int64_t>(0, a.ctx_len[n] - a.window) : int64_t(0);
  };
  int64_t total = 0;
  for (int64_t n = 0; n < a.n_items; ++n) total += a.ctx_len[n] - first_pos(n);
  // Split long contexts so that there are about four units per thread (flash-decoding);
  // contexts no longer than that stay whole and write their output directly.
  const int64_t chunk = std::max(kSubChunk, (total * Hkv + 4 * a.num_threads - 1) / (4 * a.num_threads));
  std::vector<Unit> units;
  std::vector<Split> splits;
  int64_t num_parts = 0;
  for (int64_t n = 0; n < a.n_items; ++n) {
    const int64_t s = first_pos(n), len = a.ctx_len[n] - s;
    const int64_t pieces = (len + chunk - 1) / chunk;
    for (int h = 0; h < Hkv; ++h) {
      if (pieces <= 1) {
        units.push_back({n, h, s, a.ctx_len[n], -1});
        continue;
      }
      splits.push_back({n, h, num_parts, pieces});
      for (int64_t i = 0; i < pieces; ++i)
        units.push_back({n, h, s + len * i / pieces, s + len * (i + 1) / pieces, num_parts++});
    }
  }
  const int64_t part = int64_t(G) * (D + 2);  // max, sum, acc[D] per query head
  std::vector<float> partial(num_parts * part);
  const int64_t num_units = int64_t(units.size()), num_splits = int64_t(splits.size());

#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<float> qf(int64_t(G) * D), sc(G * kSubChunk), acc(int64_t(G) * D), m(G), l(G);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < num_units; ++u) {
      const Unit& un = units[u];
      attend_unit<T>(a, un, qf.data(), sc.data(), m.data(), l.data(), acc.data());
      if (un.part < 0) {
        for (int g = 0; g < G; ++g) write_out<T>(a, un.item, un.head, g, &acc[int64_t(g) * D], l[g]);
      } else {
        float* pu = &partial[un.part * part];
        std::copy(m.begin(), m.end(), pu);
        std::copy(l.begin(), l.end(), pu + G);
        std::copy(acc.begin(), acc.end(), pu + 2 * G);
      }
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < num_splits; ++i) {  // merge by log-sum-exp
      const Split& sp = splits[i];
      for (int g = 0; g < G; ++g) {
        float mx = -FLT_MAX, sum = 0.f;
        for (int64_t p = 0; p < sp.num_parts; ++p) mx = std::max(mx, partial[(sp.first_part + p) * part + g]);
        std::fill(acc.begin(), acc.begin() + D, 0.f);
        for (int64_t p = 0; p < sp.num_parts; ++p) {
          const float* pu = &partial[(sp.first_part + p) * part];
          const float w = std::exp(pu[g] - mx);
          sum += pu[G + g] * w;
          const float* src = pu + 2 * G + int64_t(g) * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) acc[d] += w * src[d];
        }
        write_out<T>(a, sp.item, sp.head, g, acc.data(), sum);
      }
    }
  }
}

}  // namespace

// dtype: 0 float32, 1 bfloat16. Returns 0, or 1 for an unsupported dtype.
extern "C" int pagedserve_paged_attention(
    int dtype, const void* query, int64_t q_stride, void* out, int64_t out_stride,
    const void* k_cache, const void* v_cache, const int32_t* block_table, int64_t bt_stride,
    const int64_t* token_idx, const int64_t* req_row, const int64_t* ctx_len, int64_t n_items,
    int num_heads, int num_kv_heads, int head_dim, int block_size, float scale, float softcap,
    int64_t window, int num_threads) {
  const Args a{query,     k_cache,   v_cache,   out,      q_stride,     out_stride, bt_stride,
               n_items,   window,    block_table, token_idx, req_row, ctx_len,   num_heads,
               num_kv_heads, head_dim, block_size, std::max(1, num_threads), scale, softcap};
  if (n_items <= 0) return 0;
  if (dtype == 0) {
    run<float>(a);
  } else if (dtype == 1) {
    run<bf16_t>(a);
  } else {
    return 1;
  }
  return 0;
}
