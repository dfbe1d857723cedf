// onnxruntime custom ops for flagc's kernels, domain "ai.flagc", loaded with
// SessionOptions.register_custom_ops_library (runtimes/kernels/__init__.py).
//
//   DecodeAttention(QKV [B, 1, (H + 2 KV) D], past_key, past_value [B, KV, S, D],
//                   cache_length [B] int32, cos, sin [P, D / 2]) -> Y [B, 1, H D],
//                   present_key, present_value (float32 throughout)
//     attributes num_heads H, kv_num_heads KV, scale (0: 1 / sqrt(D)), rotary_interleaved.
//     One decode token per row: rotary by position cache_length, its key and value written
//     into slot cache_length of the caches, attention over slots 0..cache_length
//     (decode_attention.cc). Present and past are meant to be one buffer (bound to the same
//     memory, as onnxruntime's GroupQueryAttention with past_present_share_buffer); otherwise
//     past is copied into present first. Rows and key/value heads split over onnxruntime's
//     intra-op threads. CPU provider.
//
//   QGemv(X [..., K] float32, P uint8 [ceil(N / 16), ceil(K / 32), record], B [N],
//         Skip [..., K], Gamma [K]; B, Skip, Gamma optional) -> Y [..., N'], Sum [..., K]
//     attributes N, K, bits (4 or 8), gated (default 0). Y = X W^T + B for W [N, K]
//     block-quantized in qgemv.cc's packed layout (16-row tiles, float16 scale and offset per
//     block of 32), the activations quantized per block of 32 to int8; gated=1: W holds gate
//     rows then up rows (N / 2 each, a multiple of 16), N' = N / 2 and
//     Y = silu(X W_gate^T + B_gate) * (X W_up^T + B_up). With Gamma [K] (inputs 3 and 4,
//     Skip optional): the product reads RMSNorm(X + Skip) * Gamma (attribute epsilon) instead
//     of X, and output 1 (optional) is X + Skip, as onnxruntime's
//     SkipSimplifiedLayerNormalization computes them. Split over onnxruntime's intra-op
//     threads by tiles. CPU provider.
//
//   PackedAttention(QKV [T, 3 H D] float32, cu_seqlens [B + 1] int64) -> Y [T, H D]
//     attributes num_heads H, scale (0: 1 / sqrt(D)). Self-attention of B sequences packed
//     one after another (sequence b: rows cu_seqlens[b] .. cu_seqlens[b + 1]), each token
//     attending to its own sequence's tokens (packed_attention.cc). Sequences and heads split
//     over onnxruntime's intra-op threads. CPU provider.
//
//   DecodeGemv(X [..., K] fp16, W [N, K] fp16, B [N] fp16 optional) -> Y [..., N'] fp16
//     attribute gated (int, default 0): 0 -> Y = X W^T + B, N' = N;
//                                       1 -> W holds gate rows then up rows, N' = N / 2,
//                                            Y = silu(X W_gate^T + B_gate) * (X W_up^T + B_up)
//     CUDA provider (decode_gemv.cu, on onnxruntime's compute stream, so it is captured into
//     CUDA graphs like any built-in kernel), when the library is built with nvcc; and the CPU
//     provider (a plain loop with the same rounding), so graphs using it run, and are tested,
//     without a GPU.
//
// Written against onnxruntime's C API (third_party/onnxruntime_c_api.h), which keeps its ABI
// across releases: everything used here exists since API version 17 (onnxruntime 1.17, which
// added KernelContext_ParallelFor), so the ops ask for that version and run on any
// onnxruntime since.

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

int flagc_decode_attention_check(const int32_t* cache_length, int64_t batch, int64_t max_seq,
                                 int64_t positions);
void flagc_decode_attention_unit(const float* qkv, float* key_cache, float* value_cache,
                                 const int32_t* cache_length, const float* cos,
                                 const float* sin, float* out, int64_t heads, int64_t kv_heads,
                                 int64_t d, int64_t max_seq, float scale, bool interleaved,
                                 int64_t b, int64_t g);

void flagc_packed_attention_unit(const float* qkv, const int64_t* cu_seqlens, float* out,
                                 int64_t heads, int64_t d, float scale, int64_t b, int64_t h);

