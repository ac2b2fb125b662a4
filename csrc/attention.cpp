// Dense and varlen prefill attention on CPU: the tiled online-softmax core of attention_tile.h over K/V rows given
// by a stride. Layouts are FlashAttention's: q (batch, seqlen_q, heads, d) or packed (total_q, heads, d) with int32
// cu_seqlens; K/V likewise with num_kv_heads dividing heads (GQA); head_dim contiguous, any other strides.
#include "attention_tile.h"

namespace llmkern {
namespace {

// One sequence's view of the packed or batched tensors: its first row and its length, for q/o and for k/v.
struct Seq {
  int64_t q_row, len_q, k_row, len_k, batch;
};

template <typename T>
void attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<Seq>& seqs,
                    const at::Tensor& o, const c10::optional<at::Tensor>& lse, const AttnOptions& opt, bool varlen) {
  // Row r of sequence s: q + s.batch * q_sb + (s.q_row + r) * q_ss (q_sb = 0 for varlen, q_ss = the token stride).
  const int64_t dims = q.dim();
  const auto st = [&](const at::Tensor& t, int64_t i) { return t.stride(dims - 4 + i); };  // (b, s, h) strides
  const int64_t q_sb = varlen ? 0 : q.stride(0), q_ss = st(q, 1), q_sh = st(q, 2);
  const int64_t k_sb = varlen ? 0 : k.stride(0), k_ss = st(k, 1), k_sh = st(k, 2);
  const int64_t v_sb = varlen ? 0 : v.stride(0), v_ss = st(v, 1), v_sh = st(v, 2);
  const int64_t o_sb = varlen ? 0 : o.stride(0), o_ss = st(o, 1), o_sh = st(o, 2);
  const int64_t heads = q.size(-2), kv_heads = k.size(-2), d = q.size(-1), group = heads / kv_heads;
  // lse: batched (batch, heads, seqlen_q); varlen (heads, total_q)
  float* lse_p = lse.has_value() ? lse->mutable_data_ptr<float>() : nullptr;
  const int64_t l_sb = lse_p && !varlen ? lse->stride(0) : 0;
  const int64_t l_sh = lse_p ? lse->stride(varlen ? 0 : 1) : 0, l_si = lse_p ? lse->stride(varlen ? 1 : 2) : 0;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = o.mutable_data_ptr<T>();

  // Work items: (sequence, KV head, block of queries), numbered so that neighbours share K/V in cache.
  const int64_t per_item = queries_per_item(group);
  std::vector<int64_t> first_item(seqs.size() + 1, 0);
  for (size_t s = 0; s < seqs.size(); ++s) {
    first_item[s + 1] = first_item[s] + kv_heads * ((seqs[s].len_q + per_item - 1) / per_item);
  }
  at::parallel_for(0, first_item.back(), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t s = std::upper_bound(first_item.begin(), first_item.end(), w) - first_item.begin() - 1;
      const Seq& sq = seqs[s];
      const int64_t local = w - first_item[s];
      const int64_t kvh = local % kv_heads, i0 = (local / kv_heads) * per_item;
      const int64_t nq = std::min(per_item, sq.len_q - i0);
      const T* kbase = kp + sq.batch * k_sb + sq.k_row * k_ss + kvh * k_sh;
      const T* vbase = vp + sq.batch * v_sb + sq.k_row * v_ss + kvh * v_sh;
      const auto kv_row = [&](int64_t j) { return std::pair{kbase + j * k_ss, vbase + j * v_ss}; };
      const int64_t row = sq.q_row + i0, h0 = kvh * group;
      attend_item<T>(opt.for_heads(h0), d, group, qp + sq.batch * q_sb + row * q_ss + h0 * q_sh, q_ss, q_sh, nq,
                     i0 + sq.len_k - sq.len_q, sq.len_k, kv_row, op + sq.batch * o_sb + row * o_ss + h0 * o_sh,
                     o_ss, o_sh, lse_p ? lse_p + sq.batch * l_sb + h0 * l_sh + row * l_si : nullptr, l_si, l_sh);
    }
  });
}

