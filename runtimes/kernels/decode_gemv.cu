// Decode-step matrix-vector products for fp16 weights stored [N, K] (row-major, PyTorch's
// nn.Linear layout): y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for a few activation rows
// (the batch of one decode step), and the gated form of LLaMA's MLP, which reads the gate and
// up rows of a merged [2F, K] weight and writes silu(gate) * up directly.
//
// Why not cuBLAS: at one to eight activation rows a projection is a pure weight stream, and on
// the decode shapes of a 1 B model cuBLAS reaches 1.2-1.6 TB/s of an H100's 3.35
// (benchmarks/gpu_gemv_layout.py), splits K with a separate reduction kernel for the down
// projection, and leaves the gated activation to three more kernels (Split, SiLU, Mul). Here
// one warp owns one output feature and streams its weight row(s) with 16-byte loads that skip
// L1; the activations are tiny and stay in L1; a warp shuffle reduces; no workspace, one kernel.
//
// Rounding follows PyTorch's fp16 reference: each product is accumulated in fp32 and rounded to
// fp16 once; the gated form rounds gate and up to fp16, computes silu in fp32 and rounds, and
// multiplies two fp16 values (exact in fp32, rounded once), as F.silu(gate) * up does.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

#ifndef FLAGC_GEMV_WARPS
#define FLAGC_GEMV_WARPS 8
#endif
#ifndef FLAGC_GEMV_UNROLL
#define FLAGC_GEMV_UNROLL 8
#endif
constexpr int kWarpsPerBlock = FLAGC_GEMV_WARPS;
// 16-byte weight loads in flight per lane and weight row: 8 covers a 4 KB row (K = 2048) in one
// round trip to memory, which matters as much as bandwidth when a product takes 3-5 us.
constexpr int kUnroll = FLAGC_GEMV_UNROLL;
#ifndef FLAGC_GEMV_PDL
#define FLAGC_GEMV_PDL 1
#endif
constexpr int kMaxRows = 8;      // activation rows per launch; more rows run in chunks

__device__ __forceinline__ uint4 load_weights(const uint4* p) {
  // Weights are read once per step: don't let them evict the activations from L1.
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float dot8(uint4 w, uint4 x, float acc) {
  const __half2* wh = reinterpret_cast<const __half2*>(&w);
  const __half2* xh = reinterpret_cast<const __half2*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 wf = __half22float2(wh[i]);
    const float2 xf = __half22float2(xh[i]);
    acc = fmaf(wf.x, xf.x, acc);
    acc = fmaf(wf.y, xf.y, acc);
  }
  return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ROWS activation rows; GATED: w is [2 * n_out, K], gate rows first, output silu(gate) * up.
template <int ROWS, bool GATED>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
decode_gemv_kernel(const __half* __restrict__ x, const __half* __restrict__ w,
                   const __half* __restrict__ bias, __half* __restrict__ y,
                   int n_out, int k, int64_t ldx, int64_t ldy) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= n_out) return;
  const int k_vec = k >> 3;  // 16-byte vectors per weight row
  const uint4* w_gate = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(row) * k);
  const uint4* w_up =
      reinterpret_cast<const uint4*>(w + static_cast<int64_t>(row + n_out) * k);
  float acc[ROWS], acc_up[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = acc_up[r] = 0.f;
  uint4 wg[kUnroll], wu[kUnroll];
  auto load_group = [&](int base) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * 32;
      wg[u] = j < k_vec ? load_weights(w_gate + j) : make_uint4(0, 0, 0, 0);
      if (GATED) wu[u] = j < k_vec ? load_weights(w_up + j) : make_uint4(0, 0, 0, 0);
    }
  };
  // Programmatic dependent launch (Hopper): this grid may start while the kernel before it
  // finishes; the weights do not depend on it, so the first loads go out before waiting for it.
  load_group(lane);
