// The paged KV cache on CPU: the cache write, split-KV decode attention and prefill over a cached prefix.
//
// Cache layout (per layer, for K and for V): (num_blocks, block_size, num_kv_heads, head_dim), head_dim contiguous;
// token t of sequence b is in block block_tables[b, t / block_size] at offset t % block_size (FlashAttention's
// block_table, FlashInfer's NHD pages). The callers (llmkern/paged_attention.py: the one-shot ops' checks, or the
// PagedAttentionPlan that built the tables) have checked the block ids of the used table entries and the lengths
// before the op runs; the cache write checks its own slots.
#include "paged_decode.h"

namespace llmkern {
namespace {

// Calls f(C*) with a null pointer of the cache's element type: fp8 (e4m3fn, e5m2), else T (the cache is the
// queries' dtype).
template <typename T, typename F>
void with_cache_type(at::ScalarType cache, const F& f) {
  if (cache == at::kFloat8_e4m3fn) {
    f(static_cast<E4M3*>(nullptr));
  } else if (cache == at::kFloat8_e5m2) {
    f(static_cast<E5M2*>(nullptr));
  } else {
    f(static_cast<T*>(nullptr));
  }
}

bool is_fp8_cache(const at::Tensor& c) {
  return c.scalar_type() == at::kFloat8_e4m3fn || c.scalar_type() == at::kFloat8_e5m2;
}

// An fp8 cache's k_scale and v_scale (float32, one per KV head), which it must have, and which a 16-bit or fp32
// cache must not: their data, or nullptr.
std::pair<const float*, const float*> kv_scales(const at::Tensor& cache, const c10::optional<at::Tensor>& k_scale,
                                                const c10::optional<at::Tensor>& v_scale) {
  const bool fp8 = is_fp8_cache(cache);
  TORCH_CHECK(k_scale.has_value() == fp8 && v_scale.has_value() == fp8,
              "llmkern_cpu: k_scale and v_scale are given exactly when the cache is fp8");
  return {head_values(k_scale, cache.size(2), "k_scale"), head_values(v_scale, cache.size(2), "v_scale")};
}

// The cache pair: 4-D, one shape, one dtype, a float dtype or fp8.
void check_cache_pair(const at::Tensor& kc, const at::Tensor& vc) {
  check_dim(kc, 4, "k_cache");
  TORCH_CHECK(kc.sizes() == vc.sizes(), "llmkern_cpu: k_cache and v_cache must have the same shape");
  check_same_dtype(kc, vc, "k_cache", "v_cache");
  if (!is_fp8_cache(kc)) check_float(kc, "k_cache");
  check_cpu(kc, "k_cache");
  check_cpu(vc, "v_cache");
}

void check_cache(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bt) {
  check_float(q, "q");
  check_cache_pair(kc, vc);
  if (!is_fp8_cache(kc)) check_same_dtype(q, kc, "q", "k_cache");
  check_last_dim_contiguous(kc, "k_cache");
  check_last_dim_contiguous(vc, "v_cache");
  TORCH_CHECK(q.size(-1) == kc.size(3) && q.size(-2) % kc.size(2) == 0,
              "llmkern_cpu: q's heads / head_dim do not fit the cache");
  check_last_dim_contiguous(q, "q");
  TORCH_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2, "llmkern_cpu: block_tables must be int32 (batch, n)");
}

// The attention options of a paged op: scale, soft-cap, window, and ALiBi slopes and sinks per query head.
AttnOptions variant_options(const at::Tensor& q, double scale, c10::optional<double> softcap, int64_t window_left,
                            int64_t window_right, const c10::optional<at::Tensor>& alibi_slopes,
                            const c10::optional<at::Tensor>& sinks) {
  AttnOptions opt{static_cast<float>(scale), softcap.has_value(), static_cast<float>(softcap.value_or(1.0)),
                  window_left, window_right};
  opt.alibi_slopes = head_values(alibi_slopes, q.size(-2), "alibi_slopes");
  opt.sinks = head_values(sinks, q.size(-2), "sinks");
  return opt;
}

// ------------------------------------------------------------------------------------------------ cache write
// What an fp8 cache stores for x: round_to_fp8(x / scale) in fp32, to nearest even, saturated to the format's largest
// finite value (vLLM's cache write; NaN stays NaN): c10's float -> fp8 conversion, the one torch's .to() makes, so
// the bytes are reference.quantize_kv's.
template <typename C>
inline C quantize_fp8(float x, float scale) {
  const float big = static_cast<float>(std::numeric_limits<C>::max());
  const float y = x / scale;
  return C(std::isnan(y) ? y : std::clamp(y, -big, big));
}

// Token i's (num_kv_heads, head_dim) K and V rows written to slot slot_mapping[i]: copied bit-exact into a cache of
// their dtype, quantized (quantize_fp8, with the row's KV head's scale) into an fp8 cache. A slot outside
// [0, num_blocks * block_size), vLLM's -1 padding included, skips its token (as the Triton kernel: the slots are
// never checked on the host, so that the op needs no sync).
void paged_kv_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slot_mapping, const c10::optional<at::Tensor>& k_scale,
                    const c10::optional<at::Tensor>& v_scale) {
  check_dim(k, 3, "k");
  check_cache_pair(k_cache, v_cache);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3),
              "llmkern_cpu: k/v must be (tokens, num_kv_heads, head_dim) of the cache");
  check_float(k, "k");
  check_same_dtype(k, v, "k", "v");
  const bool fp8 = is_fp8_cache(k_cache);
  if (!fp8) check_same_dtype(k, k_cache, "k", "k_cache");
  const std::pair<const float*, const float*> scales = kv_scales(k_cache, k_scale, v_scale);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == k.size(0), "llmkern_cpu: slot_mapping must be int64 (tokens,)");
  const int64_t* sp = slot_mapping.const_data_ptr<int64_t>();
  const int64_t ss = slot_mapping.stride(0);
  const int64_t d = k.size(2);
  if (!fp8) {   // bit-exact copies
    write_slots(k, k_cache, sp, ss);
    write_slots(v, v_cache, sp, ss);
    return;
  }
  LLMKERN_DISPATCH_FLOAT(k.scalar_type(), "llmkern_cpu::paged_kv_write", [&] {
    with_cache_type<scalar_t>(k_cache.scalar_type(), [&](auto* tag) {
      using C = std::remove_pointer_t<decltype(tag)>;
      if constexpr (is_fp8<C>) {
        for (const int which : {0, 1}) {
          const at::Tensor& src = which == 0 ? k : v;
          const at::Tensor& dst = which == 0 ? k_cache : v_cache;
          const float* scale = which == 0 ? scales.first : scales.second;
          const int64_t fs = src.stride(2), ts = dst.stride(3);
          for_each_slot_row(src, dst, sp, ss, [&](int64_t h, const char* from, char* to) {
            const scalar_t* x = reinterpret_cast<const scalar_t*>(from);
            C* y = reinterpret_cast<C*>(to);
            for (int64_t i = 0; i < d; ++i) y[i * ts] = quantize_fp8<C>(static_cast<float>(x[i * fs]), scale[h]);
          });
        }
      }
    });
  });
}

