// Weight-only int4 / int8 matmul on CPU: out (M, N) = x (M, K) @ W.T + bias with W stored in llmkern's packed format
// (llmkern/quant_weight.py): qweight int32 (K / PACK, N) packed along K (code of row k in bits
// [(k % PACK) * bits, +bits) of word row k / PACK), scales (G, N) in x's dtype (fp16, bf16 or fp32), integer
// zero points (G, N) int16, W[n, k] = (q - z) * s over the group of k, and an optional act-order perm: packed row j is x's column perm[j].
//
// Two paths, as on the GPU:
//   M <= 16 (decode): the packed words are streamed once, in memory order, and unpacked in registers: for each
//     word row (PACK consecutive k) and each vector of columns, the PACK codes are shifted out, centred on their
//     zero point (exact small integers in fp32) and multiplied into every row of x; a group's sum is scaled once at
//     the group's end. Each weight byte is read once per call; the work is ~5 vector ops per code and row.
//   M > 16 (prefill): a tile of W is dequantized to fp32 once and multiplied by all M rows with BLAS (at::mm).
// fp32 accumulation throughout; one rounding to x's dtype at the end.
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <vector>

#include "llmkern_cpu.h"

namespace llmkern {
namespace {

using iVec = at::vec::Vectorized<int32_t>;
static_assert(iVec::size() == kF, "int32 and fp32 vectors must have the same lane count");

// The rows M up to which the decode path runs (the GPU path's DECODE_MAX_M): beyond it a dequantized tile is reused
// by enough rows for BLAS to pay off.
constexpr int64_t kDecodeMaxM = 16;

struct QuantArgs {
  int64_t M, N, K, bits, group;  // group: rows per group (K for group_size -1)
};

// x as fp32 (M, K), its columns gathered through perm (act-order), so that column j lines up with packed row j.
template <typename T>
std::vector<float> gathered_x(const at::Tensor& x, const int32_t* perm, int64_t M, int64_t K) {
  std::vector<float> xf(M * K);
  const T* xp = x.const_data_ptr<T>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* row = xp + m * x.stride(0);
      for (int64_t j = 0; j < K; ++j) xf[m * K + j] = static_cast<float>(row[perm ? perm[j] : j]);
    }
  });
  return xf;
}

// n (<= kF) consecutive int16 zero points or scales as fp32.
template <typename S>
inline fVec load_small(const S* p, int64_t n) {
  float tmp[kF] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return fVec::loadu(tmp);
}

// ------------------------------------------------------------------------------------------------------ decode
// For packed word rows [w0, w1) of one group and the columns [c0, c1): gacc[mb][c] += sum over the rows' k of
// x[m0 + mb][k] * (q[k][c] - z[c]), gacc with row stride `cols` and indexed from c0. For fp16/bf16 x the products
// are exact in fp32 (an 11- or 8-bit significand times an integer below 2^8 in magnitude); for fp32 x each is
// rounded once, as in any fp32 dot. The group's scale is applied by the caller, once.
template <int BITS, int MB>
void decode_group_rows(const int32_t* qw, int64_t N, const float* xf, int64_t K, int64_t m0, int64_t w0, int64_t w1,
                       int64_t c0, int64_t c1, const fVec* zf, float* gacc, int64_t cols) {
  constexpr int kPack = 32 / BITS;
  const iVec mask((1 << BITS) - 1);
  for (int64_t w = w0; w < w1; ++w) {
    const int32_t* row = qw + w * N;
    const float* xk = xf + m0 * K + w * kPack;   // x[m0][w * kPack + j]
    for (int64_t c = c0, v = 0; c < c1; c += kF, ++v) {
      const int64_t n = std::min(kF, c1 - c);
      const iVec words = n == kF ? iVec::loadu(row + c) : iVec::loadu(row + c, n);
      float* ga = gacc + (c - c0);
      fVec a[MB];
      for (int mb = 0; mb < MB; ++mb) a[mb] = fVec::loadu(ga + mb * cols, n);
      for (int j = 0; j < kPack; ++j) {
        const iVec code = (words >> iVec(j * BITS)) & mask;
        const fVec centred = at::vec::convert_to_fp_of_same_size<float>(code) - zf[v];
        for (int mb = 0; mb < MB; ++mb) a[mb] = at::vec::fmadd(fVec(xk[mb * K + j]), centred, a[mb]);
      }
      for (int mb = 0; mb < MB; ++mb) a[mb].store(ga + mb * cols, n);
    }
  }
}

