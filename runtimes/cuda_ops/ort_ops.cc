// onnxruntime custom ops for flagc's kernels, domain "ai.flagc", loaded with
// SessionOptions.register_custom_ops_library (runtimes/cuda_ops/__init__.py).
//
//   DecodeGemv(X [..., K] fp16, W [N, K] fp16, B [N] fp16 optional) -> Y [..., N'] fp16
//     attribute gated (int, default 0): 0 -> Y = X W^T + B, N' = N;
//                                       1 -> W holds gate rows then up rows, N' = N / 2,
//                                            Y = silu(X W_gate^T + B_gate) * (X W_up^T + B_up)
//
// Registered for the CUDA provider (decode_gemv.cu, on onnxruntime's compute stream, so it is
// captured into CUDA graphs like any built-in kernel) and for the CPU provider (a plain loop with
// the same rounding), so a graph using the op also runs, and is tested, on a machine without a
// GPU. Written against onnxruntime's C API (third_party/onnxruntime_c_api.h), which keeps its
// ABI across releases: everything used here exists since API version 16 (onnxruntime 1.16), so
// the ops ask for that version and run on any onnxruntime since.

#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

extern "C" int flagc_decode_gemv(const void* x, const void* w, const void* bias, void* y,
                                 int64_t m, int64_t n_w, int64_t k, int gated, void* stream);

namespace {

constexpr uint32_t kApiVersion = 16;  // CreateKernelV2 / KernelComputeV2 arrived in 16
const OrtApi* g_api = nullptr;

struct Kernel {
  bool gated;
  bool cuda;
};

OrtStatus* fail(const std::string& message) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, ("ai.flagc.DecodeGemv: " + message).c_str());
}

#define FLAGC_TRY(expr)                  \
  do {                                   \
    OrtStatus* status_ = (expr);         \
    if (status_ != nullptr) return status_; \
  } while (0)

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

void cpu_gemv(const __half* x, const __half* w, const __half* bias, __half* y, int64_t m,
              int64_t n_w, int64_t k, bool gated) {
  const int64_t n_out = gated ? n_w / 2 : n_w;
  auto dot = [&](int64_t r, int64_t n) {
    float acc = 0.f;
    for (int64_t i = 0; i < k; ++i)
      acc += __half2float(x[r * k + i]) * __half2float(w[n * k + i]);
    return bias ? acc + __half2float(bias[n]) : acc;
  };
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t n = 0; n < n_out; ++n) {
      if (!gated) {
        y[r * n_out + n] = __float2half(dot(r, n));
        continue;
      }
      const float g16 = __half2float(__float2half(dot(r, n)));
      const float silu = __half2float(__float2half(g16 / (1.f + std::exp(-g16))));
      const float up = __half2float(__float2half(dot(r, n + n_out)));
      y[r * n_out + n] = __float2half(silu * up);
    }
  }
}

