// Block-quantized matrix products for decode steps on the CPU (ort_ops.cc registers it as
// ai.flagc.QGemv; flagc/lower/onnx_qgemv.py writes the weights in this file's layout).
//
// y[r, n] = sum_k x[r, k] w[n, k] (+ bias[n]) with w[n, k] = d[n, b] * q[n, k] + m[n, b] for
// the block b = k / 32: unsigned codes q of 4 or 8 bits and a float16 scale d and offset m per
// block (GGUF's Q4_1 form; a symmetric int8 weight is m = -128 d, an integer zero point z is
// m = -z d). The activations are quantized per block of 32 too (int8, scale amax / 127,
// round-half-even), as onnxruntime's MatMulNBits does at accuracy_level 4, so that
//     sum_k x w = sum_b d_b sx_b (sum_k q xq) + m_b (sx_b sum_k xq)
// is an integer dot product per block (AVX512-VNNI vpdpbusd: unsigned codes times signed
// activations) plus one multiply-add per block.
//
// Why not MatMulNBits: a decode step reads every weight once for one activation row, so it is
// bound by memory bandwidth (2 cores: ~20 GB/s here), and MatMulNBits' layout (row-major codes,
// float32 scales in another array) makes its kernel reduce each row horizontally; at SmolLM2's
// shapes it streams its weights at about half the bandwidth. Here 16 rows are interleaved: a
// 64-byte load holds 4 codes of each of 16 rows, one vpdpbusd against 4 broadcast activations
// accumulates 16 rows at once, the float16 scales of those 16 rows follow their codes, and no
// horizontal sum is ever needed. Packed layout, for tiles of 16 rows (N padded with zero rows)
// and blocks of 32 along K (K padded with zero codes):
//     packed[tile][block] = codes, then d[16] f16, then m[16] f16
//     codes (4 bits): 4 quads t of [16 rows][4 bytes]; byte i of row j's quad t holds
//                     q[j, 4t + i] in its low nibble and q[j, 16 + 4t + i] in its high one
//     codes (8 bits): 8 quads t of [16 rows][4 bytes]; byte i of row j's quad t is q[j, 4t + i]
// Without AVX512-VNNI a portable loop computes the same integers (float sums in another order).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define FLAGC_QGEMV_VNNI 1
#endif

namespace {

constexpr int64_t kRows = 16;   // rows per tile
constexpr int64_t kBlock = 32;  // elements per block along K

int64_t tile_bytes(int bits) { return kRows * kBlock * bits / 8 + 2 * kRows * 2; }

float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, sizeof v);
  return static_cast<float>(v);
}

// The 4-byte group t (of 8) of block b's activations in row r, for the broadcast.
inline int32_t quad(const int8_t* xb, int t) {
  int32_t v;
  std::memcpy(&v, xb + 4 * t, 4);
  return v;
}

// Code of row j, element e (0..31) of one tile-block (the layout above).
inline int code_at(const uint8_t* codes, int bits, int64_t j, int e) {
  if (bits == 8) return codes[(e / 4) * 64 + j * 4 + e % 4];
  const int half = e / 16, t = (e % 16) / 4, i = e % 4;
  const uint8_t byte = codes[t * 64 + j * 4 + i];
  return half ? byte >> 4 : byte & 15;
}

[[maybe_unused]] void tile_portable(const uint8_t* packed, int bits, int64_t nb, const int8_t* xq,
                   const float* sx, const float* sums, int64_t rows, int64_t k_padded,
                   float* out /* [rows][16] */) {
  const int64_t step = tile_bytes(bits), code_bytes = kRows * kBlock * bits / 8;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < kRows; ++j) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tb = packed + b * step;
        const uint16_t* d = reinterpret_cast<const uint16_t*>(tb + code_bytes);
        const int8_t* xb = xq + r * k_padded + b * kBlock;
        int32_t dot = 0;
        for (int e = 0; e < kBlock; ++e) dot += code_at(tb, bits, j, e) * xb[e];
        acc += half_to_float(d[j]) * sx[r * nb + b] * static_cast<float>(dot) +
               half_to_float(d[kRows + j]) * sums[r * nb + b];
      }
      out[r * kRows + j] = acc;
    }
  }
}

#ifdef FLAGC_QGEMV_VNNI
// MR activation rows against one tile of 16 weight rows; the 8 code vectors of a block are
// unpacked once and used for every activation row.
template <int BITS, int MR>
void tile_vnni(const uint8_t* packed, int64_t nb, const int8_t* xq, const float* sx,
               const float* sums, int64_t k_padded, float* out) {
  constexpr int64_t code_bytes = kRows * kBlock * BITS / 8;
  constexpr int64_t step = code_bytes + 2 * kRows * 2;
  const __m512i low = _mm512_set1_epi8(0x0f);
  __m512 acc[MR], off[MR];
  for (int r = 0; r < MR; ++r) acc[r] = off[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tb = packed + b * step;
    __m512i w[8];
    if (BITS == 4) {
      for (int t = 0; t < 4; ++t) {
        const __m512i v = _mm512_loadu_si512(tb + 64 * t);
        w[t] = _mm512_and_si512(v, low);
        w[4 + t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    } else {
      for (int t = 0; t < 8; ++t) w[t] = _mm512_loadu_si512(tb + 64 * t);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(tb + code_bytes)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(tb + code_bytes + 2 * kRows)));
    for (int r = 0; r < MR; ++r) {
      const int8_t* xb = xq + r * k_padded + b * kBlock;
      // two chains: vpdpbusd's latency would otherwise serialize the 8 products
      __m512i even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0],
                                         _mm512_set1_epi32(quad(xb, 0)));
      __m512i odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1],
                                        _mm512_set1_epi32(quad(xb, 1)));
      for (int t = 2; t < 8; t += 2) {
        even = _mm512_dpbusd_epi32(even, w[t], _mm512_set1_epi32(quad(xb, t)));
        odd = _mm512_dpbusd_epi32(odd, w[t + 1], _mm512_set1_epi32(quad(xb, t + 1)));
      }
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(sx[r * nb + b])), acc[r]);
      off[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[r * nb + b]), off[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(out + r * kRows, _mm512_add_ps(acc[r], off[r]));
}