const uint8_t* flagc_arena_copy(const uint8_t* src, size_t bytes);
void flagc_arena_release(const uint8_t* copy);
int64_t flagc_qgemv_tile_bytes(int bits);
void flagc_qgemv_quantize(const float* x, int64_t rows, int64_t k, int64_t nb, int8_t* xq,
                          float* sx, float* sums);
void flagc_qgemv_tiles(const uint8_t* packed, int bits, int64_t n, int64_t nb, bool gated,
                       const int8_t* xq, const float* sx, const float* sums, const float* bias,
                       float* y, int64_t rows, int64_t tile_begin, int64_t tile_end);

#ifdef FLAGC_WITH_CUDA
extern "C" int flagc_decode_gemv(const void* x, const void* w, const void* bias, void* y,
                                 int64_t m, int64_t n_w, int64_t k, int gated, void* stream);
#endif

namespace {

constexpr uint32_t kApiVersion = 17;  // KernelContext_ParallelFor arrived in 17
const OrtApi* g_api = nullptr;

#define FLAGC_TRY(expr)                     \
  do {                                      \
    OrtStatus* status_ = (expr);            \
    if (status_ != nullptr) return status_; \
  } while (0)

OrtStatus* fail(const char* op, const std::string& message) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string("ai.flagc.") + op + ": " +
                                                    message).c_str());
}

OrtStatus* shape_of(const OrtValue* value, std::vector<int64_t>* dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  FLAGC_TRY(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = g_api->GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    dims->assign(rank, 0);
    status = g_api->GetDimensions(info, dims->data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

std::string dims_text(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

template <typename T>
OrtStatus* data_of(const OrtValue* value, T** out) {
  void* p = nullptr;
  FLAGC_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &p));
  *out = static_cast<T*>(p);
  return nullptr;
}

// An attribute's value, `fallback` when the node does not set it (`get`: the C API's getter).
template <typename T, typename Get>
T attribute(const OrtKernelInfo* info, const char* name, T fallback, Get get) {
  T v = fallback;
  if (OrtStatus* missing = get(info, name, &v)) {
    g_api->ReleaseStatus(missing);
    return fallback;
  }
  return v;
}

int64_t int_attribute(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  return attribute(info, name, fallback, g_api->KernelInfoGetAttribute_int64);
}

float float_attribute(const OrtKernelInfo* info, const char* name, float fallback) {
  return attribute(info, name, fallback, g_api->KernelInfoGetAttribute_float);
}

// Every op's kernel: onnxruntime's compute and destroy callbacks get only this pointer.
struct Kernel {
  virtual ~Kernel() = default;
  virtual OrtStatus* compute(OrtKernelContext* context) const = 0;
};

// fn(i) for i in [0, count), on onnxruntime's intra-op threads.
template <typename Fn>
OrtStatus* parallel_for(OrtKernelContext* context, size_t count, const Fn& fn) {
  return g_api->KernelContext_ParallelFor(
      context, [](void* data, size_t i) { (*static_cast<const Fn*>(data))(i); }, count, 0,
      const_cast<Fn*>(&fn));
}

// ---- DecodeGemv ----------------------------------------------------------------------------

float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, sizeof v);
  return static_cast<float>(v);
}

uint16_t float_to_half(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // round to nearest even
  uint16_t h;
  std::memcpy(&h, &v, sizeof h);
  return h;
}

void cpu_gemv(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y,
              int64_t m, int64_t n_w, int64_t k, bool gated) {
  const int64_t n_out = gated ? n_w / 2 : n_w;
  std::vector<float> xf(k);
  auto dot = [&](int64_t n) {
    float acc = 0.f;
    for (int64_t i = 0; i < k; ++i) acc += xf[i] * half_to_float(w[n * k + i]);
    return bias ? acc + half_to_float(bias[n]) : acc;
  };
  auto round16 = [](float v) { return half_to_float(float_to_half(v)); };
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < k; ++i) xf[i] = half_to_float(x[r * k + i]);
    for (int64_t n = 0; n < n_out; ++n) {
      if (!gated) {
        y[r * n_out + n] = float_to_half(dot(n));
        continue;
      }
      const float g = round16(dot(n));
      const float silu = round16(g / (1.f + std::exp(-g)));
      y[r * n_out + n] = float_to_half(silu * round16(dot(n + n_out)));
    }
  }
}