template <typename T, int BITS>
void decode_path(const QuantArgs& a, const float* xf, const int32_t* qw, const T* scales, const int16_t* zeros,
                 const T* bias, T* out, int64_t out_stride) {
  const int64_t M = a.M, N = a.N, K = a.K, words_per_group = a.group * BITS / 32;
  const int64_t groups = K / a.group, n_vec = (N + kF - 1) / kF;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Each thread takes one contiguous range of columns over all of K: it streams its part of every word row in
  // memory order, and its accumulators (2 x M x its columns, fp32) stay in L1/L2.
  at::parallel_for(0, n_vec, (n_vec + threads - 1) / threads, [&](int64_t v0, int64_t v1) {
    const int64_t c0 = v0 * kF, c1 = std::min(N, v1 * kF), cols = c1 - c0;
    std::vector<float> acc(M * cols, 0.f), gacc(M * cols);   // [m * cols + (c - c0)]
    std::vector<fVec> zf(v1 - v0);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t c = c0, v = 0; c < c1; c += kF, ++v) zf[v] = load_small(zeros + g * N + c, std::min(kF, c1 - c));
      std::fill(gacc.begin(), gacc.end(), 0.f);
      const int64_t w0 = g * words_per_group, w1 = w0 + words_per_group;
      for (int64_t m = 0; m < M;) {  // rows in blocks of 4, 2, 1: their accumulators are registers
        float* ga = gacc.data() + m * cols;
        if (M - m >= 4) {
          decode_group_rows<BITS, 4>(qw, N, xf, K, m, w0, w1, c0, c1, zf.data(), ga, cols);
          m += 4;
        } else if (M - m >= 2) {
          decode_group_rows<BITS, 2>(qw, N, xf, K, m, w0, w1, c0, c1, zf.data(), ga, cols);
          m += 2;
        } else {
          decode_group_rows<BITS, 1>(qw, N, xf, K, m, w0, w1, c0, c1, zf.data(), ga, cols);
          m += 1;
        }
      }
      for (int64_t c = c0; c < c1; c += kF) {  // the group's scale, once per column and row
        const int64_t n = std::min(kF, c1 - c);
        const fVec s = load_small(scales + g * N + c, n);
        for (int64_t m = 0; m < M; ++m) {
          float* ac = &acc[m * cols + (c - c0)];
          at::vec::fmadd(s, fVec::loadu(&gacc[m * cols + (c - c0)], n), fVec::loadu(ac, n)).store(ac, n);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = c0; c < c1; ++c) {
        out[m * out_stride + c] = static_cast<T>(acc[m * cols + (c - c0)] + (bias ? static_cast<float>(bias[c]) : 0.f));
      }
    }
  });
}

// -------------------------------------------------------------------------------------------------------- GEMM
// Columns per dequantized tile, and packed rows per tile: a 512 x 128 fp32 tile is 256 KB (L2), reused by all M rows.
constexpr int64_t kGemmCols = 128;
constexpr int64_t kGemmRows = 512;

template <typename T, int BITS>
void gemm_path(const QuantArgs& a, const float* xf, const int32_t* qw, const T* scales,
               const int16_t* zeros, const T* bias, T* out, int64_t out_stride) {
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
              static_cast<T>(acc[m * nc + c] + (bias ? static_cast<float>(bias[c0 + c]) : 0.f));
        }
      }
    }
  });
}