// q, k, v: 4-D (batch, seq, heads, d), or 3-D packed with cu_seqlens_q/k (int32, batch + 1, already validated by
// the caller: non-decreasing from 0 and within the tensors). o: q's shape and dtype, written everywhere a sequence
// row lies (the caller pre-fills rows past cu_seqlens_q[-1]). lse: fp32, (batch, heads, seqlen_q) or
// (heads, total_q), or None. alibi_slopes, sinks: float32 (heads,) or None.
void attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
               const at::Tensor& o, const c10::optional<at::Tensor>& lse, double scale,
               c10::optional<double> softcap, int64_t window_left, int64_t window_right,
               const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& sinks) {
  const bool varlen = cu_seqlens_q.has_value();
  const int64_t dims = varlen ? 3 : 4;
  check_float(q, "q");
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&o, "o"}}) {
    check_dim(*t, dims, name);
    check_same_dtype(q, *t, "q", name);
    check_last_dim_contiguous(*t, name);
  }
  TORCH_CHECK(o.sizes() == q.sizes() && k.sizes() == v.sizes() && k.size(-1) == q.size(-1),
              "llmkern_cpu: attention shapes disagree");
  TORCH_CHECK(k.size(-2) > 0 && q.size(-2) % k.size(-2) == 0, "llmkern_cpu: heads must be a multiple of kv_heads");
  TORCH_CHECK(varlen || k.size(0) == q.size(0), "llmkern_cpu: k's batch must be q's");
  std::vector<Seq> seqs;
  if (varlen) {
    TORCH_CHECK(cu_seqlens_k.has_value(), "llmkern_cpu: varlen needs cu_seqlens_k");
    const at::Tensor cq = cu_seqlens_q->contiguous(), ck = cu_seqlens_k->contiguous();
    TORCH_CHECK(cq.scalar_type() == at::kInt && ck.scalar_type() == at::kInt && cq.dim() == 1 &&
                    cq.sizes() == ck.sizes(), "llmkern_cpu: cu_seqlens must be int32 (batch + 1,)");
    const int32_t* a = cq.const_data_ptr<int32_t>();
    const int32_t* b = ck.const_data_ptr<int32_t>();
    for (int64_t s = 0; s + 1 < cq.size(0); ++s) {
      TORCH_CHECK(a[s] >= 0 && a[s] <= a[s + 1] && a[s + 1] <= q.size(0) && b[s] >= 0 && b[s] <= b[s + 1] &&
                      b[s + 1] <= k.size(0), "llmkern_cpu: cu_seqlens out of range");
      seqs.push_back({a[s], a[s + 1] - a[s], b[s], b[s + 1] - b[s], 0});
    }
  } else {
    for (int64_t s = 0; s < q.size(0); ++s) seqs.push_back({0, q.size(1), 0, k.size(1), s});
  }
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat, "llmkern_cpu: lse must be float32");
    const auto want = varlen ? std::vector<int64_t>{q.size(1), q.size(0)}
                             : std::vector<int64_t>{q.size(0), q.size(2), q.size(1)};
    TORCH_CHECK(lse->sizes() == at::IntArrayRef(want), "llmkern_cpu: lse has the wrong shape");
  }
  AttnOptions opt{static_cast<float>(scale), softcap.has_value(),
                  static_cast<float>(softcap.value_or(1.0)), window_left, window_right};
  opt.alibi_slopes = head_values(alibi_slopes, q.size(-2), "alibi_slopes");
  opt.sinks = head_values(sinks, q.size(-2), "sinks");
  if (q.numel() == 0) return;
  LLMKERN_DISPATCH_FLOAT(q.scalar_type(), "llmkern_cpu::attention",
                         [&] { attention_impl<scalar_t>(q, k, v, seqs, o, lse, opt, varlen); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkern_cpu, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor(a!) o, "
        "Tensor(b!)? lse, float scale, float? softcap, int window_left, int window_right, Tensor? alibi_slopes, "
        "Tensor? sinks) -> ()",
        &attention);
}

}  // namespace llmkern
