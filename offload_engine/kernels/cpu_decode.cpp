// The small steps of a decoder layer around its linears, for one CPU call each instead of
// the 5-10 torch ops (each a Python call and an allocation) that transformers' eager code
// issues for them: RMSNorm, rotary embedding, SiLU-gate product, and attention of a single
// query token over the KV cache. Built into the same extension as cpu_gemv.cpp by
// offload_engine/kernels/cpu_gemv.py; offload_engine/kernels/cpu_decode.py holds the
// pure-torch reference of each, and tests/test_cpu_decode.py compares them.
//
// Each one rounds where transformers' code rounds (the input dtype after each elementwise
// op), and computes in float32 where it does, so outputs equal the stock modules' up to
// the order of float32 sums.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace decode_ops {

constexpr int64_t kLanes = 8;  // independent float accumulators: the compiler vectorizes them

template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

template <typename T>
inline float widen(T v) { return static_cast<float>(v); }

// sum_i a[i] * b[i] in float32, kLanes partial sums (a reduction GCC will not vectorize
// on its own without -ffast-math).
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  float lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += widen(a[i + j]) * widen(b[i + j]);
  float total = 0.0f;
  for (; i < n; ++i) total += widen(a[i]) * widen(b[i]);
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// transformers' RMSNorm: h = x.float(); h = h * rsqrt(mean(h^2) + eps); w * h.to(dtype)
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    const float inv = 1.0f / std::sqrt(dot(xr, xr, n) / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i)
      yr[i] = round_to<T>(widen(w[i]) * widen(round_to<T>(widen(xr[i]) * inv)));
  }
}

// transformers' apply_rotary_pos_emb on one head vector: x * cos + rotate_half(x) * sin,
// each product rounded to the dtype, then their sum.
template <typename T>
inline void rope_head(const T* x, const T* cos, const T* sin, T* y, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < dim; ++i) {
    const float rotated = i < half ? -widen(x[i + half]) : widen(x[i - half]);
    const float a = widen(round_to<T>(widen(x[i]) * widen(cos[i])));
    const float b = widen(round_to<T>(rotated * widen(sin[i])));
    y[i] = round_to<T>(a + b);
  }
}

// softmax(scale * q K^T) V for one query head over `tokens` keys of its KV head, float32,
// written rounded into out. A key whose `allowed` entry is false (padding in a batch) is
// skipped, so a row computes exactly what it computes alone. scores: `tokens` floats.
template <typename T>
void attend_head(const T* q, const T* keys, const T* values, int64_t key_stride,
                 int64_t value_stride, const bool* allowed, int64_t allowed_stride,
                 int64_t tokens, int64_t dim, float scale, float* scores, float* acc, T* out) {
  auto used = [&](int64_t t) { return allowed == nullptr || allowed[t * allowed_stride]; };
  float top = -INFINITY;
  for (int64_t t = 0; t < tokens; ++t) {
    if (!used(t)) continue;
    scores[t] = scale * dot(q, keys + t * key_stride, dim);
    top = std::max(top, scores[t]);
  }
  float total = 0.0f;
  for (int64_t t = 0; t < tokens; ++t) {
    if (!used(t)) continue;
    scores[t] = std::exp(scores[t] - top);
    total += scores[t];
  }
  for (int64_t d = 0; d < dim; ++d) acc[d] = 0.0f;
  for (int64_t t = 0; t < tokens; ++t) {
    if (!used(t)) continue;
    const T* v = values + t * value_stride;
    const float p = scores[t];
    for (int64_t d = 0; d < dim; ++d) acc[d] += p * widen(v[d]);
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < dim; ++d) out[d] = round_to<T>(acc[d] * inv);
}

// The whole-tensor loops, templated on the dtype; the bound functions below check shapes
// and dispatch to one of them.
template <typename T>
void rope_all(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
              torch::Tensor& y) {
  const int64_t batch = x.size(0), heads = x.size(1), length = x.size(2), dim = x.size(3);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t l = 0; l < length; ++l)
        rope_head<T>(x.data_ptr<T>() + b * x.stride(0) + h * x.stride(1) + l * x.stride(2),
                     cos.data_ptr<T>() + (b * length + l) * dim,
                     sin.data_ptr<T>() + (b * length + l) * dim,
                     y.data_ptr<T>() + ((b * heads + h) * length + l) * dim, dim);
}

template <typename T>
void silu_mul_all(const T* gate, const T* up, T* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float v = widen(gate[i]);
    out[i] = round_to<T>(widen(round_to<T>(v / (1.0f + std::exp(-v)))) * widen(up[i]));
  }
}