struct GemvKernel : Kernel {
  GemvKernel(bool gated, bool cuda) : gated(gated), cuda(cuda) {}
  OrtStatus* compute(OrtKernelContext* context) const override;
  bool gated, cuda;
};

OrtStatus* GemvKernel::compute(OrtKernelContext* context) const {
  const GemvKernel& kernel = *this;
  const char* op = "DecodeGemv";
  size_t n_inputs = 0;
  FLAGC_TRY(g_api->KernelContext_GetInputCount(context, &n_inputs));
  const OrtValue *x = nullptr, *w = nullptr, *b = nullptr;
  FLAGC_TRY(g_api->KernelContext_GetInput(context, 0, &x));
  FLAGC_TRY(g_api->KernelContext_GetInput(context, 1, &w));
  if (n_inputs > 2) FLAGC_TRY(g_api->KernelContext_GetInput(context, 2, &b));
  std::vector<int64_t> x_dims, w_dims, b_dims;
  FLAGC_TRY(shape_of(x, &x_dims));
  FLAGC_TRY(shape_of(w, &w_dims));
  if (x_dims.empty() || w_dims.size() != 2 || x_dims.back() != w_dims[1])
    return fail(op, "X " + dims_text(x_dims) + " and W " + dims_text(w_dims) +
                        " do not multiply (W must be [N, K] with K = X's last dimension)");
  const int64_t k = w_dims[1], n_w = w_dims[0];
  if (kernel.gated && n_w % 2 != 0)
    return fail(op, "gated=1 needs W's rows to be gate rows then up rows (an even count), "
                    "got " + dims_text(w_dims));
  if (b) {
    FLAGC_TRY(shape_of(b, &b_dims));
    if (b_dims.size() != 1 || b_dims[0] != n_w)
      return fail(op, "B " + dims_text(b_dims) + " must be [" + std::to_string(n_w) + "]");
  }
  int64_t m = 1;
  for (size_t i = 0; i + 1 < x_dims.size(); ++i) m *= x_dims[i];
  std::vector<int64_t> y_dims = x_dims;
  y_dims.back() = kernel.gated ? n_w / 2 : n_w;
  OrtValue* y = nullptr;
  FLAGC_TRY(g_api->KernelContext_GetOutput(context, 0, y_dims.data(), y_dims.size(), &y));
  if (m == 0) return nullptr;
  uint16_t *xp = nullptr, *wp = nullptr, *bp = nullptr, *yp = nullptr;
  FLAGC_TRY(data_of(x, &xp));
  FLAGC_TRY(data_of(w, &wp));
  if (b) FLAGC_TRY(data_of(b, &bp));
  FLAGC_TRY(data_of(y, &yp));
  if (!kernel.cuda) {
    cpu_gemv(xp, wp, bp, yp, m, n_w, k, kernel.gated);
    return nullptr;
  }
#ifdef FLAGC_WITH_CUDA
  void* stream = nullptr;
  FLAGC_TRY(g_api->KernelContext_GetGPUComputeStream(context, &stream));
  const int rc = flagc_decode_gemv(xp, wp, bp, yp, m, n_w, k, kernel.gated ? 1 : 0, stream);
  if (rc == -1)
    return fail(op, "K = " + std::to_string(k) + " must be a multiple of 8 and X and W "
                    "16-byte aligned");
  if (rc != 0)
    return g_api->CreateStatus(ORT_FAIL, ("ai.flagc.DecodeGemv: CUDA error " +
                                          std::to_string(rc)).c_str());
#endif
  return nullptr;
}

OrtStatus* gemv_create(const OrtKernelInfo* info, bool cuda, void** out) {
  const int64_t gated = int_attribute(info, "gated", 0);
  if (gated != 0 && gated != 1) return fail("DecodeGemv", "attribute gated must be 0 or 1");
  *out = static_cast<Kernel*>(new GemvKernel(gated == 1, cuda));
  return nullptr;
}

// ---- QGemv ---------------------------------------------------------------------------------

