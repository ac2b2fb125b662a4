// The fused MoE MLP on CPU (llmkern::fused_moe):
//   out[t] = sum_k topk_weights[t, k] * w2[e] @ (silu(w13[e][:I] @ x[t]) * (w13[e][I:] @ x[t])),  e = topk_ids[t, k]
// with x (T, H), w13 (E, 2I, H) and w2 (E, H, I); each weight dense in x's dtype (fp32, bf16 or fp16) or in
// llmkern's packed int4/int8 format (llmkern/quant_weight.py, stacked per expert: llmkern.QuantizedExperts).
//
// What it reads: the weights of the experts some token picked, once per call, in their stored dtype (no fp32 copy
// of a weight, no expert that no token picked; ids outside [0, E) route their slot nowhere). The (token, k) "slots"
// are sorted by expert (a counting sort, stable in slot order); then two passes, each one at::parallel_for over
// (expert hit, block of kDotRows weight rows) work items, contiguous ranges per thread so that a thread streams a run
// of one expert's rows in memory order:
//   1. gate/up: an item reads kDotRows gate rows and the matching up rows and, for each of the expert's slots,
//      computes their dot products with the slot's token (the GEMV tile of csrc/linear.cpp, llmkern_cpu.h dot_rows:
//      the weight rows stay in cache across the slots; the first slot's pass prefetches the next block's rows) and
//      writes silu(gate) * up, rounded to the dtype, to h[slot], in the order the down projection's tile reads its x
//      in (gemv_pos: bf16's pair order for dense bf16 w2);
//   2. down: an item reads kDotRows rows of w2 and writes, for each of the expert's slots, topk_weight * (w2 @ h[slot])
//      rounded to the dtype, to y[slot];
//   3. sum: each token adds its slots' y rows in k order, in fp32, and rounds once (deterministic; no atomics).
// The roundings are the Triton path's (llmkern/moe.py): fp32 accumulation, h and each weighted expert output rounded
// to the dtype once, the top_k sum in fp32 rounded once.
//
// Dense experts' rows go through the GEMV tile whatever their slot count: at decode (a few slots per expert) the
// weight reads bound it; with many slots per expert (prefill) a weight block is reused from L1 by every slot, and the
// FMA rate of the tile bounds it.
// A packed projection runs expert by expert through quant_matmul's two paths (csrc/quant_gemm.h: the decode path up
// to kDecodeMaxM slots, which streams the packed words once, else the dequantized-tile GEMM), each parallel over the
// expert's columns (or experts over the threads when enough are hit: for_each_expert), on the expert's slots' rows
// gathered (through the expert's act-order perm) into fp32; the same roundings follow.
#include <memory>
#include <vector>

#include "quant_gemm.h"

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

// fn(i) for every hit expert i: over torch's threads, one expert per thread at a time, when there are at least as
// many experts as threads (a packed expert's paths then run serially inside: one parallel region per pass, not one
// or two per expert, each of which waits for its slowest thread); else one expert after the other, each spread over
// the threads by its own paths.
template <typename F>
void for_each_expert(const Routing& r, const F& fn) {
  const int64_t hits = static_cast<int64_t>(r.hit.size());
  if (hits >= at::get_num_threads()) {
    at::parallel_for(0, hits, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) fn(i);
    });
  } else {
    for (int64_t i = 0; i < hits; ++i) fn(i);
  }
}

