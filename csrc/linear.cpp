// Dense linear layer at decode shapes on CPU: out (M, N) = x (M, K) @ weight.T + bias, M <= 16, weight (N, K) in
// x's dtype (fp32, bf16 or fp16), as torch.nn.functional.linear computes it.
//
// Why a kernel of our own: at M = 1 torch's CPU F.linear (MKL's GEMV in torch 2.13's wheel) runs on one thread
// whatever torch.get_num_threads() says (measured on this project's 2-core CPU: a 49152 x 576 fp32 F.linear keeps
// one thread busy, a 1024^3 matmul both), so a decode step, which is mostly weight reads, gets one core's memory
// bandwidth. Here the weight rows are split over torch's intra-op threads (at::parallel_for, one contiguous range of
// rows each) and streamed once, in memory order, kRows rows at a time with one fp32 vector accumulator per row; x
// (converted to fp32 once, M * K floats) stays in L1. Each output is a dot product summed in fp32 lanes and reduced
// once, plus the bias, rounded once to x's dtype.
#include <vector>

#include "llmkern_cpu.h"

namespace llmkern {
namespace {

// The rows M up to which this kernel runs (the Python side sends larger M to torch's GEMM): every row of x
// re-reads the thread's kRows weight rows from L1, which stops paying off once M rows of x make it a GEMM.
constexpr int64_t kMaxRows = 16;
// Weight rows per block: the GEMV tile's (llmkern_cpu.h, dot_rows).
constexpr int kRows = kDotRows;

template <typename T>
void linear_impl(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                 at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  std::vector<float> xf(M * K);
  for (int64_t m = 0; m < M; ++m) convert_row_gemv(x.const_data_ptr<T>() + m * x.stride(0), xf.data() + m * K, K);
  const T* w = weight.const_data_ptr<T>();
  const int64_t ws = weight.stride(0);
  const T* b = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  T* o = out.data_ptr<T>();
  const int64_t os = out.stride(0);
  const int64_t blocks = (N + kRows - 1) / kRows;
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, blocks, (blocks + threads - 1) / threads, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * kRows, rows = std::min<int64_t>(kRows, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        float acc[kRows];
        dot_rows_n(w + n0 * ws, ws, rows, xf.data() + m * K, K, acc,   // the next block prefetched on row 0's pass
                   m == 0 && n0 + 2 * kRows <= N ? w + (n0 + kRows) * ws : nullptr);
        for (int64_t r = 0; r < rows; ++r) {
          const float v = acc[r] + (b ? static_cast<float>(b[n0 + r]) : 0.f);
          o[m * os + n0 + r] = static_cast<T>(v);
        }
      }
    }
  });
}

void linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_last_dim_contiguous(x, "x");
  TORCH_CHECK(x.size(0) <= kMaxRows, "llmkern_cpu: linear takes at most 16 rows of x");
  check_dim(weight, 2, "weight");
  check_last_dim_contiguous(weight, "weight");
  check_same_dtype(x, weight, "x", "weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "llmkern_cpu: weight must be (out_features, x's in_features)");
  if (bias.has_value()) {
    check_same_dtype(x, *bias, "x", "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->stride(0) == 1,
                "llmkern_cpu: bias must be a contiguous (out_features,) vector");
  }
  check_same_dtype(x, out, "x", "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == weight.size(0) && out.stride(1) == 1,
              "llmkern_cpu: out must be (rows of x, out_features) with a contiguous last dim");
  if (out.numel() == 0) return;
  LLMKERN_DISPATCH_FLOAT(x.scalar_type(), "llmkern_cpu::linear", [&] { linear_impl<scalar_t>(x, weight, bias, out); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkern_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out) -> ()", &linear);
}

}  // namespace llmkern