struct QGemvKernel : Kernel {
  QGemvKernel(int64_t n, int64_t k, int bits, bool gated, float epsilon)
      : n(n), k(k), bits(bits), gated(gated), epsilon(epsilon) {}
  ~QGemvKernel() override { flagc_arena_release(weights); }
  OrtStatus* compute(OrtKernelContext* context) const override;
  int64_t n, k;
  int bits;
  bool gated;
  float epsilon;
  // The packed weights in huge pages (weight_arena.cc), when they are a constant initializer
  const uint8_t* weights = nullptr;
  size_t weight_bytes = 0;
};

// h = x (+ skip) into `sum` when given; out = h / sqrt(mean(h^2) + epsilon) * gamma, per row
// (onnxruntime's SkipSimplifiedLayerNormalization, float32 throughout).
void rms_norm_rows(const float* x, const float* skip, const float* gamma, float epsilon,
                   int64_t rows, int64_t k, float* sum, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    float* h = sum ? sum + r * k : out + r * k;
    for (int64_t i = 0; i < k; ++i) h[i] = skip ? xr[i] + skip[r * k + i] : xr[i];
    float squares = 0.f;
    for (int64_t i = 0; i < k; ++i) squares += h[i] * h[i];
    const float inv = 1.f / std::sqrt(squares / static_cast<float>(k) + epsilon);
    for (int64_t i = 0; i < k; ++i) out[r * k + i] = h[i] * inv * gamma[i];
  }
}

constexpr int64_t kTilesPerTask = 4;  // 64 rows: small enough to balance two threads at N=576

OrtStatus* QGemvKernel::compute(OrtKernelContext* context) const {
  const char* op = "QGemv";
  size_t n_inputs = 0;
  FLAGC_TRY(g_api->KernelContext_GetInputCount(context, &n_inputs));
  const OrtValue *x = nullptr, *p = nullptr, *b = nullptr, *skip = nullptr, *gamma = nullptr;
  FLAGC_TRY(g_api->KernelContext_GetInput(context, 0, &x));
  FLAGC_TRY(g_api->KernelContext_GetInput(context, 1, &p));
  if (n_inputs > 2) FLAGC_TRY(g_api->KernelContext_GetInput(context, 2, &b));
  if (n_inputs > 3) FLAGC_TRY(g_api->KernelContext_GetInput(context, 3, &skip));
  if (n_inputs > 4) FLAGC_TRY(g_api->KernelContext_GetInput(context, 4, &gamma));
  std::vector<int64_t> x_dims, p_dims, b_dims, dims;
  FLAGC_TRY(shape_of(x, &x_dims));
  FLAGC_TRY(shape_of(p, &p_dims));
  if (skip && !gamma) return fail(op, "Skip needs Gamma (the norm it is added before)");
  if (skip) {
    FLAGC_TRY(shape_of(skip, &dims));
    if (dims != x_dims)
      return fail(op, "Skip " + dims_text(dims) + " must have X's shape " + dims_text(x_dims));
  }
  if (gamma) {
    FLAGC_TRY(shape_of(gamma, &dims));
    if (dims != std::vector<int64_t>{k})
      return fail(op, "Gamma " + dims_text(dims) + " must be [" + std::to_string(k) + "]");
  }
  const int64_t tiles = (n + 15) / 16, nb = (k + 31) / 32;
  if (x_dims.empty() || x_dims.back() != k)
    return fail(op, "X " + dims_text(x_dims) + " must end in K = " + std::to_string(k));
  const std::vector<int64_t> want{tiles, nb, flagc_qgemv_tile_bytes(bits)};
  if (p_dims != want)
    return fail(op, "packed weights " + dims_text(p_dims) + " must be " + dims_text(want) +
                        " for N = " + std::to_string(n) + ", K = " + std::to_string(k) +
                        ", bits = " + std::to_string(bits));
  if (b) {
    FLAGC_TRY(shape_of(b, &b_dims));
    if (b_dims != std::vector<int64_t>{n})
      return fail(op, "B " + dims_text(b_dims) + " must be [" + std::to_string(n) + "]");
  }
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < x_dims.size(); ++i) rows *= x_dims[i];
  const int64_t n_out = gated ? n / 2 : n;
  std::vector<int64_t> y_dims = x_dims;
  y_dims.back() = n_out;
  OrtValue* y = nullptr;
  FLAGC_TRY(g_api->KernelContext_GetOutput(context, 0, y_dims.data(), y_dims.size(), &y));
  if (rows == 0) return nullptr;
  float *xp = nullptr, *bp = nullptr, *yp = nullptr;
  const uint8_t* packed = nullptr;
  FLAGC_TRY(data_of(x, &xp));
  FLAGC_TRY(data_of(p, &packed));
  if (weights != nullptr) packed = weights;  // the same bytes, in huge pages
  if (b) FLAGC_TRY(data_of(b, &bp));
  FLAGC_TRY(data_of(y, &yp));
  thread_local std::vector<float> normed;
  if (gamma) {  // the norm before the product: X (+ Skip) normalized, the sum as output 1
    float *skip_p = nullptr, *gamma_p = nullptr, *sum_p = nullptr;
    if (skip) FLAGC_TRY(data_of(skip, &skip_p));
    FLAGC_TRY(data_of(gamma, &gamma_p));
    size_t n_outputs = 0;
    FLAGC_TRY(g_api->KernelContext_GetOutputCount(context, &n_outputs));
    if (n_outputs > 1) {
      OrtValue* sum = nullptr;
      FLAGC_TRY(g_api->KernelContext_GetOutput(context, 1, x_dims.data(), x_dims.size(), &sum));
      if (sum) FLAGC_TRY(data_of(sum, &sum_p));
    }
    normed.resize(static_cast<size_t>(rows * k));
    rms_norm_rows(xp, skip_p, gamma_p, epsilon, rows, k, sum_p, normed.data());
    xp = normed.data();
  }
  // the activations' codes, scales and block sums: a few KB per row, reused per call
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> scales;
  xq.resize(static_cast<size_t>(rows * nb * 32));
  scales.resize(static_cast<size_t>(2 * rows * nb));
  // pointers, not the thread_local names: the tasks run on other threads
  const int8_t* codes = xq.data();
  const float *sx = scales.data(), *sums = scales.data() + rows * nb;
  flagc_qgemv_quantize(xp, rows, k, nb, xq.data(), scales.data(), scales.data() + rows * nb);
  const int64_t out_tiles = (n_out + 15) / 16;
  const size_t tasks = static_cast<size_t>((out_tiles + kTilesPerTask - 1) / kTilesPerTask);
  // each task: a run of output tiles for every activation row
  return parallel_for(context, tasks, [&](size_t i) {
    const int64_t begin = static_cast<int64_t>(i) * kTilesPerTask;
    flagc_qgemv_tiles(packed, bits, n_out, nb, gated, codes, sx, sums, bp, yp, rows, begin,
                      std::min(out_tiles, begin + kTilesPerTask));
  });
}