inline float silu_mul(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

// One projection's experts (N output rows, K inputs each) as the kernel reads them: dense, element (e, n, k) at
// w[e * se + n * sn + k], or packed, expert e's words, scales, zeros and perm at e times their per-expert sizes.
template <typename T>
struct Experts {
  int64_t N = 0, K = 0;
  const T* w = nullptr;
  int64_t se = 0, sn = 0;
  quant_gemm::QuantArgs q{};
  const int32_t* qw = nullptr;
  const T* scales = nullptr;
  const int16_t* zeros = nullptr;
  const int32_t* perm = nullptr;

  bool packed() const { return qw != nullptr; }

  // out (M, N) fp32 = rows (M, K) of src, row m at src + row(m) * stride, times expert e's packed weight.
  template <typename Row>
  void packed_rows(int64_t e, const float* src, int64_t stride, const Row& row, int64_t M, float* out) const {
    quant_gemm::QuantArgs a = q;
    a.M = M;
    const int64_t groups = K / q.group;
    const std::vector<float> xe = quant_gemm::gathered_rows(src, stride, row, perm ? perm + e * K : nullptr, M, K);
    quant_gemm::quant_rows<T, float>(a, xe.data(), qw + e * (K * q.bits / 32) * N, scales + e * groups * N,
                                     zeros + e * groups * N, nullptr, out, N, M <= quant_gemm::kDecodeMaxM);
  }
};

template <typename T>
void fused_moe_impl(const at::Tensor& x, const Experts<T>& w13, const Experts<T>& w2, const float* topk_w,
                    const int64_t* ids, int64_t E, int64_t top_k, at::Tensor& out) {
  const int64_t T_ = x.size(0), H = x.size(1), I = w2.K, slots = T_ * top_k;
  const Routing r = route(ids, slots, E);
  // x as fp32 once (the tile's x operand); h and y are written for the valid slots only
  std::unique_ptr<float[]> xf(new float[T_ * H]), h(new float[slots * I]), y(new float[slots * H]);
  at::parallel_for(0, T_, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (w13.packed()) convert_row(x.const_data_ptr<T>() + t * x.stride(0), xf.get() + t * H, H);
      else convert_row_gemv(x.const_data_ptr<T>() + t * x.stride(0), xf.get() + t * H, H);
    }
  });
  // h in the down projection's x order (its GEMV tile's for dense w2, natural for packed)
  const auto hpos = [&](int64_t j) { return w2.packed() ? j : gemv_pos<T>(j, I); };
  const auto slot_of = [&](int64_t i) { return [&r, i](int64_t m) { return r.order[r.start[i] + m]; }; };
  const auto token_of = [&](int64_t i) { return [&r, i, top_k](int64_t m) { return r.order[r.start[i] + m] / top_k; }; };

  if (!w13.packed()) {                                                       // 1. gate/up
    for_each_row_block(r, I, [&](int64_t i, int64_t j0, int64_t rows) {
      const T* gate = w13.w + r.hit[i] * w13.se + j0 * w13.sn;
      const T* up = gate + I * w13.sn;
      for (int64_t p = r.start[i]; p < r.start[i + 1]; ++p) {
        const int64_t s = r.order[p];
        float g[kDotRows], u[kDotRows];
        const bool pf = p == r.start[i] && j0 + 2 * kDotRows <= I;   // the next block's rows, on the first slot's pass
        dot_rows_n(gate, w13.sn, rows, xf.get() + s / top_k * H, H, g, pf ? gate + kDotRows * w13.sn : nullptr);
        dot_rows_n(up, w13.sn, rows, xf.get() + s / top_k * H, H, u, pf ? up + kDotRows * w13.sn : nullptr);
        for (int64_t c = 0; c < rows; ++c) h[s * I + hpos(j0 + c)] = round_scalar<T>(silu_mul(g[c], u[c]));
      }
    });
  } else {
    for_each_expert(r, [&](int64_t i) {
      const int64_t M = r.start[i + 1] - r.start[i];
      std::vector<float> gu(M * 2 * I);
      w13.packed_rows(r.hit[i], xf.get(), H, token_of(i), M, gu.data());
      for (int64_t m = 0; m < M; ++m) {
        const int64_t s = slot_of(i)(m);
        for (int64_t j = 0; j < I; ++j) h[s * I + hpos(j)] = round_scalar<T>(silu_mul(gu[m * 2 * I + j], gu[m * 2 * I + I + j]));
      }
    });
  }
  if (!w2.packed()) {                                                        // 2. down, times the routing weight
    for_each_row_block(r, H, [&](int64_t i, int64_t n0, int64_t rows) {
      const T* down = w2.w + r.hit[i] * w2.se + n0 * w2.sn;
      for (int64_t p = r.start[i]; p < r.start[i + 1]; ++p) {
        const int64_t s = r.order[p];
        float acc[kDotRows];
        dot_rows_n(down, w2.sn, rows, h.get() + s * I, I, acc,
                   p == r.start[i] && n0 + 2 * kDotRows <= H ? down + kDotRows * w2.sn : nullptr);
        for (int64_t c = 0; c < rows; ++c) y[s * H + n0 + c] = round_scalar<T>(acc[c] * topk_w[s]);
      }
    });
  } else {
    for_each_expert(r, [&](int64_t i) {
      const int64_t M = r.start[i + 1] - r.start[i];
      std::vector<float> yd(M * H);
      w2.packed_rows(r.hit[i], h.get(), I, slot_of(i), M, yd.data());
      for (int64_t m = 0; m < M; ++m) {
        const int64_t s = slot_of(i)(m);
        for (int64_t n = 0; n < H; ++n) y[s * H + n] = round_scalar<T>(yd[m * H + n] * topk_w[s]);
      }
    });
  }
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

