// Weight-only int4 / int8 matmul on CPU (quant.cpp's llmkern::quant_matmul, moe.cpp's quantized experts): out (M, N) = x (M, K) @ W.T + bias with W stored in llmkern's packed format
// (llmkern/quant_weight.py): qweight int32 (K / PACK, N) packed along K (code of row k in bits
// [(k % PACK) * bits, +bits) of word row k / PACK), scales (G, N) in x's dtype (fp16, bf16 or fp32), integer
// zero points (G, N) int16, W[n, k] = (q - z) * s over the group of k, and an optional act-order perm: packed row j is x's column perm[j].
//
// Two paths, as on the GPU:
//   M <= 16 (decode): the packed words are streamed once, in memory order, and unpacked in registers (M = 1) or into
//     an L1 tile of centred codes shared by the M rows (decode_path); a group's sum is scaled once at the group's end.
//   M > 16 (prefill): a tile of W is dequantized to fp32 once and multiplied by all M rows with BLAS (at::mm).
// fp32 accumulation throughout; one rounding to x's dtype at the end.
#pragma once

#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <vector>

#include "llmkern_cpu.h"

namespace llmkern {
namespace quant_gemm {

using iVec = at::vec::Vectorized<int32_t>;
static_assert(iVec::size() == kF, "int32 and fp32 vectors must have the same lane count");

// The rows M up to which the decode path runs (the GPU path's DECODE_MAX_M): beyond it a dequantized tile is reused
// by enough rows for BLAS to pay off.
constexpr int64_t kDecodeMaxM = 16;

struct QuantArgs {
  int64_t M, N, K, bits, group;  // group: rows per group (K for group_size -1)
};

// Rows of an activation as fp32 (M, K), their columns gathered through perm (act-order) so that column j lines up
// with packed row j: row m is src + row(m) * stride (S: fp32, bf16 or fp16).
template <typename S, typename Row>
std::vector<float> gathered_rows(const S* src, int64_t stride, const Row& row, const int32_t* perm, int64_t M,
                                 int64_t K) {
  std::vector<float> xf(M * K);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const S* r = src + row(m) * stride;
      for (int64_t j = 0; j < K; ++j) xf[m * K + j] = static_cast<float>(r[perm ? perm[j] : j]);
    }
  });
  return xf;
}

// n (<= kF) consecutive int16 zero points as fp32, zeros after them.
inline fVec load_zeros(const int16_t* p, int64_t n) {
  float tmp[kF] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return fVec::loadu(tmp);
}

// n (<= kF) packed words at p, zeros after them.
inline iVec load_words(const int32_t* p, int64_t n) { return n == kF ? iVec::loadu(p) : iVec::loadu(p, n); }

// Code j of every word of w, centred on its column's zero point z: a small integer, exact in fp32.
template <int BITS>
inline fVec centred_code(const iVec& w, int j, const fVec& z) {
  const iVec code = (w >> iVec(j * BITS)) & iVec((1 << BITS) - 1);
  return at::vec::convert_to_fp_of_same_size<float>(code) - z;
}

// ------------------------------------------------------------------------------------------------------ decode
// The packed words are read once per call, in memory order within each thread's columns: group by group, each of
// the group's word rows across the thread's columns. Columns go in blocks of V vectors (V a compile-time count, the
// last block of a thread may have fewer), whose per-group sums stay in registers. A group's fp32 sum of
// x[m][k] * (q[k][c] - z[c]) (exact products for fp16/bf16 x: an 11- or 8-bit significand times an integer below 2^8;
// rounded once for fp32 x, as in any fp32 dot) is multiplied by the group's scale and added to acc[m][c].
//
// M = 1: the codes are unpacked in registers (a shift, a mask, a conversion and the zero point per code and vector),
// and each is used once; x[k] is broadcast once for the block's V vectors. kGemvVecs: V accumulators, V words, V
// codes, the broadcast and the mask fit AVX2's 16 vector registers.
constexpr int kGemvVecs = 4;