OrtStatus* qgemv_create(const OrtKernelInfo* info, bool, void** out) {
  const int64_t n = int_attribute(info, "N", 0), k = int_attribute(info, "K", 0);
  const int64_t bits = int_attribute(info, "bits", 0), gated = int_attribute(info, "gated", 0);
  const float epsilon = float_attribute(info, "epsilon", 1e-5f);
  if (n <= 0 || k <= 0 || (bits != 4 && bits != 8))
    return fail("QGemv", "attributes N (" + std::to_string(n) + ") and K (" +
                             std::to_string(k) + ") must be positive and bits (" +
                             std::to_string(bits) + ") 4 or 8");
  if (gated != 0 && (gated != 1 || n % 32 != 0))
    return fail("QGemv", "gated=1 needs N (" + std::to_string(n) + ") to be gate rows then "
                         "up rows, a multiple of 16 each (gated must be 0 or 1)");
  auto* kernel = new QGemvKernel(n, k, static_cast<int>(bits), gated == 1, epsilon);
  *out = static_cast<Kernel*>(kernel);
  int constant = 0;
  const OrtValue* packed = nullptr;
  if (OrtStatus* no = g_api->KernelInfoGetConstantInput_tensor(info, 1, &constant, &packed)) {
    g_api->ReleaseStatus(no);  // not a constant: read the input every call
    return nullptr;
  }
  if (!constant || packed == nullptr) return nullptr;
  std::vector<int64_t> dims;
  uint8_t* data = nullptr;
  const std::vector<int64_t> want{(n + 15) / 16, (k + 31) / 32,
                                  flagc_qgemv_tile_bytes(static_cast<int>(bits))};
  FLAGC_TRY(shape_of(packed, &dims));
  if (dims != want) return nullptr;  // compute names the mismatch
  FLAGC_TRY(data_of(packed, &data));
  kernel->weight_bytes = static_cast<size_t>(dims[0] * dims[1] * dims[2]);
  kernel->weights = flagc_arena_copy(data, kernel->weight_bytes);
  return nullptr;
}

