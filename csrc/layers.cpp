// RMSNorm (optionally fused with the residual add) and rotary position embedding on CPU.
//
// Both are memory-bound streams over (rows, hidden) data: one pass reads each input once and writes each output
// once, vectorized along the contiguous last dimension, with rows (tokens) split over threads. The semantics are
// llmkern.reference's (and the Triton kernels' in kernels/layers.py): fp32 statistics and rotations, Hugging Face's
// roundings, one rounding to the input dtype at the end.
#include "llmkern_cpu.h"

#include <vector>

namespace llmkern {
namespace {

// Rows per parallel task: about 32K elements, so that a task amortizes its dispatch and a decode batch of a few
// rows still runs on one thread without the fork/join cost.
int64_t row_grain(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)); }

// ----------------------------------------------------------------------------------------------------- RMSNorm
// y = v * rstd * (offset + w), v = x (+ residual, rounded to T and stored as the new residual), rstd =
// 1 / sqrt(mean(v^2) + eps). llama: v * rstd is rounded to T before the weight multiply (LlamaRMSNorm); otherwise
// one rounding at the end (Gemma2RMSNorm). W is T or float (the caller converts any other weight dtype to float).
template <typename T, typename W>
void rms_norm_impl(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                   const at::Tensor& y, const c10::optional<at::Tensor>& residual_out, float eps, float offset,
                   bool llama) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.const_data_ptr<T>();
  const W* wp = weight.const_data_ptr<W>();
  T* yp = y.mutable_data_ptr<T>();
  const bool has_res = residual.has_value();
  const T* rp = has_res ? residual->const_data_ptr<T>() : nullptr;
  T* rop = has_res ? residual_out->mutable_data_ptr<T>() : nullptr;
  const int64_t sx = x.stride(0), sy = y.stride(0);
  const int64_t sr = has_res ? residual->stride(0) : 0, sro = has_res ? residual_out->stride(0) : 0;
  constexpr int64_t kStep = 2 * kF;  // one pair (load_pair): a full 16-bit vector, or two fp32 vectors
  const int64_t n_vec = n - n % kStep;

  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    // offset + w as fp32, once per task, in T's pair order, so that the row loop reads it with no conversion.
    std::vector<float> wf(n_vec);
    for (int64_t i = 0; i < n_vec; i += kStep) {
      if constexpr (std::is_same_v<W, T>) {
        fVec a, b;
        load_pair(wp + i, a, b);
        (a + fVec(offset)).store(wf.data() + i);
        (b + fVec(offset)).store(wf.data() + i + kF);
      } else {  // a float weight next to 16-bit x (rare): placed lane by lane
        for (int64_t j = 0; j < kStep; ++j) {
          const int64_t lane = std::is_same_v<T, BF16> ? (j % 2) * kF + j / 2 : j;
          wf[i + lane] = static_cast<float>(wp[i + j]) + offset;
        }
      }
    }

    bool w_finite = true;
    for (int64_t i = 0; i < n_vec; ++i) w_finite &= std::isfinite(wf[i]);

    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = xp + r * sx;
      T* yr = yp + r * sy;
      // Pass 1: the sum of squares of v (and v itself stored as the new residual).
      fVec acc(0.f);
      float acc_tail = 0.f;
      const T* vr = xr;
      if (has_res) {
        const T* rr = rp + r * sr;
        T* ror = rop + r * sro;
        for (int64_t i = 0; i < n_vec; i += kStep) {
          fVec a, b, ra, rb;
          load_pair(xr + i, a, b);
          load_pair(rr + i, ra, rb);
          a = a + ra;
          b = b + rb;
          round_pair<T>(a, b);
          store_pair(ror + i, a, b);
          acc = at::vec::fmadd(a, a, at::vec::fmadd(b, b, acc));
        }
        for (int64_t i = n_vec; i < n; ++i) {
          const float v = round_scalar<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
          ror[i] = static_cast<T>(v);
          acc_tail += v * v;
        }
        vr = ror;
      } else {
        for (int64_t i = 0; i < n_vec; i += kStep) {
          fVec a, b;
          load_pair(xr + i, a, b);
          acc = at::vec::fmadd(a, a, at::vec::fmadd(b, b, acc));
        }
        for (int64_t i = n_vec; i < n; ++i) {
          const float v = static_cast<float>(xr[i]);
          acc_tail += v * v;
        }
      }
      const float sumsq = hsum(acc) + acc_tail;
      const float rstd = 1.f / std::sqrt(sumsq / static_cast<float>(n) + eps);

      // Pass 2: re-read v (from L1/L2: the row was just touched) and write y. A finite sum of squares means every v
      // is finite and |v * rstd| <= sqrt(n); with a finite weight no product is NaN, and bf16 rounding skips its NaN
      // blend (the row's own test costs nothing next to two blends per vector).
      const fVec rstd_v(rstd);
      auto pass2 = [&](auto llama_c, auto no_nan_c) {
        constexpr bool kLlama = decltype(llama_c)::value, kNoNaN = decltype(no_nan_c)::value;
        for (int64_t i = 0; i < n_vec; i += kStep) {
          fVec a, b;
          load_pair(vr + i, a, b);
          a = a * rstd_v;
          b = b * rstd_v;
          if constexpr (kLlama) round_pair<T, kNoNaN>(a, b);
          store_pair<T, kNoNaN>(yr + i, a * fVec::loadu(wf.data() + i), b * fVec::loadu(wf.data() + i + kF));
        }
      };
      const bool no_nan = w_finite && std::isfinite(sumsq);
      if (llama) {
        no_nan ? pass2(std::true_type{}, std::true_type{}) : pass2(std::true_type{}, std::false_type{});
      } else {
        no_nan ? pass2(std::false_type{}, std::true_type{}) : pass2(std::false_type{}, std::false_type{});
      }
      for (int64_t i = n_vec; i < n; ++i) {
        float v = static_cast<float>(vr[i]) * rstd;
        if (llama) v = round_scalar<T>(v);
        yr[i] = static_cast<T>(v * (static_cast<float>(wp[i]) + offset));
      }
    }
  });
}

void rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
              const at::Tensor& y, const c10::optional<at::Tensor>& residual_out, double eps, double offset,
              bool llama) {
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_last_dim_contiguous(x, "x");
  check_float(weight, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.stride(0) == 1,
              "llmkern_cpu: weight must be a contiguous (hidden,) vector");
  check_same_dtype(x, y, "x", "y");
  TORCH_CHECK(y.sizes() == x.sizes(), "llmkern_cpu: y must have x's shape");
  check_last_dim_contiguous(y, "y");
  TORCH_CHECK(residual.has_value() == residual_out.has_value(),
              "llmkern_cpu: residual and residual_out go together");
  if (residual.has_value()) {
    for (const auto* t : {&*residual, &*residual_out}) {
      check_same_dtype(x, *t, "x", "residual");
      TORCH_CHECK(t->sizes() == x.sizes(), "llmkern_cpu: residual tensors must have x's shape");
      check_last_dim_contiguous(*t, "residual");
    }
  }
  if (x.numel() == 0) return;
  const auto wdt = weight.scalar_type();
  LLMKERN_DISPATCH_FLOAT(x.scalar_type(), "llmkern_cpu::rms_norm", [&] {
    if (wdt == x.scalar_type()) {
      rms_norm_impl<scalar_t, scalar_t>(x, residual, weight, y, residual_out, eps, offset, llama);
    } else {
      // A weight in another dtype: read as fp32 (hidden elements, small next to the rows).
      rms_norm_impl<scalar_t, float>(x, residual, weight.to(at::kFloat), y, residual_out, eps, offset, llama);
    }
  });
}