#if FLAGC_GEMV_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  for (int base = lane; base < k_vec; base += 32 * kUnroll) {
    if (base != lane) load_group(base);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * 32;
      if (j >= k_vec) break;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + r * ldx) + j);
        acc[r] = dot8(wg[u], xv, acc[r]);
        if (GATED) acc_up[r] = dot8(wu[u], xv, acc_up[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float v = warp_sum(acc[r]);
    if (GATED) {
      const float up = warp_sum(acc_up[r]);
      if (lane == r) {
        float gate = v;
        float upv = up;
        if (bias) {
          gate += __half2float(bias[row]);
          upv += __half2float(bias[row + n_out]);
        }
        const float g16 = __half2float(__float2half(gate));
        const __half silu = __float2half(g16 / (1.f + expf(-g16)));
        y[r * ldy + row] = __hmul(silu, __float2half(upv));
      }
    } else if (lane == r) {
      if (bias) v += __half2float(bias[row]);
      y[r * ldy + row] = __float2half(v);
    }
  }
}

bool programmatic_launch_supported() {
  static const bool supported = [] {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
      return false;
    return major >= 9;
  }();
  return FLAGC_GEMV_PDL && supported;
}

template <int ROWS, bool GATED>
cudaError_t launch(const __half* x, const __half* w, const __half* bias, __half* y, int n_out,
                   int k, int64_t ldx, int64_t ldy, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((n_out + kWarpsPerBlock - 1) / kWarpsPerBlock);
  config.blockDim = dim3(kWarpsPerBlock * 32);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (programmatic_launch_supported()) {
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, decode_gemv_kernel<ROWS, GATED>, x, w, bias, y, n_out, k,
                            ldx, ldy);
}

template <bool GATED>
cudaError_t launch_rows(int rows, const __half* x, const __half* w, const __half* bias,
                        __half* y, int n_out, int k, int64_t ldx, int64_t ldy,
                        cudaStream_t stream) {
  switch (rows) {
    case 1: return launch<1, GATED>(x, w, bias, y, n_out, k, ldx, ldy, stream);
    case 2: return launch<2, GATED>(x, w, bias, y, n_out, k, ldx, ldy, stream);
    case 3: return launch<3, GATED>(x, w, bias, y, n_out, k, ldx, ldy, stream);
    case 4: return launch<4, GATED>(x, w, bias, y, n_out, k, ldx, ldy, stream);
    case 5: return launch<5, GATED>(x, w, bias, y, n_out, k, ldx, ldy, stream);
    case 6: return launch<6, GATED>(x, w, bias, y, n_out, k, ldx, ldy, stream);
    case 7: return launch<7, GATED>(x, w, bias, y, n_out, k, ldx, ldy, stream);
    case 8: return launch<8, GATED>(x, w, bias, y, n_out, k, ldx, ldy, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// x [m, k], w [n_w, k], bias [n_w] or null, y [m, n_out]; n_out = n_w, or n_w / 2 when gated.
// Returns 0, a cudaError_t, or -1 for arguments the kernel cannot take (k not a multiple of 8,
// a pointer not 16-byte aligned).
extern "C" __attribute__((visibility("default"))) int flagc_decode_gemv(
    const void* x, const void* w, const void* bias, void* y, int64_t m, int64_t n_w, int64_t k,
    int gated, void* stream) {
  if (m < 1 || n_w < 1 || k < 8 || k % 8 != 0 || (gated && n_w % 2 != 0)) return -1;
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w)) % 16 != 0) return -1;
  const int n_out = static_cast<int>(gated ? n_w / 2 : n_w);
  const __half* xh = static_cast<const __half*>(x);
  __half* yh = static_cast<__half*>(y);
  for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
    const int rows = static_cast<int>(m - r0 < kMaxRows ? m - r0 : kMaxRows);
    const cudaError_t err =
        gated ? launch_rows<true>(rows, xh + r0 * k, static_cast<const __half*>(w),
                                  static_cast<const __half*>(bias), yh + r0 * n_out, n_out,
                                  static_cast<int>(k), k, n_out,
                                  static_cast<cudaStream_t>(stream))
              : launch_rows<false>(rows, xh + r0 * k, static_cast<const __half*>(w),
                                   static_cast<const __half*>(bias), yh + r0 * n_out, n_out,
                                   static_cast<int>(k), k, n_out,
                                   static_cast<cudaStream_t>(stream));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}