template <typename T>
void attention_all(const torch::Tensor& q, const torch::Tensor& keys,
                   const torch::Tensor& values, const c10::optional<torch::Tensor>& mask,
                   float scale, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), tokens = keys.size(2), dim = q.size(3);
  const int64_t group = heads / keys.size(1);
  // threads only pay for themselves over a long context
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, tokens * dim));
  at::parallel_for(0, batch * heads, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch(tokens + dim);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / heads, h = i % heads, g = h / group;
      const bool* allowed = mask.has_value() ? mask->data_ptr<bool>() + b * mask->stride(0) : nullptr;
      attend_head<T>(q.data_ptr<T>() + b * q.stride(0) + h * q.stride(1),
                     keys.data_ptr<T>() + b * keys.stride(0) + g * keys.stride(1),
                     values.data_ptr<T>() + b * values.stride(0) + g * values.stride(1),
                     keys.stride(2), values.stride(2), allowed,
                     mask.has_value() ? mask->stride(3) : 0, tokens, dim, scale,
                     scratch.data(), scratch.data() + tokens,
                     out.data_ptr<T>() + (b * heads + h) * dim);
    }
  });
}

inline void check_dtype(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "cpu_decode.", name, ": float32 or bfloat16 only, not ", x.scalar_type());
}

}  // namespace decode_ops

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && x.dim() >= 1 && weight.is_contiguous() &&
              weight.numel() == x.size(-1) && weight.scalar_type() == x.scalar_type(),
              "cpu_decode.rms_norm: x (..., n) contiguous, weight (n,) in x's dtype");
  decode_ops::check_dtype(x, "rms_norm");
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    decode_ops::rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                        y.data_ptr<scalar_t>(), rows, n, static_cast<float>(eps));
  });
  return y;
}

// x (B, H, L, D) with a contiguous last dim (any other strides); cos, sin (B, L, D)
// contiguous. Returns a new contiguous (B, H, L, D).
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && cos.is_contiguous() && sin.is_contiguous() &&
              cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
              cos.size(1) == x.size(2) && cos.size(2) == x.size(3) &&
              cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() &&
              x.size(3) % 2 == 0, "cpu_decode.rope: x (B, H, L, D), cos and sin (B, L, D)");
  decode_ops::check_dtype(x, "rope");
  auto y = torch::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope", [&] {
    decode_ops::rope_all<scalar_t>(x, cos, sin, y);
  });
  return y;
}

// transformers' SiLU MLP gate: act(gate) rounded, times up, rounded.
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes() &&
              gate.scalar_type() == up.scalar_type(),
              "cpu_decode.silu_mul: gate and up contiguous, of one shape and dtype");
  decode_ops::check_dtype(gate, "silu_mul");
  auto y = torch::empty_like(gate);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate.scalar_type(), "silu_mul", [&] {
    decode_ops::silu_mul_all<scalar_t>(gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(),
                                       y.data_ptr<scalar_t>(), gate.numel());
  });
  return y;
}

// One query token per row: q (B, H, 1, D), keys and values (B, KVH, T, D) with contiguous
// last dims (a view of a larger cache is fine); H a multiple of KVH (grouped-query
// attention); mask, if given, bool (B, 1, 1, T), true where a key is attended (transformers'
// SDPA mask for a padded batch). Returns (B, 1, H * D), the layout the output projection reads.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values,
                               double scale, c10::optional<torch::Tensor> mask) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && q.size(2) == 1 &&
              keys.size(0) == q.size(0) && keys.sizes() == values.sizes() &&
              q.size(3) == keys.size(3) && q.size(1) % keys.size(1) == 0 &&
              q.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1 &&
              keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type(),
              "cpu_decode.decode_attention: q (B, H, 1, D), keys and values (B, KVH, T, D)");
  TORCH_CHECK(keys.size(2) >= 1, "cpu_decode.decode_attention: no keys to attend to");
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->dim() == 4 &&
              mask->size(0) == q.size(0) && mask->size(1) == 1 && mask->size(2) == 1 &&
              mask->size(3) == keys.size(2)),
              "cpu_decode.decode_attention: mask must be bool (B, 1, 1, T)");
  decode_ops::check_dtype(q, "decode_attention");
  auto out = torch::empty({q.size(0), 1, q.size(1) * q.size(3)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "decode_attention", [&] {
    decode_ops::attention_all<scalar_t>(q, keys, values, mask, static_cast<float>(scale), out);
  });
  return out;
}

// ---- a whole decode step of a Llama/Qwen2 decoder layer whose weights are resident and
// prepacked for torch's CPU int4 kernel, in two calls around the KV cache's update. Each
// step is the op the per-module path runs (the same int4 op, the same functions above, the
// same adds), in the same order, so both give the same bits; what goes is the Python
// between them: about twenty calls a layer.

