// CPU matrix-vector product on int4 and int8 weights as the layout stores them
// (quant/layout.py): y = x @ dequant(W).T (+ bias) for 1..4 rows of x, float32
// accumulation, output rounded once into x's dtype. Built by
// offload_engine/kernels/cpu_gemv.py on first use.
//
// int4: qweight uint8 (N, Kp/2): byte j holds element 2j (low nibble) and 2j + 1 (high nibble).
// Every scheme is  w = code * s + off  per group, the layout's definitions expanded:
//   int4: off = -8 * s;  int4-asym: off = -z * s;  int4-min: off = m
// so  y = sum_g (s_g * dot(code_g, x_g) + off_g * sum(x_g)).  x is converted to float32
// once per call, each 16-element chunk reordered as (8 even elements, 8 odd ones) to
// match the low and high nibbles of 8 weight bytes, and its group sums taken.
// int8 (gemv_int8): qweight int8 (N, Kp), w = code * s; x is widened in natural order.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GEMV_AVX2 1
#ifndef GEMV_R1
#define GEMV_R1 4
#endif
#else
#define GEMV_AVX2 0
#endif

namespace {

constexpr int64_t kChunk = 32;  // group sizes are multiples of this
constexpr int64_t kHalf = 16;  // elements per 8 weight bytes: x is reordered in these
// Rows ahead that the int8 loop prefetches, a cache line at a time: a weight is read cold
// from DRAM once per token, where the hardware prefetcher alone left the loop waiting
// (SmolLM2's 49152x576 int8 output: 3.1 ms -> 1.7-1.9 ms on this 2-core VM; the int4
// loop showed no clear change, so it has none).
constexpr int64_t kPrefetchRows = 16;
enum Offset { kNone = 0, kZero = 1, kMin = 2 };

inline float to_f(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_f(at::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}

struct Args {
  const uint8_t* qweight;  // (N, Kp / 2)
  const uint8_t* zeros;  // (N, G) or null
  const float* xd;  // (M, Kp) reordered x
  const float* xs;  // (M, G) group sums of x
  float* out;  // (M, N)
  int64_t n, kp, groups, group_size, rows, mode;
};

template <typename S>
inline float group_offset(const Args& a, const S* mins, int64_t idx, float s) {
  if (a.mode == kZero) return -static_cast<float>(a.zeros[idx]) * s;
  if (a.mode == kMin) return to_f(mins[idx]);
  return -8.0f * s;
}

// Plain C++ for CPUs without AVX2 (and to check the vector path against).
template <typename S>
void rows_scalar(const Args& a, const S* scales, const S* mins, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.qweight + n * (a.kp / 2);
    for (int64_t m = 0; m < a.rows; ++m) {
      const float* x = a.xd + m * a.kp;
      float total = 0.0f;
      for (int64_t g = 0; g < a.groups; ++g) {
        const int64_t idx = n * a.groups + g;
        const float s = to_f(scales[idx]);
        float dot = 0.0f;
        for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; k += kHalf) {
          for (int64_t j = 0; j < kHalf / 2; ++j) {
            const uint8_t byte = row[k / 2 + j];
            dot += static_cast<float>(byte & 0x0F) * x[k + j];
            dot += static_cast<float>(byte >> 4) * x[k + kHalf / 2 + j];
          }
        }
        total += s * dot + group_offset(a, mins, idx, s) * a.xs[m * a.groups + g];
      }
      a.out[m * a.n + n] = total;
    }
  }
}

#if GEMV_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 consecutive scales, minimums or zero points as float32.
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const at::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One row's scales and offsets as float32 (8 groups at a time, then one by one), so the
// group loop only broadcasts them.
template <typename S>
void row_factors(const Args& a, const S* scales, const S* mins, int64_t n, float* sf,
                 float* of) {
  const int64_t base = n * a.groups;
  int64_t g = 0;
  for (; g + 8 <= a.groups; g += 8) {
    const __m256 s = load8(scales + base + g);
    __m256 o = _mm256_mul_ps(s, _mm256_set1_ps(-8.0f));
    if (a.mode == kMin) o = load8(mins + base + g);
    if (a.mode == kZero) o = _mm256_mul_ps(s, _mm256_sub_ps(_mm256_setzero_ps(),
                                                            load8(a.zeros + base + g)));
    _mm256_storeu_ps(sf + g, s);
    _mm256_storeu_ps(of + g, o);
  }
  for (; g < a.groups; ++g) {
    sf[g] = to_f(scales[base + g]);
    of[g] = group_offset(a, mins, base + g, sf[g]);
  }
}

