// The fused MoE MLP on CPU (llmkern::fused_moe with dense experts):
//   out[t] = sum_k topk_weights[t, k] * w2[e] @ (silu(w13[e][:I] @ x[t]) * (w13[e][I:] @ x[t])),  e = topk_ids[t, k]
// with x (T, H), w13 (E, 2I, H) and w2 (E, H, I) in one dtype (fp32, bf16 or fp16).
//
// What it reads: the weights of the experts some token picked, once per call, in their stored dtype (no fp32 copy
// of a weight, no expert that no token picked; ids outside [0, E) route their slot nowhere). The (token, k) "slots"
// are sorted by expert (a counting sort, stable in slot order); then two passes, each one at::parallel_for over
// (expert hit, block of kDotRows weight rows) work items, contiguous ranges per thread so that a thread streams a run
// of one expert's rows in memory order:
//   1. gate/up: an item reads kDotRows gate rows and the matching up rows and, for each of the expert's slots,
//      computes their dot products with the slot's token (the GEMV tile of csrc/linear.cpp, llmkern_cpu.h dot_rows:
//      the weight rows stay in L1 across the slots) and writes silu(gate) * up, rounded to the dtype, to h[slot];
//   2. down: an item reads kDotRows rows of w2 and writes, for each of the expert's slots, topk_weight * (w2 @ h[slot])
//      rounded to the dtype, to y[slot];
//   3. sum: each token adds its slots' y rows in k order, in fp32, and rounds once (deterministic; no atomics).
// The roundings are the Triton path's (llmkern/moe.py): fp32 accumulation, h and each weighted expert output rounded
// to the dtype once, the top_k sum in fp32 rounded once.
//
// Every expert's rows go through the GEMV tile whatever its slot count: at decode (a few slots per expert) the
// weight reads bound it; with many slots per expert (prefill) a weight block is reused from L1 by every slot, and the
// FMA rate of the tile (4 FMAs per 5 vector loads) bounds it.
#include <memory>
#include <vector>

#include "llmkern_cpu.h"

namespace llmkern {
namespace {

// The valid slots (id in [0, E)) grouped by expert: expert hit[i]'s slots are order[start[i] .. start[i + 1]), in
// slot order.
struct Routing {
  std::vector<int64_t> hit, start, order;
};

Routing route(const int64_t* ids, int64_t slots, int64_t E) {
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t s = 0; s < slots; ++s) {
    if (ids[s] >= 0 && ids[s] < E) ++count[ids[s] + 1];
  }
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];     // count[e]: where expert e's slots begin
  Routing r;
  r.order.resize(count[E]);
  std::vector<int64_t> cursor(count.begin(), count.end() - 1);
  for (int64_t s = 0; s < slots; ++s) {
    if (ids[s] >= 0 && ids[s] < E) r.order[cursor[ids[s]]++] = s;
  }
  for (int64_t e = 0; e < E; ++e) {
    if (count[e + 1] > count[e]) {
      r.hit.push_back(e);
      r.start.push_back(count[e]);
    }
  }
  r.start.push_back(count[E]);
  return r;
}

// fn(i, n0, rows) for every block of kDotRows rows (n0 its first row, rows <= kDotRows) of every hit expert i's
// N-row weight, over torch's threads: one contiguous range of (expert, block) items per thread.
template <typename F>
void for_each_row_block(const Routing& r, int64_t N, const F& fn) {
  const int64_t blocks = (N + kDotRows - 1) / kDotRows, items = static_cast<int64_t>(r.hit.size()) * blocks;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, items, (items + threads - 1) / threads, [&](int64_t b0, int64_t b1) {
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t i = item / blocks, n0 = item % blocks * kDotRows;
      fn(i, n0, std::min<int64_t>(kDotRows, N - n0));
    }
  });
}