// ---- DecodeAttention -----------------------------------------------------------------------

struct AttentionKernel : Kernel {
  AttentionKernel(int64_t heads, int64_t kv_heads, float scale, bool interleaved)
      : heads(heads), kv_heads(kv_heads), scale(scale), interleaved(interleaved) {}
  OrtStatus* compute(OrtKernelContext* context) const override;
  int64_t heads, kv_heads;
  float scale;
  bool interleaved;
};

OrtStatus* AttentionKernel::compute(OrtKernelContext* context) const {
  const char* op = "DecodeAttention";
  const OrtValue* in[6] = {};
  std::vector<int64_t> dims[6];
  for (size_t i = 0; i < 6; ++i) {
    FLAGC_TRY(g_api->KernelContext_GetInput(context, i, &in[i]));
    FLAGC_TRY(shape_of(in[i], &dims[i]));
  }
  const std::vector<int64_t>& cache = dims[1];
  if (cache.size() != 4 || cache[1] != kv_heads || dims[2] != cache)
    return fail(op, "past_key " + dims_text(cache) + " and past_value " + dims_text(dims[2]) +
                        " must both be [batch, " + std::to_string(kv_heads) +
                        ", max_seq, head_dim]");
  const int64_t batch = cache[0], max_seq = cache[2], d = cache[3];
  const int64_t width = (heads + 2 * kv_heads) * d;
  if (dims[0] != std::vector<int64_t>{batch, 1, width})
    return fail(op, "QKV " + dims_text(dims[0]) + " must be [" + std::to_string(batch) +
                        ", 1, " + std::to_string(width) + "] (one token of packed q|k|v)");
  if (dims[3] != std::vector<int64_t>{batch})
    return fail(op, "cache_length " + dims_text(dims[3]) + " must be [" +
                        std::to_string(batch) + "]");
  if (dims[4].size() != 2 || dims[4][1] * 2 != d || dims[5] != dims[4])
    return fail(op, "cos " + dims_text(dims[4]) + " and sin " + dims_text(dims[5]) +
                        " must be [positions, " + std::to_string(d / 2) + "]");
  const std::vector<int64_t> y_dims{batch, 1, heads * d};
  OrtValue *y = nullptr, *present_k = nullptr, *present_v = nullptr;
  FLAGC_TRY(g_api->KernelContext_GetOutput(context, 0, y_dims.data(), 3, &y));
  FLAGC_TRY(g_api->KernelContext_GetOutput(context, 1, cache.data(), 4, &present_k));
  FLAGC_TRY(g_api->KernelContext_GetOutput(context, 2, cache.data(), 4, &present_v));
  float *qkv, *past_k, *past_v, *cos, *sin, *yp, *kp, *vp;
  int32_t* lengths;
  FLAGC_TRY(data_of(in[0], &qkv));
  FLAGC_TRY(data_of(in[1], &past_k));
  FLAGC_TRY(data_of(in[2], &past_v));
  FLAGC_TRY(data_of(in[3], &lengths));
  FLAGC_TRY(data_of(in[4], &cos));
  FLAGC_TRY(data_of(in[5], &sin));
  FLAGC_TRY(data_of(y, &yp));
  FLAGC_TRY(data_of(present_k, &kp));
  FLAGC_TRY(data_of(present_v, &vp));
  const size_t bytes = static_cast<size_t>(batch * kv_heads * max_seq * d) * sizeof(float);
  if (kp != past_k) std::memcpy(kp, past_k, bytes);  // not one shared buffer: carry the past
  if (vp != past_v) std::memcpy(vp, past_v, bytes);
  if (flagc_decode_attention_check(lengths, batch, max_seq, dims[4][0]) != 0)
    return fail(op, "a cache_length leaves no slot below max_seq " + std::to_string(max_seq) +
                        " or no rotary position below " + std::to_string(dims[4][0]));
  const float s = scale != 0.f ? scale : 1.f / std::sqrt(static_cast<float>(d));
  // each task: one (row, key/value head) of the step
  return parallel_for(context, static_cast<size_t>(batch * kv_heads), [&](size_t i) {
    const int64_t unit = static_cast<int64_t>(i);
    flagc_decode_attention_unit(qkv, kp, vp, lengths, cos, sin, yp, heads, kv_heads, d, max_seq,
                                s, interleaved, unit / kv_heads, unit % kv_heads);
  });
}