template <int BITS, int V>
void gemv_group(const int32_t* qw, int64_t N, const float* xg, int64_t words, int64_t c, int64_t n_last,
                const fVec* zf, fVec* sum) {
  constexpr int kPack = 32 / BITS;
  for (int v = 0; v < V; ++v) sum[v] = fVec(0.f);
  for (int64_t w = 0; w < words; ++w) {
    const int32_t* row = qw + w * N + c;
    iVec wv[V];
    for (int v = 0; v < V; ++v) wv[v] = load_words(row + v * kF, v == V - 1 ? n_last : kF);
    for (int j = 0; j < kPack; ++j) {
      const fVec xb(xg[w * kPack + j]);
      for (int v = 0; v < V; ++v) sum[v] = at::vec::fmadd(xb, centred_code<BITS>(wv[v], j, zf[v]), sum[v]);
    }
  }
}

// 2 <= M <= 16: each code would be unpacked M times in registers, so a chunk of kChunk codes x kTileVecs vectors of
// columns is unpacked once into a tile of centred codes (fp32, in L1), and every row of x then runs over the tile
// with kTileVecs accumulators in registers: per k, one broadcast of x[m][k] and kTileVecs FMAs reading the tile.
constexpr int kTileVecs = 6;
constexpr int64_t kChunk = 64;   // codes per tile: 64 x 6 vectors, 12 KB of fp32 with AVX2, 24 KB with AVX-512
constexpr int64_t kTileCols = kTileVecs * kF;

template <int BITS>
void unpack_tile(const int32_t* qw, int64_t N, int64_t words, int64_t c, int64_t nc, const fVec* zf, float* tile) {
  constexpr int kPack = 32 / BITS;
  for (int64_t w = 0; w < words; ++w) {
    for (int v = 0; v < kTileVecs; ++v) {   // columns past nc: words and zero points 0, codes 0
      const int64_t n = std::clamp<int64_t>(nc - v * kF, 0, kF);
      const iVec wv = n > 0 ? load_words(qw + w * N + c + v * kF, n) : iVec(0);
      for (int j = 0; j < kPack; ++j) centred_code<BITS>(wv, j, zf[v]).store(tile + (w * kPack + j) * kTileCols + v * kF);
    }
  }
}

// sum[v] += x[k] * tile[k][v] over the tile's nk codes.
inline void tile_row(const float* tile, int64_t nk, const float* x, fVec* sum) {
  for (int64_t k = 0; k < nk; ++k) {
    const fVec xb(x[k]);
    for (int v = 0; v < kTileVecs; ++v) sum[v] = at::vec::fmadd(xb, fVec::loadu(tile + k * kTileCols + v * kF), sum[v]);
  }
}