// ------------------------------------------------------------------------------------------------- decode
// Every query head of one sequence against its tokens [start, end): acc (heads x d, unnormalized), and per head the
// running max m and sum l (natural-log domain), in ws. The query sits at position pos (ALiBi's distances). rows(j)
// points at token j's K and V rows of KV head 0; head h is h * stride_kh (stride_vh) further. Per tile: the scores of every head (KV head by KV head, each K row read once
// for all the query heads of its group), the online softmax of every head, then P @ V (each V row read once for
// the group).
template <typename T>
void decode_range(const AttnOptions& opt, const PagedRows<T>& rows, int64_t stride_kh, int64_t stride_vh,
                  int64_t start, int64_t end, int64_t pos, int64_t kv_heads, int64_t group, int64_t d,
                  DecodeScratch& ws) {
  const int64_t heads = kv_heads * group;
  float* acc = ws.acc.data();
  ws.clear(heads, d);
  // Row pointers of the tile (K and V) and of the next tile's nn K rows (the last one repeated up to nt). The score
  // loop asks for this tile's V rows, the P @ V loop for the next tile's K rows (see prefetch_l2), each once per KV
  // head, with its first head block.
  const T* kp[kDecodeTile];
  const T* vp[kDecodeTile];
  const T* kn[kDecodeTile];
  for (int64_t n0 = start; n0 < end; n0 += kDecodeTile) {
    const int64_t nt = std::min(kDecodeTile, end - n0);
    const int64_t nn = std::clamp<int64_t>(end - n0 - kDecodeTile, 0, kDecodeTile);
    for (int64_t t = 0; t < nt; ++t) std::tie(kp[t], vp[t]) = rows(n0 + t);
    for (int64_t t = 0; t < nt && nn > 0; ++t) kn[t] = rows(n0 + kDecodeTile + std::min(t, nn - 1)).first;
    for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
      for_head_blocks<kScoreHeads>(group, [&](auto gn, int64_t g0) {
        const int64_t h = kvh * group + g0;
        tile_scores<decltype(gn)::value>(&ws.q[h * d], d, kp, kvh * stride_kh, nt, d, &ws.s[h * kDecodeTile],
                                         g0 == 0 ? PrefetchRows<T>{vp, kvh * stride_vh} : PrefetchRows<T>{});
      });
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* sh = &ws.s[h * kDecodeTile];
      if (opt.has_softcap) apply_softcap(sh, nt, opt.softcap);
      if (opt.alibi_slopes != nullptr) apply_alibi(sh, nt, opt.alibi_slopes[h], pos, n0);
    }
    tile_softmax(ws, heads, nt);
    for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
      for_head_blocks<kPvHeads>(group, [&](auto gn, int64_t g0) {
        const int64_t h = kvh * group + g0;
        tile_pv<decltype(gn)::value>(acc + h * d, &ws.alpha[h], &ws.s[h * kDecodeTile], vp, kvh * stride_vh, nt, d,
                                     g0 == 0 && nn > 0 ? PrefetchRows<T>{kn, kvh * stride_kh} : PrefetchRows<T>{});
      });
    }
  }
}