// R weight rows n.. n+R-1 against M rows of x: each x load feeds R rows, each decoded
// chunk M rows; one pair of accumulators per group, weight row and x row. 8 weight bytes
// widen to 8 int32 lanes (vpmovzxbd); the low nibbles are the 8 even elements, the high
// nibbles the 8 odd ones, matching x's reordered chunk.
template <int M, int H, int R, typename S>
void block_avx2(const Args& a, const S* scales, const S* mins, int64_t n, float* sf,
                float* of) {
  const __m256i mask = _mm256_set1_epi32(0x0F);
  const int64_t groups = a.groups;
  for (int r = 0; r < R; ++r) row_factors(a, scales, mins, n + r, sf + r * groups, of + r * groups);
  __m256 total[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) total[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 p0[R][M], p1[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) { p0[r][m] = _mm256_setzero_ps(); p1[r][m] = _mm256_setzero_ps(); }
    for (int c = 0; c < H; ++c) {
      const int64_t k = (g * H + c) * kHalf;
      __m256 even[R], odd[R];
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
            reinterpret_cast<const __m128i*>(a.qweight + (n + r) * (a.kp / 2) + k / 2)));
        even[r] = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
        odd[r] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
      }
      for (int m = 0; m < M; ++m) {
        const __m256 x0 = _mm256_loadu_ps(a.xd + m * a.kp + k);
        const __m256 x1 = _mm256_loadu_ps(a.xd + m * a.kp + k + 8);
        for (int r = 0; r < R; ++r) {
          p0[r][m] = _mm256_fmadd_ps(even[r], x0, p0[r][m]);
          p1[r][m] = _mm256_fmadd_ps(odd[r], x1, p1[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_broadcast_ss(sf + r * groups + g);
      for (int m = 0; m < M; ++m)
        total[r][m] = _mm256_fmadd_ps(_mm256_add_ps(p0[r][m], p1[r][m]), sv, total[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      float offset = 0.0f;
      for (int64_t g = 0; g < groups; ++g) offset += of[r * groups + g] * a.xs[m * groups + g];
      a.out[m * a.n + n + r] = hsum(total[r][m]) + offset;
    }
  }
}

template <int M, int H, typename S>  // H = group_size / 16, a constant so the loops unroll
void rows_avx2(const Args& a, const S* scales, const S* mins, int64_t n0, int64_t n1) {
  constexpr int R = M == 1 ? GEMV_R1 : 1;  // weight rows per block: registers allow 2 at M=1
  std::vector<float> factors(2 * R * a.groups);
  float *sf = factors.data(), *of = sf + R * a.groups;
  int64_t n = n0;
  for (; n + R <= n1; n += R) block_avx2<M, H, R, S>(a, scales, mins, n, sf, of);
  for (; n < n1; ++n) block_avx2<M, H, 1, S>(a, scales, mins, n, sf, of);
}
#endif

#if GEMV_AVX2
template <int M, typename S>
void rows_avx2_h(const Args& a, const S* scales, const S* mins, int64_t n0, int64_t n1) {
  switch (a.group_size) {
    case 32: return rows_avx2<M, 2, S>(a, scales, mins, n0, n1);
    case 64: return rows_avx2<M, 4, S>(a, scales, mins, n0, n1);
    case 128: return rows_avx2<M, 8, S>(a, scales, mins, n0, n1);
    default: return rows_avx2<M, 16, S>(a, scales, mins, n0, n1);
  }
}

template <typename S>
void rows_avx2_m(const Args& a, const S* scales, const S* mins, int64_t n0, int64_t n1) {
  switch (a.rows) {
    case 1: return rows_avx2_h<1, S>(a, scales, mins, n0, n1);
    case 2: return rows_avx2_h<2, S>(a, scales, mins, n0, n1);
    case 3: return rows_avx2_h<3, S>(a, scales, mins, n0, n1);
    default: return rows_avx2_h<4, S>(a, scales, mins, n0, n1);
  }
}
#endif

template <typename S>
void run_rows(const Args& a, const S* scales, const S* mins, bool vectorized) {
  // about 32k weights per task: small matrices stay on one thread's cache lines
  const int64_t grain = std::max<int64_t>(1, 32768 / a.kp);
  at::parallel_for(0, a.n, grain, [&](int64_t n0, int64_t n1) {
#if GEMV_AVX2
    if (vectorized) return rows_avx2_m<S>(a, scales, mins, n0, n1);
#endif
    rows_scalar<S>(a, scales, mins, n0, n1);
  });
}

// x (M, K) -> float32 (M, Kp) with each chunk as (even, odd) elements, zero padded.
template <typename T>
void reorder_x(const T* x, int64_t rows, int64_t k_in, int64_t kp, int64_t group_size,
               float* xd, float* xs) {
  const int64_t groups = kp / group_size;
  for (int64_t m = 0; m < rows; ++m) {
    const T* src = x + m * k_in;
    float* dst = xd + m * kp;
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.0f;
      for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) {
        const float v = k < k_in ? static_cast<float>(src[k]) : 0.0f;
        const int64_t base = k - k % kHalf, j = k % kHalf;
        dst[base + (j % 2) * (kHalf / 2) + j / 2] = v;
        sum += v;
      }
      xs[m * groups + g] = sum;
    }
  }
}

// Round the float32 result (plus bias, in x's dtype like x) once into x's dtype.
template <typename T>
void store(const float* res, const T* bias, int64_t count, int64_t n, T* out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = static_cast<T>(bias ? res[i] + static_cast<float>(bias[i % n]) : res[i]);
  }
}