template <typename T, int BITS, typename O>
void decode_path(const QuantArgs& a, const float* xf, const int32_t* qw, const T* scales, const int16_t* zeros,
                 const T* bias, O* out, int64_t out_stride) {
  constexpr int kPack = 32 / BITS;
  const int64_t M = a.M, N = a.N, K = a.K, words_per_group = a.group / kPack, groups = K / a.group;
  const bool gemv = M == 1;
  const int64_t block = gemv ? kGemvVecs * kF : kTileCols, n_blocks = (N + block - 1) / block;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, n_blocks, (n_blocks + threads - 1) / threads, [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * block, cols = (b1 - b0) * block;
    std::vector<float> acc(M * cols, 0.f);          // [m * cols + (c - c0)], every block's columns in full
    std::vector<float> tile(gemv ? 0 : kChunk * kTileCols), gsum(gemv ? 0 : M * kTileCols);
    // The group's scales of n <= kF columns from c, times the group's sums of row m, added to acc.
    const auto add_scaled = [&](int64_t g, int64_t c, int64_t n, int64_t m, const fVec& sum) {
      const fVec s = n == kF ? load_f(scales + g * N + c) : load_f(scales + g * N + c, n);
      float* ac = &acc[m * cols + (c - c0)];
      at::vec::fmadd(s, sum, fVec::loadu(ac)).store(ac);
    };
    for (int64_t g = 0; g < groups; ++g) {
      const int32_t* qg = qw + g * words_per_group * N;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b * block, nc = std::min(block, N - c);
        fVec zf[kTileVecs];
        for (int v = 0; v < (gemv ? kGemvVecs : kTileVecs); ++v) {
          zf[v] = load_zeros(zeros + g * N + c + v * kF, std::clamp<int64_t>(nc - v * kF, 0, kF));
        }
        if (gemv) {
          const int64_t nvec = (nc + kF - 1) / kF;
          with_count<kGemvVecs>(nvec, [&](auto vc) {
            constexpr int kV = decltype(vc)::value;
            fVec sum[kV];
            gemv_group<BITS, kV>(qg, N, xf + g * a.group, words_per_group, c, nc - (kV - 1) * kF, zf, sum);
            for (int v = 0; v < kV; ++v) add_scaled(g, c + v * kF, std::min(kF, nc - v * kF), 0, sum[v]);
          });
          continue;
        }
        std::fill(gsum.begin(), gsum.end(), 0.f);
        for (int64_t w0 = 0; w0 < words_per_group; w0 += kChunk / kPack) {
          const int64_t nw = std::min(kChunk / kPack, words_per_group - w0);
          unpack_tile<BITS>(qg + w0 * N, N, nw, c, nc, zf, tile.data());
          for (int64_t m = 0; m < M; ++m) {
            fVec sum[kTileVecs];
            for (int v = 0; v < kTileVecs; ++v) sum[v] = fVec::loadu(&gsum[m * kTileCols + v * kF]);
            tile_row(tile.data(), nw * kPack, xf + m * K + g * a.group + w0 * kPack, sum);
            for (int v = 0; v < kTileVecs; ++v) sum[v].store(&gsum[m * kTileCols + v * kF]);
          }
        }
        for (int64_t m = 0; m < M; ++m) {
          for (int v = 0; v * kF < nc; ++v) {
            add_scaled(g, c + v * kF, std::min(kF, nc - v * kF), m, fVec::loadu(&gsum[m * kTileCols + v * kF]));
          }
        }
      }
    }
    const int64_t c1 = std::min(N, b1 * block);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = c0; c < c1; ++c) {
        out[m * out_stride + c] = static_cast<O>(acc[m * cols + (c - c0)] + (bias ? static_cast<float>(bias[c]) : 0.f));
      }
    }
  });
}

// -------------------------------------------------------------------------------------------------------- GEMM
// Columns per dequantized tile, and packed rows per tile: a 512 x 128 fp32 tile is 256 KB (L2), reused by all M rows.
constexpr int64_t kGemmCols = 128;
constexpr int64_t kGemmRows = 512;

template <typename T, int BITS, typename O>
void gemm_path(const QuantArgs& a, const float* xf, const int32_t* qw, const T* scales,
               const int16_t* zeros, const T* bias, O* out, int64_t out_stride) {
  constexpr int kPack = 32 / BITS;
  const int64_t M = a.M, N = a.N, K = a.K;
  const int64_t rows_per_tile = std::max<int64_t>(kPack, kGemmRows - kGemmRows % kPack);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor x_t = at::from_blob(const_cast<float*>(xf), {M, K}, opts);
  at::parallel_for(0, (N + kGemmCols - 1) / kGemmCols, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> w(rows_per_tile * kGemmCols), acc(M * kGemmCols);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kGemmCols, nc = std::min(kGemmCols, N - c0);
      at::Tensor acc_t = at::from_blob(acc.data(), {M, nc}, opts);
      acc_t.zero_();
      for (int64_t k0 = 0; k0 < K; k0 += rows_per_tile) {
        const int64_t nk = std::min(rows_per_tile, K - k0);
        for (int64_t k = k0; k < k0 + nk; ++k) {  // W tile (nk x nc) = (q - z) * s (exact for 16-bit scales)
          const int32_t* words = qw + (k / kPack) * N + c0;
          const int shift = static_cast<int>(k % kPack) * BITS;
          const int64_t g = k / a.group;
          float* wr = &w[(k - k0) * nc];
          for (int64_t c = 0; c < nc; ++c) {
            const int32_t code = (words[c] >> shift) & ((1 << BITS) - 1);
            wr[c] = static_cast<float>(code - zeros[g * N + c0 + c]) * static_cast<float>(scales[g * N + c0 + c]);
          }
        }
        at::Tensor w_t = at::from_blob(w.data(), {nk, nc}, opts);
        acc_t.addmm_(x_t.narrow(1, k0, nk), w_t);
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t c = 0; c < nc; ++c) {
          out[m * out_stride + c0 + c] =
              static_cast<O>(acc[m * nc + c] + (bias ? static_cast<float>(bias[c0 + c]) : 0.f));
        }
      }
    }
  });
}

