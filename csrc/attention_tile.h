// The attention core shared by dense / varlen prefill (attention.cpp) and paged prefill (paged_attention.cpp):
// FlashAttention's tiled forward pass with online softmax (Dao et al. 2022, Algorithm 1), one CPU thread per work
// item, the two matmuls of each tile done by BLAS (at::mm_out on fp32 tiles).
//
// A work item is a few consecutive queries of one sequence together with every query head of one KV head (GQA): its
// rows r = i * group + g stack query i's heads, so each K/V tile is gathered and converted once for all of them, and
// never repeated per head. Keys come from a callable kv_row(j) -> (K row, V row) pointers, which hides whether the
// cache is dense (a stride) or paged (a block-table lookup).
//
// Masks are FlashAttention's, bottom-right aligned: query i sits at position p_i = q_pos0 + i and sees keys
// p_i - left <= j <= p_i + right (-1: unbounded; the caller turns causal into right = 0), clipped to [0, seqlen_k).
// Key tiles outside the union of the item's visible ranges are neither read nor computed; a query that sees no key
// gets o = 0 and lse = -inf.
//
// Keys may be stored in another dtype than the queries: an fp8 cache's rows are read as fp8 * (k_scale, v_scale).
//
// Variants, per query head (llmkern's alibi_slopes= and sinks=): ALiBi (Press et al., arXiv 2108.12409) adds
// -slope * |p_i - j| to each visible score after the soft-cap; an attention sink (gpt-oss) is one more logit in the
// row's softmax denominator with no value, so it scales o down and is part of lse.
#pragma once

#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <vector>

#include "llmkern_cpu.h"

namespace llmkern {

struct AttnOptions {
  float scale;      // multiplies q.k
  bool has_softcap;
  float softcap;    // scores -> softcap * tanh(scores / softcap) (Gemma 2)
  int64_t left;     // window, -1 = unbounded
  int64_t right;
  const float* alibi_slopes = nullptr;  // per query head, from the item's first head on (see for_heads); or none
  const float* sinks = nullptr;         // likewise
  float k_scale = 1.f;                  // K and V rows are read times these: an fp8 cache's scales for the item's
  float v_scale = 1.f;                  // KV head

  // The options of a work item whose query heads start at head0: the per-head pointers moved to it.
  AttnOptions for_heads(int64_t head0) const {
    AttnOptions o = *this;
    if (o.alibi_slopes != nullptr) o.alibi_slopes += head0;
    if (o.sinks != nullptr) o.sinks += head0;
    return o;
  }
};

// Rows of a work item (queries x heads of one KV head): ~64, so a tile's two matmuls (64 x 128 x head_dim each)
// are large enough that BLAS runs near its peak and the at::mm_out call overhead (a few microseconds) stays small.
constexpr int64_t kAttnRows = 64;
// Keys per tile: 128 rows of K and V in fp32 are 2 x 64 KB at head_dim 128, which with the 64-row score and
// accumulator tiles stays within a core's L2 (512 KB-2 MB on current x86 server cores).
constexpr int64_t kAttnKeys = 128;

inline int64_t queries_per_item(int64_t group) { return std::max<int64_t>(1, kAttnRows / group); }

// softcap * tanh(x / softcap) on n scores. SLEEF's tanhf (1-ulp) keeps its relative accuracy for small |x|, where
// the 1 - 2 / (exp(2x) + 1) form loses all of it to cancellation.
inline void apply_softcap(float* s, int64_t n, float softcap) {
  const fVec inv(1.f / softcap), cap(softcap);
  int64_t j = 0;
  for (; j + kF <= n; j += kF) ((fVec::loadu(s + j) * inv).tanh() * cap).store(s + j);
  if (j < n) ((fVec::loadu(s + j, n - j) * inv).tanh() * cap).store(s + j, n - j);
}

// Online-softmax update of one row with its new scores s[0:n] (entries outside [lo, hi) already excluded by the
// caller through lo/hi): p = exp(s - m_new) written back into s (0 outside [lo, hi)), l and m updated, and the
// factor the row's accumulator must be rescaled by returned. A row that has seen no key yet keeps m = -inf.
inline float softmax_update(float* s, int64_t n, int64_t lo, int64_t hi, float& m, float& l) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t j = lo;
  if (hi - lo >= kF) {
    fVec mv(mx);
    for (; j + kF <= hi; j += kF) mv = at::vec::maximum(mv, fVec::loadu(s + j));
    mx = hmax(mv);
  }
  // NaN propagates, as in at::vec::maximum: a NaN score (NaN in q or k, or q.k beyond float range) makes the row
  // NaN, as PyTorch's softmax does, instead of being skipped by std::max.
  for (; j < hi; ++j) mx = (std::isnan(s[j]) || s[j] > mx) ? s[j] : mx;
  if (mx == -std::numeric_limits<float>::infinity()) {  // nothing visible here (or every score -inf)
    std::fill(s, s + n, 0.f);
    return 1.f;
  }
  const float m_new = std::isnan(mx) ? mx : std::max(m, mx);
  const float alpha = m == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(m - m_new);
  std::fill(s, s + lo, 0.f);
  std::fill(s + hi, s + n, 0.f);
  const fVec mv(m_new);
  fVec sum(0.f);
  for (j = lo; j + kF <= hi; j += kF) {
    const fVec p = (fVec::loadu(s + j) - mv).exp_u20();
    p.store(s + j);
    sum = sum + p;
  }
  float tail = 0.f;
  for (; j < hi; ++j) {
    s[j] = std::exp(s[j] - m_new);
    tail += s[j];
  }
  l = l * alpha + hsum(sum) + tail;
  m = m_new;
  return alpha;
}