template <typename T>
void run(const QuantArgs& a, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
         const at::Tensor& zeros, const int32_t* perm, const c10::optional<at::Tensor>& bias, const at::Tensor& out,
         bool decode) {
  const std::vector<float> xf = gathered_x<T>(x, perm, a.M, a.K);
  const int32_t* qw = qweight.const_data_ptr<int32_t>();
  const T* s = scales.const_data_ptr<T>();
  const int16_t* z = zeros.const_data_ptr<int16_t>();
  const T* b = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  T* o = out.mutable_data_ptr<T>();
  const int64_t os = out.stride(0);
  if (a.bits == 4) {
    decode ? decode_path<T, 4>(a, xf.data(), qw, s, z, b, o, os) : gemm_path<T, 4>(a, xf.data(), qw, s, z, b, o, os);
  } else {
    decode ? decode_path<T, 8>(a, xf.data(), qw, s, z, b, o, os) : gemm_path<T, 8>(a, xf.data(), qw, s, z, b, o, os);
  }
}

// x (M, K) fp16/bf16/fp32 with a contiguous last dim; out (M, N) of x's dtype, written. The caller (llmkern/quant.py) has
// checked the whole weight (shapes, dtypes, perm a permutation) before the op runs. path: 0 picks by M (decode up to
// kDecodeMaxM rows), 1 forces the decode path, 2 the GEMM path (the tests run both on the same shapes).
void quant_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                  const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias, int64_t bits,
                  int64_t group_size, int64_t path, const at::Tensor& out) {
  check_dim(x, 2, "x");
  check_last_dim_contiguous(x, "x");
  check_float(x, "x");
  TORCH_CHECK(bits == 4 || bits == 8, "llmkern_cpu: bits must be 4 or 8");
  const int64_t M = x.size(0), K = x.size(1), pack = 32 / bits;
  const int64_t group = group_size == -1 ? K : group_size;
  TORCH_CHECK(group > 0 && K % group == 0 && group % pack == 0, "llmkern_cpu: group_size must divide K in words");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.size(0) * pack == K &&
                  qweight.is_contiguous(), "llmkern_cpu: qweight must be contiguous int32 (K / PACK, N)");
  const int64_t N = qweight.size(1);
  TORCH_CHECK(scales.scalar_type() == x.scalar_type() && scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({K / group, N}), "llmkern_cpu: scales must be (G, N) of x's dtype");
  TORCH_CHECK(zeros.scalar_type() == at::kShort && zeros.is_contiguous() && zeros.sizes() == scales.sizes(),
              "llmkern_cpu: zeros must be int16 (G, N)");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.sizes() == at::IntArrayRef({M, N}) && out.stride(1) == 1,
              "llmkern_cpu: out must be (M, N) of x's dtype");
  const int32_t* pp = nullptr;
  if (perm.has_value()) {
    TORCH_CHECK(perm->scalar_type() == at::kInt && perm->is_contiguous() && perm->numel() == K,
                "llmkern_cpu: perm must be int32 (K,)");
    pp = perm->const_data_ptr<int32_t>();
    for (int64_t j = 0; j < K; ++j) TORCH_CHECK(pp[j] >= 0 && pp[j] < K, "llmkern_cpu: perm out of range");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == N,
                "llmkern_cpu: bias must be (N,) of x's dtype");
  }
  TORCH_CHECK(path >= 0 && path <= 2, "llmkern_cpu: path must be 0 (by M), 1 (decode) or 2 (GEMM)");
  if (M == 0 || N == 0) return;
  const QuantArgs args{M, N, K, bits, group};
  const bool decode = path == 1 || (path == 0 && M <= kDecodeMaxM);
  LLMKERN_DISPATCH_FLOAT(x.scalar_type(), "llmkern_cpu::quant_matmul", [&] {
    run<scalar_t>(args, x, qweight, scales, zeros, pp, bias, out, decode);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkern_cpu, m) {
  m.def("quant_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? perm, Tensor? bias, int bits, "
        "int group_size, int path, Tensor(a!) out) -> ()",
        &quant_matmul);
}

}  // namespace llmkern