OrtStatus* attention_create(const OrtKernelInfo* info, bool, void** out) {
  const int64_t heads = int_attribute(info, "num_heads", 0);
  const int64_t kv_heads = int_attribute(info, "kv_num_heads", 0);
  if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0)
    return fail("DecodeAttention", "num_heads (" + std::to_string(heads) + ") must be a "
                "positive multiple of kv_num_heads (" + std::to_string(kv_heads) + ")");
  *out = static_cast<Kernel*>(new AttentionKernel(
      heads, kv_heads, float_attribute(info, "scale", 0.f),
      int_attribute(info, "rotary_interleaved", 0) != 0));
  return nullptr;
}

// ---- PackedAttention -----------------------------------------------------------------------

struct PackedAttentionKernel : Kernel {
  PackedAttentionKernel(int64_t heads, float scale) : heads(heads), scale(scale) {}
  OrtStatus* compute(OrtKernelContext* context) const override;
  int64_t heads;
  float scale;
};

OrtStatus* PackedAttentionKernel::compute(OrtKernelContext* context) const {
  const char* op = "PackedAttention";
  const OrtValue *qkv = nullptr, *cu = nullptr;
  FLAGC_TRY(g_api->KernelContext_GetInput(context, 0, &qkv));
  FLAGC_TRY(g_api->KernelContext_GetInput(context, 1, &cu));
  std::vector<int64_t> qkv_dims, cu_dims;
  FLAGC_TRY(shape_of(qkv, &qkv_dims));
  FLAGC_TRY(shape_of(cu, &cu_dims));
  if (qkv_dims.size() != 2 || qkv_dims[1] % (3 * heads) != 0)
    return fail(op, "QKV " + dims_text(qkv_dims) + " must be [tokens, 3 * " +
                        std::to_string(heads) + " heads * head_dim]");
  if (cu_dims.size() != 1 || cu_dims[0] < 1)
    return fail(op, "cu_seqlens " + dims_text(cu_dims) + " must be [sequences + 1]");
  const int64_t tokens = qkv_dims[0], d = qkv_dims[1] / (3 * heads);
  const int64_t batch = cu_dims[0] - 1;
  const int64_t* offsets = nullptr;
  FLAGC_TRY(data_of(cu, &offsets));
  for (int64_t b = 0; b <= batch; ++b)
    if (offsets[b] < 0 || offsets[b] > tokens || (b > 0 && offsets[b] < offsets[b - 1]) ||
        (b == 0 && offsets[0] != 0) || (b == batch && offsets[b] != tokens))
      return fail(op, "cu_seqlens must rise from 0 to the " + std::to_string(tokens) +
                          " tokens; entry " + std::to_string(b) + " is " +
                          std::to_string(offsets[b]));
  const std::vector<int64_t> y_dims{tokens, heads * d};
  OrtValue* y = nullptr;
  FLAGC_TRY(g_api->KernelContext_GetOutput(context, 0, y_dims.data(), 2, &y));
  float *qkv_p = nullptr, *yp = nullptr;
  FLAGC_TRY(data_of(qkv, &qkv_p));
  FLAGC_TRY(data_of(y, &yp));
  if (tokens == 0 || batch == 0) return nullptr;
  const float s = scale != 0.f ? scale : 1.f / std::sqrt(static_cast<float>(d));
  // each task: one (sequence, head)
  return parallel_for(context, static_cast<size_t>(batch * heads), [&](size_t i) {
    const int64_t unit = static_cast<int64_t>(i);
    flagc_packed_attention_unit(qkv_p, offsets, yp, heads, d, s, unit / heads, unit % heads);
  });
}