template <int BITS>
void tile_rows_vnni(const uint8_t* packed, int64_t nb, const int8_t* xq, const float* sx,
                    const float* sums, int64_t rows, int64_t k_padded, float* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    tile_vnni<BITS, 4>(packed, nb, xq + r * k_padded, sx + r * nb, sums + r * nb, k_padded,
                       out + r * kRows);
  const int64_t left = rows - r;
  const int8_t* x = xq + r * k_padded;
  if (left == 3) tile_vnni<BITS, 3>(packed, nb, x, sx + r * nb, sums + r * nb, k_padded,
                                    out + r * kRows);
  if (left == 2) tile_vnni<BITS, 2>(packed, nb, x, sx + r * nb, sums + r * nb, k_padded,
                                    out + r * kRows);
  if (left == 1) tile_vnni<BITS, 1>(packed, nb, x, sx + r * nb, sums + r * nb, k_padded,
                                    out + r * kRows);
}
#endif

// Products of tile `tile` for activation rows [r0, r0 + mr): out [mr][16].
void tile_products(const uint8_t* packed, int bits, int64_t nb, const int8_t* xq,
                   const float* sx, const float* sums, int64_t tile, int64_t r0, int64_t mr,
                   float* out) {
  const int64_t k_padded = nb * kBlock;
  const uint8_t* tp = packed + tile * tile_bytes(bits) * nb;
  const int8_t* x = xq + r0 * k_padded;
#ifdef FLAGC_QGEMV_VNNI
  if (bits == 4)
    tile_rows_vnni<4>(tp, nb, x, sx + r0 * nb, sums + r0 * nb, mr, k_padded, out);
  else
    tile_rows_vnni<8>(tp, nb, x, sx + r0 * nb, sums + r0 * nb, mr, k_padded, out);
#else
  tile_portable(tp, bits, nb, x, sx + r0 * nb, sums + r0 * nb, mr, k_padded, out);
#endif
}

}  // namespace

// Bytes of one [tile][block] record of the packed layout.
int64_t flagc_qgemv_tile_bytes(int bits) { return tile_bytes(bits); }

// Quantizes x [rows, k] per block of 32 into xq [rows, nb * 32] (zero-padded), sx [rows, nb]
// (the scales) and sums [rows, nb] (sx * the block's sum of codes).
void flagc_qgemv_quantize(const float* x, int64_t rows, int64_t k, int64_t nb, int8_t* xq,
                          float* sx, float* sums) {
  const int64_t k_padded = nb * kBlock;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * k + b * kBlock;
      const int64_t len = std::min(kBlock, k - b * kBlock);
      float amax = 0.f;
      for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float scale = amax / 127.f;
      int8_t* qb = xq + r * k_padded + b * kBlock;
      int32_t total = 0;
      for (int64_t i = 0; i < kBlock; ++i) {
        const int32_t q =
            i < len && scale > 0.f ? static_cast<int32_t>(std::nearbyint(xb[i] / scale)) : 0;
        qb[i] = static_cast<int8_t>(q);
        total += q;
      }
      sx[r * nb + b] = scale;
      sums[r * nb + b] = scale * static_cast<float>(total);
    }
  }
}

// Output columns of the tiles [tile_begin, tile_end) of y [rows, n] (+ bias when given).
// gated: the weight holds n gate rows then n up rows (n a multiple of 16, bias [2n]), and
// y = silu(x W_gate^T + b_gate) * (x W_up^T + b_up).
void flagc_qgemv_tiles(const uint8_t* packed, int bits, int64_t n, int64_t nb, bool gated,
                       const int8_t* xq, const float* sx, const float* sums, const float* bias,
                       float* y, int64_t rows, int64_t tile_begin, int64_t tile_end) {
  float out[4 * kRows], up[4 * kRows];
  const int64_t up_tiles = n / kRows;  // gated: where the up rows' tiles start
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t first = tile * kRows, count = std::min(kRows, n - first);
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int64_t mr = std::min<int64_t>(4, rows - r0);
      tile_products(packed, bits, nb, xq, sx, sums, tile, r0, mr, out);
      if (gated) tile_products(packed, bits, nb, xq, sx, sums, tile + up_tiles, r0, mr, up);
      for (int64_t r = 0; r < mr; ++r) {
        float* yr = y + (r0 + r) * n + first;
        for (int64_t j = 0; j < count; ++j) {
          float v = out[r * kRows + j] + (bias ? bias[first + j] : 0.f);
          if (gated)
            v = v / (1.f + std::exp(-v)) * (up[r * kRows + j] + (bias ? bias[n + first + j] : 0.f));
          yr[j] = v;
        }
      }
    }
  }
}