namespace decode_ops {

// One prepacked int4 linear: what kernels/cpu_int4.py's int4pack_linear computes.
struct Int4Linear {
  torch::Tensor packed, scales_zeros;
  int64_t group_size, out_features;
  c10::optional<torch::Tensor> bias;
};

inline torch::Tensor int4_linear(const torch::Tensor& x, const Int4Linear& w) {
  auto rows = x.reshape({-1, x.size(-1)});
  const int64_t in_features = rows.size(1);
  if (in_features % w.group_size) {
    const int64_t padded = (in_features / w.group_size + 1) * w.group_size;
    rows = at::constant_pad_nd(rows, {0, padded - in_features});
  }
  auto y = at::_weight_int4pack_mm_for_cpu(rows.contiguous(), w.packed, w.group_size,
                                           w.scales_zeros);
  if (y.size(1) != w.out_features) y = y.narrow(1, 0, w.out_features);
  if (w.bias.has_value()) y = y + *w.bias;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.out_features;
  return y.reshape(shape);
}

// Python passes each linear as (packed, scales_zeros, bias or None) plus its group size
// and output features.
inline std::vector<Int4Linear> unpack_linears(const std::vector<torch::Tensor>& packed,
                                              const std::vector<torch::Tensor>& scales_zeros,
                                              const std::vector<c10::optional<torch::Tensor>>& biases,
                                              const std::vector<int64_t>& group_sizes,
                                              const std::vector<int64_t>& out_features) {
  TORCH_CHECK(packed.size() == scales_zeros.size() && packed.size() == biases.size() &&
              packed.size() == group_sizes.size() && packed.size() == out_features.size(),
              "cpu_decode: one packed weight, scales, bias, group size and width per linear");
  std::vector<Int4Linear> linears;
  for (size_t i = 0; i < packed.size(); ++i)
    linears.push_back({packed[i], scales_zeros[i], group_sizes[i], out_features[i], biases[i]});
  return linears;
}

inline torch::Tensor heads_view(const torch::Tensor& y, int64_t head_dim) {
  return y.view({1, 1, -1, head_dim}).transpose(1, 2);
}

}  // namespace decode_ops

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values,
                               double scale, c10::optional<torch::Tensor> mask);

// input norm, q/k/v projections, rotary embedding: (query, key, value) for the cache.
std::vector<torch::Tensor> layer_qkv(torch::Tensor hidden, torch::Tensor norm_weight, double eps,
                                     std::vector<torch::Tensor> packed,
                                     std::vector<torch::Tensor> scales_zeros,
                                     std::vector<c10::optional<torch::Tensor>> biases,
                                     std::vector<int64_t> group_sizes,
                                     std::vector<int64_t> out_features, torch::Tensor cos,
                                     torch::Tensor sin, int64_t head_dim) {
  const auto linears = decode_ops::unpack_linears(packed, scales_zeros, biases, group_sizes,
                                                  out_features);
  TORCH_CHECK(linears.size() == 3, "cpu_decode.layer_qkv: q, k and v");
  const auto x = rms_norm(hidden, norm_weight, eps);
  const auto query = decode_ops::heads_view(decode_ops::int4_linear(x, linears[0]), head_dim);
  const auto key = decode_ops::heads_view(decode_ops::int4_linear(x, linears[1]), head_dim);
  const auto value = decode_ops::heads_view(decode_ops::int4_linear(x, linears[2]), head_dim);
  return {rope(query, cos, sin), rope(key, cos, sin), value};
}

// attention, output projection, residual; post-attention norm, SiLU MLP, residual.
torch::Tensor layer_rest(torch::Tensor hidden, torch::Tensor query, torch::Tensor keys,
                         torch::Tensor values, double scale, torch::Tensor norm_weight,
                         double eps, std::vector<torch::Tensor> packed,
                         std::vector<torch::Tensor> scales_zeros,
                         std::vector<c10::optional<torch::Tensor>> biases,
                         std::vector<int64_t> group_sizes, std::vector<int64_t> out_features) {
  const auto linears = decode_ops::unpack_linears(packed, scales_zeros, biases, group_sizes,
                                                  out_features);
  TORCH_CHECK(linears.size() == 4, "cpu_decode.layer_rest: o, gate, up and down");
  const auto attended = decode_attention(query, keys, values, scale, c10::nullopt);
  const auto mid = hidden + decode_ops::int4_linear(attended, linears[0]);
  const auto x = rms_norm(mid, norm_weight, eps);
  const auto gate = decode_ops::int4_linear(x, linears[1]);
  const auto up = decode_ops::int4_linear(x, linears[2]);
  return mid + decode_ops::int4_linear(silu_mul(gate, up), linears[3]);
}