OrtStatus* packed_attention_create(const OrtKernelInfo* info, bool, void** out) {
  const int64_t heads = int_attribute(info, "num_heads", 0);
  if (heads <= 0)
    return fail("PackedAttention", "num_heads must be positive, got " + std::to_string(heads));
  *out = static_cast<Kernel*>(
      new PackedAttentionKernel(heads, float_attribute(info, "scale", 0.f)));
  return nullptr;
}

// ---- registration --------------------------------------------------------------------------

using Create = OrtStatus* (*)(const OrtKernelInfo*, bool, void**);

struct Op : OrtCustomOp {
  const char* name;
  bool cuda;
  std::vector<ONNXTensorElementDataType> inputs, outputs;
  size_t optional_from;         // inputs from this index on may be absent
  size_t optional_outputs_from;  // and outputs from this index on
  Create create;
};

const Op& self(const OrtCustomOp* op) { return *static_cast<const Op*>(op); }

Op make_op(const char* name, bool cuda, std::vector<ONNXTensorElementDataType> inputs,
           std::vector<ONNXTensorElementDataType> outputs, size_t optional_from,
           Create create, size_t optional_outputs_from = SIZE_MAX) {
  Op op{};
  op.version = kApiVersion;
  op.GetName = [](const OrtCustomOp* o) { return self(o).name; };
  op.GetExecutionProviderType = [](const OrtCustomOp* o) {
    return self(o).cuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
  };
  op.GetInputType = [](const OrtCustomOp* o, size_t i) { return self(o).inputs[i]; };
  op.GetInputTypeCount = [](const OrtCustomOp* o) { return self(o).inputs.size(); };
  op.GetOutputType = [](const OrtCustomOp* o, size_t i) { return self(o).outputs[i]; };
  op.GetOutputTypeCount = [](const OrtCustomOp* o) { return self(o).outputs.size(); };
  op.GetInputCharacteristic = [](const OrtCustomOp* o, size_t i) {
    return i >= self(o).optional_from ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  op.GetOutputCharacteristic = [](const OrtCustomOp* o, size_t i) {
    return i >= self(o).optional_outputs_from ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 0; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 0; };
  op.CreateKernelV2 = [](const OrtCustomOp* o, const OrtApi*, const OrtKernelInfo* info,
                         void** kernel) { return self(o).create(info, self(o).cuda, kernel); };
  op.KernelComputeV2 = [](void* kernel, OrtKernelContext* context) {
    return static_cast<const Kernel*>(kernel)->compute(context);
  };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
  op.name = name;
  op.cuda = cuda;
  op.inputs = std::move(inputs);
  op.outputs = std::move(outputs);
  op.optional_from = optional_from;
  op.optional_outputs_from = optional_outputs_from;
  op.create = create;
  return op;
}

constexpr auto F16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto I32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
constexpr auto U8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr auto I64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;

// The ops outlive every session that uses them: static storage.
std::vector<Op>& ops() {
  static std::vector<Op> all = [] {
    std::vector<Op> v;
    v.push_back(make_op("DecodeGemv", false, {F16, F16, F16}, {F16}, 2, gemv_create));
    v.push_back(make_op("DecodeAttention", false, {F32, F32, F32, I32, F32, F32},
                        {F32, F32, F32}, 6, attention_create));
    v.push_back(make_op("QGemv", false, {F32, U8, F32, F32, F32}, {F32, F32}, 2, qgemv_create,
                        1));
    v.push_back(make_op("PackedAttention", false, {F32, I64}, {F32}, 2,
                        packed_attention_create));
#ifdef FLAGC_WITH_CUDA
    v.push_back(make_op("DecodeGemv", true, {F16, F16, F16}, {F16}, 2, gemv_create));
#endif
    return v;
  }();
  return all;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  g_api = api_base->GetApi(kApiVersion);
  if (g_api == nullptr) {
    std::fprintf(stderr, "flagc kernels: need onnxruntime 1.17 or newer (C API version %u)\n",
                 kApiVersion);
    return nullptr;  // no API to report through; session creation then names the unknown op
  }
  OrtCustomOpDomain* domain = nullptr;
  FLAGC_TRY(g_api->CreateCustomOpDomain("ai.flagc", &domain));
  for (Op& op : ops()) FLAGC_TRY(g_api->CustomOpDomain_Add(domain, &op));
  return g_api->AddCustomOpDomain(options, domain);
}