OrtStatus* ORT_API_CALL compute(void* op_kernel, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<Kernel*>(op_kernel);
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
    return fail("X " + dims_text(x_dims) + " and W " + dims_text(w_dims) +
                " do not multiply (W must be [N, K] with K = X's last dimension)");
  const int64_t k = w_dims[1], n_w = w_dims[0];
  if (kernel.gated && n_w % 2 != 0)
    return fail("gated=1 needs W's rows to be gate rows then up rows (an even count), got " +
                dims_text(w_dims));
  if (b) {
    FLAGC_TRY(shape_of(b, &b_dims));
    if (b_dims.size() != 1 || b_dims[0] != n_w)
      return fail("B " + dims_text(b_dims) + " must be [" + std::to_string(n_w) + "]");
  }
  int64_t m = 1;
  for (size_t i = 0; i + 1 < x_dims.size(); ++i) m *= x_dims[i];
  std::vector<int64_t> y_dims = x_dims;
  y_dims.back() = kernel.gated ? n_w / 2 : n_w;
  OrtValue* y = nullptr;
  FLAGC_TRY(g_api->KernelContext_GetOutput(context, 0, y_dims.data(), y_dims.size(), &y));
  if (m == 0) return nullptr;
  void *xp = nullptr, *wp = nullptr, *bp = nullptr, *yp = nullptr;
  FLAGC_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(x), &xp));
  FLAGC_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(w), &wp));
  if (b) FLAGC_TRY(g_api->GetTensorMutableData(const_cast<OrtValue*>(b), &bp));
  FLAGC_TRY(g_api->GetTensorMutableData(y, &yp));
  if (!kernel.cuda) {
    cpu_gemv(static_cast<const __half*>(xp), static_cast<const __half*>(wp),
             static_cast<const __half*>(bp), static_cast<__half*>(yp), m, n_w, k, kernel.gated);
    return nullptr;
  }
  void* stream = nullptr;
  FLAGC_TRY(g_api->KernelContext_GetGPUComputeStream(context, &stream));
  const int rc = flagc_decode_gemv(xp, wp, bp, yp, m, n_w, k, kernel.gated ? 1 : 0, stream);
  if (rc == -1)
    return fail("K = " + std::to_string(k) + " must be a multiple of 8 and X and W 16-byte "
                "aligned");
  if (rc != 0)
    return g_api->CreateStatus(ORT_FAIL, ("ai.flagc.DecodeGemv: CUDA error " +
                                          std::to_string(rc)).c_str());
  return nullptr;
}

struct Op : OrtCustomOp {
  bool cuda;
};

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*,
                                      const OrtKernelInfo* info, void** out) {
  int64_t gated = 0;
  if (OrtStatus* missing = g_api->KernelInfoGetAttribute_int64(info, "gated", &gated))
    g_api->ReleaseStatus(missing);  // absent: the default, 0
  if (gated != 0 && gated != 1) return fail("attribute gated must be 0 or 1");
  *out = new Kernel{gated == 1, static_cast<const Op*>(op)->cuda};
  return nullptr;
}

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "DecodeGemv"; }
const char* ORT_API_CALL op_provider(const OrtCustomOp* op) {
  return static_cast<const Op*>(op)->cuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
}
ONNXTensorElementDataType ORT_API_CALL fp16_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 3; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp*, size_t i) {
  return i == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_kind(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL input_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }
int ORT_API_CALL zero(const OrtCustomOp*) { return 0; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return INT_MAX; }
size_t ORT_API_CALL no_pairs(int** in, int** out) {
  *in = *out = nullptr;
  return 0;
}
void ORT_API_CALL release_pairs(int*, int*) {}

Op make_op(bool cuda) {
  Op op{};
  op.version = kApiVersion;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = fp16_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = fp16_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = input_kind;
  op.GetOutputCharacteristic = output_kind;
  op.GetInputMemoryType = input_memory;
  op.GetVariadicInputMinArity = one;
  op.GetVariadicInputHomogeneity = zero;
  op.GetVariadicOutputMinArity = one;
  op.GetVariadicOutputHomogeneity = zero;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.GetStartVersion = one;
  op.GetEndVersion = end_version;
  op.GetMayInplace = no_pairs;
  op.ReleaseMayInplace = release_pairs;
  op.GetAliasMap = no_pairs;
  op.ReleaseAliasMap = release_pairs;
  op.cuda = cuda;
  return op;
}

// The ops outlive every session that uses them: static storage.
Op g_cuda_op = make_op(true);
Op g_cpu_op = make_op(false);

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  g_api = api_base->GetApi(kApiVersion);
  if (g_api == nullptr) {
    std::fprintf(stderr, "flagc CUDA ops: need onnxruntime 1.16 or newer (C API version %u)\n",
                 kApiVersion);
    return nullptr;  // no API to report through; session creation then names the unknown op
  }
  OrtCustomOpDomain* domain = nullptr;
  FLAGC_TRY(g_api->CreateCustomOpDomain("ai.flagc", &domain));
  FLAGC_TRY(g_api->CustomOpDomain_Add(domain, &g_cuda_op));
  FLAGC_TRY(g_api->CustomOpDomain_Add(domain, &g_cpu_op));
  return g_api->AddCustomOpDomain(options, domain);
}