inline float silu_mul(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

template <typename T>
void fused_moe_impl(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const float* topk_w,
                    const int64_t* ids, int64_t top_k, at::Tensor& out) {
  const int64_t T_ = x.size(0), H = x.size(1), E = w13.size(0), I = w2.size(2), slots = T_ * top_k;
  const Routing r = route(ids, slots, E);
  // x as fp32 once (the tile's x operand); h and y are written for the valid slots only
  std::unique_ptr<float[]> xf(new float[T_ * H]), h(new float[slots * I]), y(new float[slots * H]);
  at::parallel_for(0, T_, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) convert_row(x.const_data_ptr<T>() + t * x.stride(0), xf.get() + t * H, H);
  });
  const T* w13p = w13.const_data_ptr<T>();
  const T* w2p = w2.const_data_ptr<T>();
  const int64_t s13e = w13.stride(0), s13n = w13.stride(1), s2e = w2.stride(0), s2n = w2.stride(1);

  for_each_row_block(r, I, [&](int64_t i, int64_t j0, int64_t rows) {      // 1. gate/up
    const T* gate = w13p + r.hit[i] * s13e + j0 * s13n;
    const T* up = gate + I * s13n;
    for (int64_t p = r.start[i]; p < r.start[i + 1]; ++p) {
      const int64_t s = r.order[p];
      float g[kDotRows], u[kDotRows];
      dot_rows_n(gate, s13n, rows, xf.get() + s / top_k * H, H, g);
      dot_rows_n(up, s13n, rows, xf.get() + s / top_k * H, H, u);
      for (int64_t c = 0; c < rows; ++c) h[s * I + j0 + c] = round_scalar<T>(silu_mul(g[c], u[c]));
    }
  });
  for_each_row_block(r, H, [&](int64_t i, int64_t n0, int64_t rows) {      // 2. down, times the routing weight
    const T* down = w2p + r.hit[i] * s2e + n0 * s2n;
    for (int64_t p = r.start[i]; p < r.start[i + 1]; ++p) {
      const int64_t s = r.order[p];
      float acc[kDotRows];
      dot_rows_n(down, s2n, rows, h.get() + s * I, I, acc);
      for (int64_t c = 0; c < rows; ++c) y[s * H + n0 + c] = round_scalar<T>(acc[c] * topk_w[s]);
    }
  });
  T* o = out.mutable_data_ptr<T>();                                          // 3. each token's slots, in k order
  at::parallel_for(0, T_, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t n = 0; n < H; n += kF) {
        const int64_t len = std::min(kF, H - n);
        fVec sum(0.f);
        for (int64_t k = 0; k < top_k; ++k) {
          const int64_t s = t * top_k + k;
          if (ids[s] >= 0 && ids[s] < E) sum = sum + fVec::loadu(y.get() + s * H + n, len);
        }
        store_f(o + t * out.stride(0) + n, sum, len);
      }
    }
  });
}

// x (T, H) fp32/bf16/fp16 with a contiguous last dim; w13 (E, 2I, H) and w2 (E, H, I) of x's dtype, any strides but
// a contiguous last dim; topk_weights (T, top_k) contiguous float32; topk_ids (T, top_k) contiguous int64 (values
// outside [0, E) skip their slot); out (T, H) of x's dtype with a contiguous last dim, written.
void fused_moe(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& topk_weights,
               const at::Tensor& topk_ids, at::Tensor& out) {
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_last_dim_contiguous(x, "x");
  for (const auto& [w, name] : {std::pair{&w13, "w13"}, std::pair{&w2, "w2"}}) {
    check_cpu(*w, name);
    check_dim(*w, 3, name);
    check_last_dim_contiguous(*w, name);
    check_same_dtype(x, *w, "x", name);
  }
  const int64_t T_ = x.size(0), H = x.size(1), E = w13.size(0), I = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == H, "llmkern_cpu: w13 must be (E, 2 * I, x's hidden)");
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == H && w2.size(2) == I, "llmkern_cpu: w2 must be (E, hidden, I)");
  check_cpu(topk_weights, "topk_weights");
  check_cpu(topk_ids, "topk_ids");
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat && topk_weights.dim() == 2 && topk_weights.size(0) == T_ &&
                  topk_weights.is_contiguous(), "llmkern_cpu: topk_weights must be contiguous float32 (T, top_k)");
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong && topk_ids.sizes() == topk_weights.sizes() &&
                  topk_ids.is_contiguous(), "llmkern_cpu: topk_ids must be contiguous int64 of topk_weights' shape");
  check_same_dtype(x, out, "x", "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == T_ && out.size(1) == H && out.stride(1) == 1,
              "llmkern_cpu: out must be (T, hidden) with a contiguous last dim");
  if (T_ == 0 || H == 0) return;
  const int64_t top_k = topk_ids.size(1);
  LLMKERN_DISPATCH_FLOAT(x.scalar_type(), "llmkern_cpu::fused_moe", [&] {
    fused_moe_impl<scalar_t>(x, w13, w2, topk_weights.const_data_ptr<float>(), topk_ids.const_data_ptr<int64_t>(),
                             top_k, out);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkern_cpu, m) {
  m.def("fused_moe(Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, Tensor(a!) out) -> ()",
        &fused_moe);
}

}  // namespace llmkern