// A decode split's variants, once decode_range is done (ws: every head's unnormalized accumulator, max and sum):
// the sink of each head joins split 0 (add_sink), and an fp8 cache's v_scale (per KV head; or none) multiplies the
// accumulators. Nothing without a sink or an fp8 cache.
inline void finish_variants(const AttnOptions& opt, int64_t split, const float* v_scale, int64_t heads,
                            int64_t group, int64_t d, DecodeScratch& ws) {
  const bool sinks = opt.sinks != nullptr && split == 0;
  if (!sinks && v_scale == nullptr) return;
  for (int64_t h = 0; h < heads; ++h) {
    const float alpha = sinks ? add_sink(opt.sinks[h], ws.m[h], ws.l[h]) : 1.f;
    const float mul = alpha * (v_scale != nullptr ? v_scale[h / group] : 1.f);
    if (mul != 1.f) convert_row(&ws.acc[h * d], &ws.acc[h * d], d, mul);
  }
}

// KV: the cache's element type (T, or fp8 with scales.first / .second its k_scale / v_scale per KV head: k_scale is
// folded into the pre-scaled q rows and v_scale into the accumulators once a split is done, so the tile loops only
// load). A sink joins each head's softmax once: in split 0's (max, sum, accumulator), whose lse then carries it
// into the split merge (split 0 is never empty: it starts at the first visible key).
template <typename T, typename KV>
void paged_decode_impl(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bt,
                       const int32_t* lens, const at::Tensor& out, const AttnOptions& opt, int64_t splits,
                       std::pair<const float*, const float*> scales) {
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = kc.size(2);
  const int64_t group = heads / kv_heads;
  const T* qp = q.const_data_ptr<T>();
  // Work items: (sequence, split), each over every KV head (see decode_range).
  run_split_items<T>(batch, heads, splits, d, d, out, [&](int64_t b, int64_t split, DecodeScratch& ws) {
    // The new token sits at position len - 1 and sees keys from len - 1 - left (a left window).
    const int64_t len = lens[b];
    const auto [start, end] = split_range(opt.left < 0 ? 0 : std::max<int64_t>(0, len - 1 - opt.left), len, split,
                                          splits);
    for (int64_t h = 0; h < heads; ++h) {
      const float k_scale = is_fp8<KV> ? scales.first[h / group] : 1.f;
      convert_row(qp + b * q.stride(0) + h * q.stride(1), &ws.q[h * d], d, opt.scale * k_scale);
    }
    decode_range<KV>(opt, paged_rows<KV>(kc, vc, bt, b, 0), kc.stride(2), vc.stride(2), start, end, len - 1, kv_heads,
                     group, d, ws);
    finish_variants(opt, split, is_fp8<KV> ? scales.second : nullptr, heads, group, d, ws);
  });
}