// s[j] -= slope * |pos - (k0 + j)| for the n scores of one row whose first key is k0 (ALiBi).
inline void apply_alibi(float* s, int64_t n, float slope, int64_t pos, int64_t k0) {
  for (int64_t j = 0; j < n; ++j) s[j] -= slope * static_cast<float>(std::abs(pos - (k0 + j)));
}

// Folds an attention sink (a logit with no value) into a finished row's running max m and sum l; returns the
// factor the row's accumulator must be scaled by. A sink of -inf is no sink.
inline float add_sink(float sink, float& m, float& l) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (sink == kNegInf) return 1.f;
  const float m_new = std::max(m, sink);
  const float alpha = m == kNegInf ? 0.f : std::exp(m - m_new);
  l = l * alpha + std::exp(sink - m_new);
  m = m_new;
  return alpha;
}

// Per-thread scratch: fp32 tiles of Q (rows x d), K and V (keys x d), scores (rows x keys), the accumulator
// (rows x d), and each row's running max and sum.
struct AttnScratch {
  std::vector<float> q, k, v, s, acc, m, l;
  void reserve(int64_t rows, int64_t d) {
    q.resize(rows * d);
    k.resize(kAttnKeys * d);
    v.resize(kAttnKeys * d);
    s.resize(rows * kAttnKeys);
    acc.resize(rows * d);
    m.resize(rows);
    l.resize(rows);
  }
};

inline AttnScratch& attn_scratch() {
  thread_local AttnScratch s;
  return s;
}

