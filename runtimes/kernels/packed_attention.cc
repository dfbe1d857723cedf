// Self-attention over packed tokens on the CPU (ort_ops.cc registers it as
// ai.flagc.PackedAttention; flagc/lower/onnx_packed_attention.py rewrites encoders onto it).
//
// An encoder graph whose per-token ops run on the real tokens only (passes/padding.py,
// pack-tokens) holds its hidden states as [tokens, hidden]: sequence b's tokens are rows
// cu_seqlens[b] .. cu_seqlens[b + 1]. onnxruntime's CPU MultiHeadAttention needs them padded
// back to [batch, max_len, hidden] and computes every query against every key slot, padding
// included. Here each (sequence, head) is one unit of work over its real length L only: its
// keys transposed once into a [d, L] buffer, each query's L scores accumulated along the keys
// (contiguous, vectorized), softmax in float32, and the values summed in. Non-causal, no bias.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

#ifdef __AVX512F__
// e^x for 16 lanes: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, e^r by its degree-6
// Taylor polynomial (relative error < 2e-7, like a scalar expf's last bits); x below -87
// gives 0, as float32's e^x underflows there.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln2, split for accuracy
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

// s[0..n) = exp(s - max), returns their sum.
float exp_shifted(float* s, int64_t n) {
  const float top = *std::max_element(s, s + n);
  float sum = 0.f;
  int64_t j = 0;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  const __m512 t = _mm512_set1_ps(top);
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), t));
    _mm512_storeu_ps(s + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (j < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), t));
    _mm512_mask_storeu_ps(s + j, m, e);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, e));
    j = n;
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - top);
    sum += s[j];
  }
  return sum;
}

#ifdef __AVX512F__
// Queries [i0, i0 + R) of one (sequence, head) unit with head size D (32 or 64): scores over
// the transposed keys kt [D][lp] (lp = len rounded up to 16, zero-padded), softmax, values.
// Register tiles of R queries x 16 keys and R queries x D outputs: each key and value vector
// is loaded once for R queries.
template <int D, int R>
void query_block(const float* q, int64_t q_stride, const float* kt, int64_t len, int64_t lp,
                 const float* v, int64_t v_stride, float scale, float* s, float* o,
                 int64_t o_stride) {
  for (int64_t j = 0; j < lp; j += 16) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int c = 0; c < D; ++c) {
      const __m512 k = _mm512_loadu_ps(kt + c * lp + j);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * q_stride + c]), k, acc[r]);
    }
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(s + r * lp + j, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
  }
  float inv[R];
  for (int r = 0; r < R; ++r) inv[r] = 1.f / exp_shifted(s + r * lp, len);
  constexpr int V = D / 16;
  __m512 out[R][V];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < V; ++c) out[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    __m512 val[V];
    for (int c = 0; c < V; ++c) val[c] = _mm512_loadu_ps(v + j * v_stride + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(s[r * lp + j]);
      for (int c = 0; c < V; ++c) out[r][c] = _mm512_fmadd_ps(w, val[c], out[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < V; ++c)
      _mm512_storeu_ps(o + r * o_stride + 16 * c,
                       _mm512_mul_ps(out[r][c], _mm512_set1_ps(inv[r])));
}

template <int D>
void unit_avx512(const float* qkv, int64_t start, int64_t len, int64_t width, int64_t h,
                 float scale, float* out) {
  const int64_t row = 3 * width, lp = (len + 15) / 16 * 16;
  thread_local std::vector<float> kt, s;
  kt.assign(static_cast<size_t>(D * lp), 0.f);
  s.resize(static_cast<size_t>(4 * lp));
  for (int64_t j = 0; j < len; ++j) {
    const float* k = qkv + (start + j) * row + width + h * D;
    for (int c = 0; c < D; ++c) kt[c * lp + j] = k[c];
  }
  const float* v = qkv + start * row + 2 * width + h * D;
  int64_t i = 0;
  for (; i + 4 <= len; i += 4)
    query_block<D, 4>(qkv + (start + i) * row + h * D, row, kt.data(), len, lp, v, row, scale,
                      s.data(), out + (start + i) * width + h * D, width);
  for (; i < len; ++i)
    query_block<D, 1>(qkv + (start + i) * row + h * D, row, kt.data(), len, lp, v, row, scale,
                      s.data(), out + (start + i) * width + h * D, width);
}
#endif

}  // namespace

// Output rows of sequence b, head h: out [tokens, heads * d] from qkv [tokens, 3 * heads * d]
// (q | k | v, each heads * d wide).
void flagc_packed_attention_unit(const float* qkv, const int64_t* cu_seqlens, float* out,
                                 int64_t heads, int64_t d, float scale, int64_t b, int64_t h) {
  const int64_t start = cu_seqlens[b], len = cu_seqlens[b + 1] - start;
  const int64_t width = heads * d, row = 3 * width;
  if (len <= 0) return;
#ifdef __AVX512F__
  if (d == 32) return unit_avx512<32>(qkv, start, len, width, h, scale, out);
  if (d == 64) return unit_avx512<64>(qkv, start, len, width, h, scale, out);
#endif
  thread_local std::vector<float> keys_t, scores;
  keys_t.resize(static_cast<size_t>(d * len));
  scores.resize(static_cast<size_t>(len));
  for (int64_t j = 0; j < len; ++j) {
    const float* k = qkv + (start + j) * row + width + h * d;
    for (int64_t c = 0; c < d; ++c) keys_t[c * len + j] = k[c];
  }
  float* s = scores.data();
  for (int64_t i = 0; i < len; ++i) {
    const float* q = qkv + (start + i) * row + h * d;
    std::fill(s, s + len, 0.f);
    for (int64_t c = 0; c < d; ++c) {
      const float qc = q[c] * scale;
      const float* kc = keys_t.data() + c * len;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) s[j] += qc * kc[j];
    }
    const float inv = 1.f / exp_shifted(s, len);
    float* o = out + (start + i) * width + h * d;
    std::fill(o, o + d, 0.f);
    for (int64_t j = 0; j < len; ++j) {
      const float w = s[j] * inv;
      const float* v = qkv + (start + j) * row + 2 * width + h * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) o[c] += w * v[c];
    }
  }
}