// -------------------------------------------------------------------------------------------------------- RoPE
// One token's rotation: for the halves x1, x2 of every head, y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin (rotate-half,
// GPT-NeoX / Hugging Face Llama). c and s hold the token's `half` angles' cosines and sines. In place when out == in:
// each element is read before it is written, by the same thread.
template <typename T>
void rotate_heads(const T* in, T* out, int64_t heads, int64_t stride_in, int64_t stride_out, const float* c,
                  const float* s, int64_t half) {
  constexpr int64_t kStep = 2 * kF;  // one full 16-bit vector: two fp32 vectors, converted back with one store
  for (int64_t h = 0; h < heads; ++h) {
    const T* x = in + h * stride_in;
    T* y = out + h * stride_out;
    int64_t i = 0;
    for (; i + kStep <= half; i += kStep) {
      fVec x1a, x1b, x2a, x2b;
      load2_f(x + i, x1a, x1b);
      load2_f(x + half + i, x2a, x2b);
      const fVec ca = fVec::loadu(c + i), cb = fVec::loadu(c + i + kF);
      const fVec sa = fVec::loadu(s + i), sb = fVec::loadu(s + i + kF);
      store2_f(y + i, at::vec::fmsub(x1a, ca, x2a * sa), at::vec::fmsub(x1b, cb, x2b * sb));
      store2_f(y + half + i, at::vec::fmadd(x2a, ca, x1a * sa), at::vec::fmadd(x2b, cb, x1b * sb));
    }
    for (; i < half; i += kF) {
      const int64_t n = std::min(kF, half - i);
      const fVec x1 = load_f(x + i, n), x2 = load_f(x + half + i, n);
      const fVec cv = fVec::loadu(c + i, n), sv = fVec::loadu(s + i, n);
      store_f(y + i, at::vec::fmsub(x1, cv, x2 * sv), n);
      store_f(y + half + i, at::vec::fmadd(x2, cv, x1 * sv), n);
    }
  }
}

template <typename T, typename TableT>
void rope_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out, const at::Tensor& k_out,
               const c10::optional<at::Tensor>& positions, const c10::optional<at::Tensor>& cos,
               const c10::optional<at::Tensor>& sin, double theta) {
  const int64_t batch = q.size(0), seqlen = q.size(1), hq = q.size(2), hk = k.size(2), d = q.size(3);
  const int64_t half = d / 2;
  const bool use_table = cos.has_value();
  // inv_freq_i = theta^(-2i/d) (RoFormer eq. 15; Hugging Face's default rotary inv_freq), computed in double and
  // rounded to fp32 once, as the fp32 tables Hugging Face builds hold it.
  std::vector<float> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) {
    inv_freq[i] = static_cast<float>(std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d)));
  }
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  T* qop = q_out.mutable_data_ptr<T>();
  T* kop = k_out.mutable_data_ptr<T>();
  // A table or positions tensor with batch 1 serves every sequence: stride 0 over the batch.
  const auto bstride = [](const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : 0; };
  const TableT* cp = use_table ? cos->const_data_ptr<TableT>() : nullptr;
  const TableT* sp = use_table ? sin->const_data_ptr<TableT>() : nullptr;
  const int64_t scb = use_table ? bstride(*cos) : 0, scs = use_table ? cos->stride(1) : 0;
  const int64_t ssb = use_table ? bstride(*sin) : 0, sss = use_table ? sin->stride(1) : 0;
  const int64_t spb = use_table ? 0 : bstride(*positions), sps = use_table ? 0 : positions->stride(1);
  const bool pos64 = !use_table && positions->scalar_type() == at::kLong;
  const void* pp = use_table ? nullptr : positions->const_data_ptr();

  at::parallel_for(0, batch * seqlen, row_grain((hq + hk) * d), [&](int64_t t0, int64_t t1) {
    std::vector<float> c(half + kF), s(half + kF);  // + kF: room for a whole vector at the tail
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / seqlen, si = t % seqlen;
      if (use_table) {
        const TableT* ct = cp + b * scb + si * scs;
        const TableT* st = sp + b * ssb + si * sss;
        convert_row(ct, c.data(), half);
        convert_row(st, s.data(), half);
      } else {
        const int64_t off = b * spb + si * sps;
        const float pos = pos64 ? static_cast<float>(static_cast<const int64_t*>(pp)[off])
                                : static_cast<float>(static_cast<const int32_t*>(pp)[off]);
        const fVec pv(pos);
        // the angle rounded to fp32 as Hugging Face's fp32 `position * inv_freq`; cos/sin by SLEEF (1 ulp)
        for (int64_t i = 0; i < half; i += kF) {
          const int64_t n = std::min(kF, half - i);
          const fVec angle = pv * fVec::loadu(inv_freq.data() + i, n);
          angle.cos().store(c.data() + i);
          angle.sin().store(s.data() + i);
        }
      }
      rotate_heads(qp + b * q.stride(0) + si * q.stride(1), qop + b * q_out.stride(0) + si * q_out.stride(1), hq,
                   q.stride(2), q_out.stride(2), c.data(), s.data(), half);
      rotate_heads(kp + b * k.stride(0) + si * k.stride(1), kop + b * k_out.stride(0) + si * k_out.stride(1), hk,
                   k.stride(2), k_out.stride(2), c.data(), s.data(), half);
    }
  });
}

void rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out, const at::Tensor& k_out,
          const c10::optional<at::Tensor>& positions, const c10::optional<at::Tensor>& cos,
          const c10::optional<at::Tensor>& sin, double theta) {
  check_float(q, "q");
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&q_out, "q_out"}, {&k_out, "k_out"}}) {
    check_dim(*t, 4, name);
    check_same_dtype(q, *t, "q", name);
    check_last_dim_contiguous(*t, name);
  }
  TORCH_CHECK(q_out.sizes() == q.sizes() && k_out.sizes() == k.sizes(), "llmkern_cpu: outputs must match inputs");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) && q.size(3) % 2 == 0,
              "llmkern_cpu: q and k must share (batch, seq, head_dim), head_dim even");
  const int64_t batch = q.size(0), seqlen = q.size(1), half = q.size(3) / 2;
  TORCH_CHECK(cos.has_value() == sin.has_value() && cos.has_value() != positions.has_value(),
              "llmkern_cpu: give positions or cos and sin");
  const auto check_rows = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK((t.size(0) == 1 || t.size(0) == batch) && t.size(1) == seqlen, "llmkern_cpu: ", name,
                " must have shape (batch or 1, seq, ...)");
  };
  if (cos.has_value()) {
    for (const auto& [t, name] : {std::pair{&*cos, "cos"}, {&*sin, "sin"}}) {
      check_float(*t, name);
      check_dim(*t, 3, name);
      check_rows(*t, name);
      check_last_dim_contiguous(*t, name);
      TORCH_CHECK(t->size(2) >= half, "llmkern_cpu: ", name, " must hold at least head_dim / 2 columns");
    }
    check_same_dtype(*cos, *sin, "cos", "sin");
  } else {
    check_dim(*positions, 2, "positions");
    check_rows(*positions, "positions");
    TORCH_CHECK(positions->scalar_type() == at::kInt || positions->scalar_type() == at::kLong,
                "llmkern_cpu: positions must be int32 or int64");
  }
  if (batch * seqlen == 0 || half == 0) return;
  LLMKERN_DISPATCH_FLOAT(q.scalar_type(), "llmkern_cpu::rope", [&] {
    using T = scalar_t;
    if (!cos.has_value()) {
      rope_impl<T, float>(q, k, q_out, k_out, positions, cos, sin, theta);
      return;
    }
    LLMKERN_DISPATCH_FLOAT(cos->scalar_type(), "llmkern_cpu::rope_table", [&] {
      rope_impl<T, scalar_t>(q, k, q_out, k_out, positions, cos, sin, theta);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkern_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, Tensor(a!) y, Tensor(b!)? residual_out, float eps, "
        "float offset, bool llama) -> ()",
        &rms_norm);
  m.def("rope(Tensor q, Tensor k, Tensor(a!) q_out, Tensor(b!) k_out, Tensor? positions, Tensor? cos, "
        "Tensor? sin, float theta) -> ()",
        &rope);
}

}  // namespace llmkern