// One projection's arguments (the op's w, scales, zeros, perm, bits, group_size) checked and read as Experts: N rows
// of K inputs per expert, E experts. bits 16: dense, of x's dtype, any strides but a contiguous last dim; bits 4/8:
// the packed format (quant_gemm::check_packed).
template <typename T>
Experts<T> experts(const at::Tensor& w, const c10::optional<at::Tensor>& scales,
                   const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm, int64_t bits,
                   int64_t group_size, int64_t E, int64_t N, int64_t K, const char* name) {
  Experts<T> ex;
  ex.N = N;
  ex.K = K;
  check_cpu(w, name);
  if (bits == 16) {
    TORCH_CHECK(!scales.has_value() && !zeros.has_value() && !perm.has_value(), "llmkern_cpu: ", name,
                ": a dense weight takes no scales, zeros or perm");
    check_dim(w, 3, name);
    check_last_dim_contiguous(w, name);
    TORCH_CHECK(w.scalar_type() == c10::CppTypeToScalarType<T>::value, "llmkern_cpu: ", name, " must have x's dtype");
    TORCH_CHECK(w.size(0) == E && w.size(1) == N && w.size(2) == K, "llmkern_cpu: ", name, " must be (", E, ", ", N,
                ", ", K, ")");
    ex.w = w.const_data_ptr<T>();
    ex.se = w.stride(0);
    ex.sn = w.stride(1);
    return ex;
  }
  TORCH_CHECK(scales.has_value() && zeros.has_value(), "llmkern_cpu: ", name, ": a packed weight needs scales and zeros");
  ex.q = quant_gemm::check_packed(w, *scales, *zeros, perm, bits, group_size, K, c10::CppTypeToScalarType<T>::value,
                                  {E});
  TORCH_CHECK(ex.q.N == N, "llmkern_cpu: ", name, " must have ", N, " output rows");
  ex.qw = w.const_data_ptr<int32_t>();
  ex.scales = scales->const_data_ptr<T>();
  ex.zeros = zeros->const_data_ptr<int16_t>();
  ex.perm = perm.has_value() ? perm->const_data_ptr<int32_t>() : nullptr;
  return ex;
}

// x (T, H) fp32/bf16/fp16 with a contiguous last dim; w13 (E, 2I, H) and w2 (E, H, I), each dense (bits 16) or
// packed (bits 4/8 with scales, zeros and an optional perm; `experts` above); topk_weights (T, top_k) contiguous
// float32; topk_ids (T, top_k) contiguous int64 (values outside [0, E) skip their slot); out (T, H) of x's dtype
// with a contiguous last dim, written. E and I are read from w2 (E, H, I).
void fused_moe(const at::Tensor& x, const at::Tensor& w13, const c10::optional<at::Tensor>& w13_scales,
               const c10::optional<at::Tensor>& w13_zeros, const c10::optional<at::Tensor>& w13_perm,
               int64_t w13_bits, int64_t w13_group_size, const at::Tensor& w2,
               const c10::optional<at::Tensor>& w2_scales, const c10::optional<at::Tensor>& w2_zeros,
               const c10::optional<at::Tensor>& w2_perm, int64_t w2_bits, int64_t w2_group_size,
               const at::Tensor& topk_weights, const at::Tensor& topk_ids, at::Tensor& out) {
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_last_dim_contiguous(x, "x");
  const int64_t T_ = x.size(0), H = x.size(1);
  TORCH_CHECK(w2.dim() == 3, "llmkern_cpu: w2 must have 3 dimensions");
  const int64_t E = w2.size(0), I = w2_bits == 16 ? w2.size(2) : w2.size(1) * (32 / std::max<int64_t>(w2_bits, 1));
  check_cpu(topk_weights, "topk_weights");
  check_cpu(topk_ids, "topk_ids");
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat && topk_weights.dim() == 2 && topk_weights.size(0) == T_ &&
                  topk_weights.is_contiguous(), "llmkern_cpu: topk_weights must be contiguous float32 (T, top_k)");
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong && topk_ids.sizes() == topk_weights.sizes() &&
                  topk_ids.is_contiguous(), "llmkern_cpu: topk_ids must be contiguous int64 of topk_weights' shape");
  check_same_dtype(x, out, "x", "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == T_ && out.size(1) == H && out.stride(1) == 1,
              "llmkern_cpu: out must be (T, hidden) with a contiguous last dim");
  LLMKERN_DISPATCH_FLOAT(x.scalar_type(), "llmkern_cpu::fused_moe", [&] {
    const auto a = experts<scalar_t>(w13, w13_scales, w13_zeros, w13_perm, w13_bits, w13_group_size, E, 2 * I, H, "w13");
    const auto b = experts<scalar_t>(w2, w2_scales, w2_zeros, w2_perm, w2_bits, w2_group_size, E, H, I, "w2");
    if (T_ == 0 || H == 0) return;
    fused_moe_impl<scalar_t>(x, a, b, topk_weights.const_data_ptr<float>(), topk_ids.const_data_ptr<int64_t>(), E,
                             topk_ids.size(1), out);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkern_cpu, m) {
  m.def("fused_moe(Tensor x, Tensor w13, Tensor? w13_scales, Tensor? w13_zeros, Tensor? w13_perm, int w13_bits, "
        "int w13_group_size, Tensor w2, Tensor? w2_scales, Tensor? w2_zeros, Tensor? w2_perm, int w2_bits, "
        "int w2_group_size, Tensor topk_weights, Tensor topk_ids, Tensor(a!) out) -> ()",
        &fused_moe);
}

}  // namespace llmkern