// q (batch, heads, d); out like q (written); seq_lens int32 (batch,) >= 1; window_left -1 or >= 0 (the right window
// masks nothing in decode); num_splits 0 = choose.
void paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& out, double scale,
                  c10::optional<double> softcap, int64_t window_left, int64_t num_splits,
                  const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                  const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& sinks) {
  check_dim(q, 3, "q");
  check_cache(q, k_cache, v_cache, block_tables);
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "llmkern_cpu: out must be like q");
  check_last_dim_contiguous(out, "out");
  const at::Tensor lens = seq_lens.contiguous();
  TORCH_CHECK(lens.scalar_type() == at::kInt && lens.dim() == 1 && lens.size(0) == q.size(0) &&
                  block_tables.size(0) == q.size(0), "llmkern_cpu: seq_lens / block_tables must have q's batch");
  const int32_t* lp = lens.const_data_ptr<int32_t>();
  int64_t max_len = 0;
  check_table_rows(block_tables, lp, k_cache.size(0), k_cache.size(1));
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lp[b] >= 1, "llmkern_cpu: seq_lens must be >= 1 in decode");
    max_len = std::max<int64_t>(max_len, lp[b]);
  }
  if (q.numel() == 0) return;
  const int64_t splits = num_splits > 0 ? num_splits : auto_splits(q.size(0), max_len);
  const auto scales = kv_scales(k_cache, k_scale, v_scale);
  const AttnOptions opt = variant_options(q, scale, softcap, window_left, -1, alibi_slopes, sinks);
  LLMKERN_DISPATCH_FLOAT(q.scalar_type(), "llmkern_cpu::paged_decode", [&] {
    with_cache_type<scalar_t>(k_cache.scalar_type(), [&](auto* tag) {
      using KV = std::remove_pointer_t<decltype(tag)>;
      paged_decode_impl<scalar_t, KV>(q, k_cache, v_cache, block_tables, lp, out, opt, splits, scales);
    });
  });
}

// ------------------------------------------------------------------------------------------------ prefill
// q (total_q, heads, d) packs each sequence's newest tokens (rows cu_seqlens_q[b]:cu_seqlens_q[b+1]); their K/V are
// in the cache, sequence b holding seq_lens[b] tokens, so new token i sits at position seq_len - q_len + i.
// KV: the cache's element type (T, or fp8 with scales[0/1] its k_scale / v_scale per KV head).
template <typename T, typename KV>
void paged_prefill_impl(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bt,
                        const int32_t* cu, const int32_t* lens, const at::Tensor& out, const AttnOptions& opt,
                        std::pair<const float*, const float*> scales) {
  const int64_t batch = bt.size(0), heads = q.size(1), d = q.size(2), kv_heads = kc.size(2);
  const int64_t group = heads / kv_heads, per_item = queries_per_item(group);
  std::vector<int64_t> first_item(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    first_item[b + 1] = first_item[b] + kv_heads * ((cu[b + 1] - cu[b] + per_item - 1) / per_item);
  }
  const T* qp = q.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, first_item.back(), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = std::upper_bound(first_item.begin(), first_item.end(), w) - first_item.begin() - 1;
      const int64_t local = w - first_item[b], kvh = local % kv_heads, i0 = (local / kv_heads) * per_item;
      const int64_t len_q = cu[b + 1] - cu[b], nq = std::min(per_item, len_q - i0);
      const int64_t row = cu[b] + i0, h0 = kvh * group;
      AttnOptions item = opt.for_heads(h0);
      if constexpr (is_fp8<KV>) std::tie(item.k_scale, item.v_scale) = std::tie(scales.first[kvh], scales.second[kvh]);
      attend_item<T>(item, d, group, qp + row * q.stride(0) + h0 * q.stride(1), q.stride(0), q.stride(1), nq,
                     lens[b] - len_q + i0, lens[b], paged_rows<KV>(kc, vc, bt, b, kvh),
                     op + row * out.stride(0) + h0 * out.stride(1), out.stride(0), out.stride(1), nullptr, 0, 0);
    }
  });
}

