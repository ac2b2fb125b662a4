// llmkern::quant_matmul: the packed format's matmul (csrc/quant_gemm.h holds the two paths, shared with moe.cpp).
#include "quant_gemm.h"

namespace llmkern {
namespace {

using namespace quant_gemm;

template <typename T>
void run(const QuantArgs& a, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
         const at::Tensor& zeros, const int32_t* perm, const c10::optional<at::Tensor>& bias, const at::Tensor& out,
         bool decode) {
  const std::vector<float> xf = gathered_rows(x.const_data_ptr<T>(), x.stride(0), [](int64_t m) { return m; }, perm,
                                              a.M, a.K);
  const int32_t* qw = qweight.const_data_ptr<int32_t>();
  const T* s = scales.const_data_ptr<T>();
  const int16_t* z = zeros.const_data_ptr<int16_t>();
  const T* b = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  T* o = out.mutable_data_ptr<T>();
  const int64_t os = out.stride(0);
  quant_rows(a, xf.data(), qw, s, z, b, o, os, decode);
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
  const int64_t M = x.size(0), K = x.size(1);
  QuantArgs args = check_packed(qweight, scales, zeros, perm, bits, group_size, K, x.scalar_type(), {});
  args.M = M;
  const int64_t N = args.N;
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.sizes() == at::IntArrayRef({M, N}) && out.stride(1) == 1,
              "llmkern_cpu: out must be (M, N) of x's dtype");
  const int32_t* pp = perm.has_value() ? perm->const_data_ptr<int32_t>() : nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == N,
                "llmkern_cpu: bias must be (N,) of x's dtype");
  }
  TORCH_CHECK(path >= 0 && path <= 2, "llmkern_cpu: path must be 0 (by M), 1 (decode) or 2 (GEMM)");
  if (M == 0 || N == 0) return;
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