// int8 (Q8_0's form, quant/layout.py): qweight int8 (N, Kp), w = code * s per group, so
//   y = sum_g s_g * dot(code_g, x_g)  with x in natural order (float32, zero padded).
template <typename S>
void rows_int8_scalar(const Args& a, const S* scales, int64_t n0, int64_t n1) {
  const int8_t* codes = reinterpret_cast<const int8_t*>(a.qweight);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.rows; ++m) {
      const float* x = a.xd + m * a.kp;
      float total = 0.0f;
      for (int64_t g = 0; g < a.groups; ++g) {
        float dot = 0.0f;
        for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k)
          dot += static_cast<float>(codes[n * a.kp + k]) * x[k];
        total += to_f(scales[n * a.groups + g]) * dot;
      }
      a.out[m * a.n + n] = total;
    }
  }
}

#if GEMV_AVX2
// R weight rows against M rows of x; 8 codes widen to 8 float32 lanes (vpmovsxbd), two
// accumulators per group so consecutive FMAs do not wait on each other.
template <int M, int R, typename S>
void block_int8_avx2(const Args& a, const S* scales, int64_t n) {
  const int8_t* codes = reinterpret_cast<const int8_t*>(a.qweight);
  for (int64_t line = 0; line < R * a.kp; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(codes + (n + kPrefetchRows) * a.kp + line),
                 _MM_HINT_T0);
  __m256 total[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) total[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    __m256 p0[R][M], p1[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) { p0[r][m] = _mm256_setzero_ps(); p1[r][m] = _mm256_setzero_ps(); }
    for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; k += 16) {
      __m256 w0[R], w1[R];
      for (int r = 0; r < R; ++r) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (n + r) * a.kp + k));
        w0[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        w1[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
      }
      for (int m = 0; m < M; ++m) {
        const __m256 x0 = _mm256_loadu_ps(a.xd + m * a.kp + k);
        const __m256 x1 = _mm256_loadu_ps(a.xd + m * a.kp + k + 8);
        for (int r = 0; r < R; ++r) {
          p0[r][m] = _mm256_fmadd_ps(w0[r], x0, p0[r][m]);
          p1[r][m] = _mm256_fmadd_ps(w1[r], x1, p1[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_set1_ps(to_f(scales[(n + r) * a.groups + g]));
      for (int m = 0; m < M; ++m)
        total[r][m] = _mm256_fmadd_ps(_mm256_add_ps(p0[r][m], p1[r][m]), sv, total[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) a.out[m * a.n + n + r] = hsum(total[r][m]);
}

template <int M, typename S>
void rows_int8_avx2(const Args& a, const S* scales, int64_t n0, int64_t n1) {
  constexpr int R = M == 1 ? 4 : 1;
  int64_t n = n0;
  for (; n + R <= n1; n += R) block_int8_avx2<M, R, S>(a, scales, n);
  for (; n < n1; ++n) block_int8_avx2<M, 1, S>(a, scales, n);
}

template <typename S>
void rows_int8_avx2_m(const Args& a, const S* scales, int64_t n0, int64_t n1) {
  switch (a.rows) {
    case 1: return rows_int8_avx2<1, S>(a, scales, n0, n1);
    case 2: return rows_int8_avx2<2, S>(a, scales, n0, n1);
    case 3: return rows_int8_avx2<3, S>(a, scales, n0, n1);
    default: return rows_int8_avx2<4, S>(a, scales, n0, n1);
  }
}
#endif

template <typename S>
void run_rows_int8(const Args& a, const S* scales, bool vectorized) {
  const int64_t grain = std::max<int64_t>(1, 32768 / a.kp);
  at::parallel_for(0, a.n, grain, [&](int64_t n0, int64_t n1) {
#if GEMV_AVX2
    if (vectorized) return rows_int8_avx2_m<S>(a, scales, n0, n1);
#endif
    rows_int8_scalar<S>(a, scales, n0, n1);
  });
}

// x (M, K) -> float32 (M, Kp) in natural order, zero padded.
template <typename T>
void widen_x(const T* x, int64_t rows, int64_t k_in, int64_t kp, float* xd) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < kp; ++k)
      xd[m * kp + k] = k < k_in ? static_cast<float>(x[m * k_in + k]) : 0.0f;
}

}  // namespace

bool vectorized_build() { return GEMV_AVX2 == 1; }

torch::Tensor gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                   c10::optional<torch::Tensor> zeros, c10::optional<torch::Tensor> mins,
                   c10::optional<torch::Tensor> bias, int64_t group_size, bool vectorized) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && x.numel() >= 1 &&
              x.numel() <= 4 * x.size(-1), "cpu_gemv: x must be contiguous (..., K), 1-4 rows");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(),
              "cpu_gemv: qweight must be contiguous uint8");
  TORCH_CHECK(scales.is_contiguous() && (group_size == 32 || group_size == 64 ||
              group_size == 128 || group_size == 256), "cpu_gemv: group size 32/64/128/256");
  const int64_t k_in = x.size(-1), rows = x.numel() / k_in, n = qweight.size(0);
  const int64_t kp = qweight.size(1) * 2, groups = kp / group_size;
  TORCH_CHECK(kp >= k_in && kp % group_size == 0 && scales.size(0) == n &&
              scales.size(1) == groups, "cpu_gemv: qweight/scales do not match x");
  // 64-byte aligned, so no 32-byte load of x crosses a cache line (kp is a multiple of 16)
  std::vector<float> buf(rows * (kp + groups + n) + 16);
  float* xd = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) / 4 % 16) % 16;
  float *xs = xd + rows * kp, *res = xs + rows * groups;
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == x.scalar_type() &&
              bias->is_contiguous() && bias->numel() == n), "cpu_gemv: bias must be (N,) in x's dtype");
  AT_DISPATCH_SWITCH(x.scalar_type(), "cpu_gemv_x",
      AT_DISPATCH_CASE(at::kFloat, [&] { reorder_x<scalar_t>(x.data_ptr<scalar_t>(), rows, k_in, kp, group_size, xd, xs); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { reorder_x<scalar_t>(x.data_ptr<scalar_t>(), rows, k_in, kp, group_size, xd, xs); }));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  auto out = torch::empty(shape, x.options());
  Args a{qweight.data_ptr<uint8_t>(), nullptr, xd, xs, res, n, kp, groups, group_size, rows, kNone};
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->is_contiguous(), "cpu_gemv: zeros");
    a.zeros = zeros->data_ptr<uint8_t>();
    a.mode = kZero;
  }
  if (mins.has_value()) {
    TORCH_CHECK(mins->scalar_type() == scales.scalar_type() && mins->is_contiguous(),
                "cpu_gemv: mins must be contiguous in the scale dtype");
    a.mode = kMin;
  }
  AT_DISPATCH_SWITCH(scales.scalar_type(), "cpu_gemv_scales",
      AT_DISPATCH_CASE(at::kHalf, [&] { run_rows<scalar_t>(a, scales.data_ptr<scalar_t>(), mins.has_value() ? mins->data_ptr<scalar_t>() : nullptr, vectorized); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { run_rows<scalar_t>(a, scales.data_ptr<scalar_t>(), mins.has_value() ? mins->data_ptr<scalar_t>() : nullptr, vectorized); }));
  AT_DISPATCH_SWITCH(x.scalar_type(), "cpu_gemv_out",
      AT_DISPATCH_CASE(at::kFloat, [&] { store<scalar_t>(res, bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, rows * n, n, out.data_ptr<scalar_t>()); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { store<scalar_t>(res, bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, rows * n, n, out.data_ptr<scalar_t>()); }));
  return out;
}

torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                        c10::optional<torch::Tensor> bias, int64_t group_size, bool vectorized) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && x.numel() >= 1 &&
              x.numel() <= 4 * x.size(-1), "cpu_gemv: x must be contiguous (..., K), 1-4 rows");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous() && qweight.dim() == 2,
              "cpu_gemv: int8 qweight must be contiguous int8 (N, Kp)");
  TORCH_CHECK(scales.is_contiguous() && group_size % 16 == 0 && group_size > 0,
              "cpu_gemv: int8 group size must be a multiple of 16");
  const int64_t k_in = x.size(-1), rows = x.numel() / k_in, n = qweight.size(0);
  const int64_t kp = qweight.size(1), groups = kp / group_size;
  TORCH_CHECK(kp >= k_in && kp % group_size == 0 && scales.size(0) == n &&
              scales.size(1) == groups, "cpu_gemv: int8 qweight/scales do not match x");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == x.scalar_type() &&
              bias->is_contiguous() && bias->numel() == n), "cpu_gemv: bias must be (N,) in x's dtype");
  std::vector<float> buf(rows * (kp + n) + 16);
  float* xd = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) / 4 % 16) % 16;
  float* res = xd + rows * kp;
  AT_DISPATCH_SWITCH(x.scalar_type(), "cpu_gemv_int8_x",
      AT_DISPATCH_CASE(at::kFloat, [&] { widen_x<scalar_t>(x.data_ptr<scalar_t>(), rows, k_in, kp, xd); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { widen_x<scalar_t>(x.data_ptr<scalar_t>(), rows, k_in, kp, xd); }));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  auto out = torch::empty(shape, x.options());
  Args a{reinterpret_cast<const uint8_t*>(qweight.data_ptr<int8_t>()), nullptr, xd, nullptr, res,
         n, kp, groups, group_size, rows, kNone};
  AT_DISPATCH_SWITCH(scales.scalar_type(), "cpu_gemv_int8_scales",
      AT_DISPATCH_CASE(at::kHalf, [&] { run_rows_int8<scalar_t>(a, scales.data_ptr<scalar_t>(), vectorized); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { run_rows_int8<scalar_t>(a, scales.data_ptr<scalar_t>(), vectorized); }));
  AT_DISPATCH_SWITCH(x.scalar_type(), "cpu_gemv_int8_out",
      AT_DISPATCH_CASE(at::kFloat, [&] { store<scalar_t>(res, bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, rows * n, n, out.data_ptr<scalar_t>()); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { store<scalar_t>(res, bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, rows * n, n, out.data_ptr<scalar_t>()); }));
  return out;
}