void paged_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                   const at::Tensor& out, double scale, c10::optional<double> softcap, int64_t window_left,
                   int64_t window_right, const c10::optional<at::Tensor>& k_scale,
                   const c10::optional<at::Tensor>& v_scale, const c10::optional<at::Tensor>& alibi_slopes,
                   const c10::optional<at::Tensor>& sinks) {
  check_dim(q, 3, "q");
  check_cache(q, k_cache, v_cache, block_tables);
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "llmkern_cpu: out must be like q");
  check_last_dim_contiguous(out, "out");
  const at::Tensor cu = cu_seqlens_q.contiguous(), lens = seq_lens.contiguous();
  const int64_t batch = lens.size(0);
  TORCH_CHECK(cu.scalar_type() == at::kInt && lens.scalar_type() == at::kInt && cu.dim() == 1 && lens.dim() == 1 &&
                  cu.size(0) == batch + 1 && block_tables.size(0) == batch,
              "llmkern_cpu: cu_seqlens_q (batch + 1,), seq_lens and block_tables (batch, ...) must agree");
  const int32_t* cp = cu.const_data_ptr<int32_t>();
  const int32_t* lp = lens.const_data_ptr<int32_t>();
  TORCH_CHECK(cp[0] == 0 && cp[batch] == q.size(0), "llmkern_cpu: cu_seqlens_q must run from 0 to total_q");
  check_table_rows(block_tables, lp, k_cache.size(0), k_cache.size(1));
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(cp[b] <= cp[b + 1] && cp[b + 1] - cp[b] <= lp[b], "llmkern_cpu: cu_seqlens_q / seq_lens disagree");
  }
  if (q.numel() == 0) return;
  const auto scales = kv_scales(k_cache, k_scale, v_scale);
  const AttnOptions opt = variant_options(q, scale, softcap, window_left, window_right, alibi_slopes, sinks);
  LLMKERN_DISPATCH_FLOAT(q.scalar_type(), "llmkern_cpu::paged_prefill", [&] {
    with_cache_type<scalar_t>(k_cache.scalar_type(), [&](auto* tag) {
      using KV = std::remove_pointer_t<decltype(tag)>;
      paged_prefill_impl<scalar_t, KV>(q, k_cache, v_cache, block_tables, cp, lp, out, opt, scales);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkern_cpu, m) {
  m.def("paged_kv_write(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
        "Tensor? k_scale, Tensor? v_scale) -> ()",
        &paged_kv_write);
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor(a!) out, float scale, float? softcap, int window_left, int num_splits, Tensor? k_scale, "
        "Tensor? v_scale, Tensor? alibi_slopes, Tensor? sinks) -> ()",
        &paged_decode);
  m.def("paged_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor cu_seqlens_q, "
        "Tensor seq_lens, Tensor(a!) out, float scale, float? softcap, int window_left, int window_right, "
        "Tensor? k_scale, Tensor? v_scale, Tensor? alibi_slopes, Tensor? sinks) -> ()",
        &paged_prefill);
}

}  // namespace llmkern