// out (M, N) of type O (x's dtype, or fp32 for a caller that keeps working on it; row stride out_stride) = xf (M, K)
// fp32, already gathered through perm, @ W.T + bias: the decode path or the GEMM path.
template <typename T, typename O>
void quant_rows(const QuantArgs& a, const float* xf, const int32_t* qw, const T* scales, const int16_t* zeros,
                const T* bias, O* out, int64_t out_stride, bool decode) {
  if (a.bits == 4) {
    decode ? decode_path<T, 4>(a, xf, qw, scales, zeros, bias, out, out_stride)
           : gemm_path<T, 4>(a, xf, qw, scales, zeros, bias, out, out_stride);
  } else {
    decode ? decode_path<T, 8>(a, xf, qw, scales, zeros, bias, out, out_stride)
           : gemm_path<T, 8>(a, xf, qw, scales, zeros, bias, out, out_stride);
  }
}


// The checks of a packed weight's tensors as the paths read them, for in_features K and activations of `dtype`: lead
// the leading dims ({} for one weight, {E} for stacked experts), then qweight (K / PACK, N) int32, scales (G, N) of
// `dtype`, zeros (G, N) int16, perm (K,) int32 with every value in [0, K); all contiguous. Returns the shape as
// QuantArgs (M = 0).
inline QuantArgs check_packed(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                              const c10::optional<at::Tensor>& perm, int64_t bits, int64_t group_size, int64_t K,
                              at::ScalarType dtype, at::IntArrayRef lead) {
  TORCH_CHECK(bits == 4 || bits == 8, "llmkern_cpu: bits must be 4 or 8");
  const int64_t pack = 32 / bits, group = group_size == -1 ? K : group_size, L = lead.size();
  TORCH_CHECK(group > 0 && K % group == 0 && group % pack == 0, "llmkern_cpu: group_size must divide K in words");
  for (const at::Tensor* t : {&qweight, &scales, &zeros}) {
    TORCH_CHECK(t->dim() == L + 2 && t->sizes().slice(0, L) == lead && t->is_contiguous() && t->device().is_cpu(),
                "llmkern_cpu: a packed weight's qweight, scales and zeros must be contiguous CPU tensors of ", L + 2,
                " dims");
  }
  const int64_t N = qweight.size(L + 1);
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.size(L) * pack == K,
              "llmkern_cpu: qweight must be int32 (K / PACK, N)");
  TORCH_CHECK(scales.scalar_type() == dtype && scales.size(L) == K / group && scales.size(L + 1) == N,
              "llmkern_cpu: scales must be (G, N) of x's dtype");
  TORCH_CHECK(zeros.scalar_type() == at::kShort && zeros.sizes() == scales.sizes(),
              "llmkern_cpu: zeros must be int16 (G, N)");
  if (perm.has_value()) {
    TORCH_CHECK(perm->scalar_type() == at::kInt && perm->is_contiguous() && perm->device().is_cpu() &&
                    perm->dim() == L + 1 && perm->sizes().slice(0, L) == lead && perm->size(L) == K,
                "llmkern_cpu: perm must be contiguous int32 (K,)");
    const int32_t* pp = perm->const_data_ptr<int32_t>();
    for (int64_t j = 0; j < perm->numel(); ++j) TORCH_CHECK(pp[j] >= 0 && pp[j] < K, "llmkern_cpu: perm out of range");
  }
  return QuantArgs{0, N, K, bits, group};
}

}  // namespace quant_gemm
}  // namespace llmkern