// One work item. Query i, head g: q_base + i * q_si + g * q_sh (head_dim contiguous); likewise the output; lse
// (natural log, fp32) at lse_base + g * lse_sh + i * lse_si when lse_base is not null.
template <typename T, typename KVRow>
void attend_item(const AttnOptions& opt, int64_t d, int64_t group, const T* q_base, int64_t q_si, int64_t q_sh,
                 int64_t nq, int64_t q_pos0, int64_t seqlen_k, const KVRow& kv_row, T* o_base, int64_t o_si,
                 int64_t o_sh, float* lse_base, int64_t lse_si, int64_t lse_sh) {
  const int64_t rows = nq * group;
  AttnScratch& ws = attn_scratch();
  ws.reserve(rows, d);
  // Visible keys of query i: [lo(i), hi(i)), and their union over the item.
  const auto lo_of = [&](int64_t i) {
    return opt.left < 0 ? int64_t{0} : std::clamp<int64_t>(q_pos0 + i - opt.left, 0, seqlen_k);
  };
  const auto hi_of = [&](int64_t i) {
    return opt.right < 0 ? seqlen_k : std::clamp<int64_t>(q_pos0 + i + opt.right + 1, 0, seqlen_k);
  };
  int64_t k_begin = seqlen_k, k_end = 0;
  for (int64_t i = 0; i < nq; ++i) {
    if (lo_of(i) < hi_of(i)) {
      k_begin = std::min(k_begin, lo_of(i));
      k_end = std::max(k_end, hi_of(i));
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t g = 0; g < group; ++g) convert_row(q_base + i * q_si + g * q_sh, &ws.q[(i * group + g) * d], d,
                                                    opt.scale);
  }
  std::fill(ws.acc.begin(), ws.acc.begin() + rows * d, 0.f);
  std::fill(ws.m.begin(), ws.m.begin() + rows, -std::numeric_limits<float>::infinity());
  std::fill(ws.l.begin(), ws.l.begin() + rows, 0.f);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor qt = at::from_blob(ws.q.data(), {rows, d}, opts);
  at::Tensor acct = at::from_blob(ws.acc.data(), {rows, d}, opts);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kAttnKeys) {
    const int64_t nk = std::min(kAttnKeys, k_end - k0);
    for (int64_t j = 0; j < nk; ++j) {
      const auto [krow, vrow] = kv_row(k0 + j);
      convert_row(krow, &ws.k[j * d], d, opt.k_scale);
      convert_row(vrow, &ws.v[j * d], d, opt.v_scale);
    }
    at::Tensor kt = at::from_blob(ws.k.data(), {nk, d}, opts);
    at::Tensor vt = at::from_blob(ws.v.data(), {nk, d}, opts);
    at::Tensor st = at::from_blob(ws.s.data(), {rows, nk}, opts);
    at::mm_out(st, qt, kt.t());  // scores of every row against the tile's keys
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t lo = std::clamp<int64_t>(lo_of(i) - k0, 0, nk), hi = std::clamp<int64_t>(hi_of(i) - k0, 0, nk);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = i * group + g;
        float* s = &ws.s[r * nk];
        if (opt.has_softcap && lo < hi) apply_softcap(s + lo, hi - lo, opt.softcap);
        if (opt.alibi_slopes != nullptr && lo < hi) apply_alibi(s + lo, hi - lo, opt.alibi_slopes[g], q_pos0 + i, k0 + lo);
        const float alpha = softmax_update(s, nk, lo < hi ? lo : 0, lo < hi ? hi : 0, ws.m[r], ws.l[r]);
        if (alpha != 1.f) {
          const fVec av(alpha);
          float* a = &ws.acc[r * d];
          int64_t c = 0;
          for (; c + kF <= d; c += kF) (fVec::loadu(a + c) * av).store(a + c);
          for (; c < d; ++c) a[c] *= alpha;
        }
      }
    }
    acct.addmm_(st, vt);  // acc += p @ V
  }

  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = i * group + g;
      const float alpha = opt.sinks != nullptr ? add_sink(opt.sinks[g], ws.m[r], ws.l[r]) : 1.f;
      const float l = ws.l[r];
      // a row that saw no key (and no sink): o = 0; a NaN sum (a NaN or +inf sink, which PagedAttentionPlan.run
      // does not check) gives a NaN row, as the Triton kernels
      const float inv = (l > 0.f || std::isnan(l)) ? alpha / l : 0.f;
      T* o = o_base + i * o_si + g * o_sh;
      const float* a = &ws.acc[r * d];
      const fVec iv(inv);
      int64_t c = 0;
      for (; c + kF <= d; c += kF) store_f(o + c, fVec::loadu(a + c) * iv);
      if (c < d) store_f(o + c, fVec::loadu(a + c, d - c) * iv, d - c);
      if (lse_base != nullptr) {
        lse_base[g * lse_sh + i * lse_si] =
            (l > 0.f || std::isnan(l)) ? ws.m[r] + std::log(l) : -std::numeric_limits<float>::infinity();
      }
    }
  }
}

}  // namespace llmkern
