// Multi-head latent attention (MLA: DeepSeek-V2/V3, arXiv 2405.04434) on CPU: the latent cache write, and decode and
// chunked prefill in the absorbed form (llmkern/mla.py states it):
//     s_j = scale * (q_nope . ckv_j + q_pe . kpe_j),    out = sum_j softmax(s)_j ckv_j.
// Caches: ckv (num_blocks, block_size, kv_lora_rank) and kpe (num_blocks, block_size, rope_dim), the last dims
// contiguous, any other strides (two slices of one joint cache included); int32 block tables and lengths as the
// paged KV cache (paged_decode.h). The callers (llmkern/mla.py) have checked shapes, block ids and lengths before
// the op runs; the checks here repeat what the address arithmetic relies on.
//
// MLA is GQA with one KV head whose head dim is kv_lora_rank + rope_dim for the scores and kv_lora_rank for the
// values, the values being the first kv_lora_rank columns of the keys. Each latent row of a (query row, split) is
// read from memory once for all the heads. Below kGemmHeads heads, decode runs paged decode's register tiles
// (paged_decode.h) with every query head in the one group: the row is converted once per block of heads, its ckv
// part used for the scores and again, still in L1/L2, for P @ V. From kGemmHeads on, where MLA does over 60 FLOPs
// per latent byte, a tile of rows is converted to fp32 once and BLAS does both matmuls. Prefill is the same loop
// with one work item per new token (and split), over the keys its bottom-right causal mask shows it: each new token
// reads its visible prefix once for all its heads.
#include "paged_decode.h"

namespace llmkern {
namespace {

// Heads from which a query row's tiles go to BLAS (mla_range_gemm) rather than the register tiles (mla_range).
// Measured (AMD EPYC, AVX2 build, 2 threads, batch 8 x 2048, bf16, GFLOP/s register tiles / BLAS): 16 heads 132 /
// 110, 24 heads 135 / 132, 32 heads 133 / 143, 64 heads 137 / 162, 128 heads 137 / 174.
constexpr int64_t kGemmHeads = 32;

// ------------------------------------------------------------------------------------------------ cache write
// Token i's ckv and kpe rows copied, bit-exact, to slot slot_mapping[i]; slots outside the cache skip their token.
void mla_kv_write(const at::Tensor& ckv, const at::Tensor& kpe, const at::Tensor& ckv_cache,
                  const at::Tensor& kpe_cache, const at::Tensor& slot_mapping) {
  check_dim(ckv, 2, "ckv");
  check_dim(kpe, 2, "kpe");
  check_dim(ckv_cache, 3, "ckv_cache");
  check_dim(kpe_cache, 3, "kpe_cache");
  for (const auto& [t, name] : {std::pair{&ckv, "ckv"}, {&kpe, "kpe"}, {&ckv_cache, "ckv_cache"},
                                {&kpe_cache, "kpe_cache"}}) {
    check_float(*t, name);
    check_same_dtype(ckv, *t, "ckv", name);
  }
  TORCH_CHECK(kpe.size(0) == ckv.size(0) && ckv.size(1) == ckv_cache.size(2) && kpe.size(1) == kpe_cache.size(2) &&
                  ckv_cache.size(0) == kpe_cache.size(0) && ckv_cache.size(1) == kpe_cache.size(1),
              "llmkern_cpu: ckv/kpe must be (tokens, kv_lora_rank / rope_dim) of caches of the same blocks");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == ckv.size(0), "llmkern_cpu: slot_mapping must be int64 (tokens,)");
  const int64_t* sp = slot_mapping.const_data_ptr<int64_t>();
  // As paged_kv_write's rows with one KV head.
  write_slots(ckv.unsqueeze(1), ckv_cache.unsqueeze(2), sp, slot_mapping.stride(0));
  write_slots(kpe.unsqueeze(1), kpe_cache.unsqueeze(2), sp, slot_mapping.stride(0));
}

// ------------------------------------------------------------------------------------------------ attention
// Every head of one query row against the latent rows [start, end) of its sequence: acc (heads x rank,
// unnormalized) and per head the running max and sum, in ws, whose q rows are [q_nope | q_pe] (rank + rope_dim
// wide, pre-scaled). Per tile: the scores of every head (heads in register blocks, each block reading the tile's
// ckv and kpe rows once), the online softmax, then P @ ckv.
template <typename T>
void mla_range(const PagedRows<T>& rows, int64_t start, int64_t end, int64_t heads, int64_t rank, int64_t rope_dim,
               DecodeScratch& ws) {
  const int64_t dq = rank + rope_dim;
  ws.clear(heads, rank);
  const T* cp[kDecodeTile];
  const T* pp[kDecodeTile];
  for (int64_t n0 = start; n0 < end; n0 += kDecodeTile) {
    const int64_t nt = std::min(kDecodeTile, end - n0);
    for (int64_t t = 0; t < nt; ++t) std::tie(cp[t], pp[t]) = rows(n0 + t);
    // The next tile's rows start at scattered blocks: ask for them while this tile is computed.
    for (int64_t j = n0 + kDecodeTile; j < std::min(end, n0 + 2 * kDecodeTile); ++j) {
      const auto [c, p] = rows(j);
      prefetch(c, rank * static_cast<int64_t>(sizeof(T)));
      prefetch(p, rope_dim * static_cast<int64_t>(sizeof(T)));
    }
    for_head_blocks<kScoreHeads>(heads, [&](auto gn, int64_t h0) {
      constexpr int GN = decltype(gn)::value;
      tile_scores<GN>(&ws.q[h0 * dq], dq, cp, 0, nt, rank, &ws.s[h0 * kDecodeTile]);
      tile_scores<GN, true>(&ws.q[h0 * dq + rank], dq, pp, 0, nt, rope_dim, &ws.s[h0 * kDecodeTile]);
    });
    tile_softmax(ws, heads, nt);
    for_head_blocks<kPvHeads>(heads, [&](auto gn, int64_t h0) {
      tile_pv<decltype(gn)::value>(&ws.acc[h0 * rank], &ws.alpha[h0], &ws.s[h0 * kDecodeTile], cp, 0, nt, rank);
    });
  }
}

// mla_range with the two matmuls of each tile done by BLAS (at::mm_out on fp32 tiles, as attention_tile.h): a tile
// of kAttnKeys latent rows is converted to fp32 once as [ckv | kpe] rows, S = q @ tile^T gives every head's scores,
// and acc += P @ ckv reads the same tile's first rank columns. Takes over from the register tiles at many heads,
// where the matmuls are large enough for BLAS to run near its peak (kGemmHeads).
template <typename T>
void mla_range_gemm(const PagedRows<T>& rows, int64_t start, int64_t end, int64_t heads, int64_t rank,
                    int64_t rope_dim, DecodeScratch& ws) {
  const int64_t dq = rank + rope_dim;
  ws.clear(heads, rank);
  thread_local std::vector<float> tile, scores;
  tile.resize(kAttnKeys * dq);
  scores.resize(heads * kAttnKeys);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor q = at::from_blob(ws.q.data(), {heads, dq}, opts);
  at::Tensor acc = at::from_blob(ws.acc.data(), {heads, rank}, opts);
  for (int64_t n0 = start; n0 < end; n0 += kAttnKeys) {
    const int64_t nk = std::min(kAttnKeys, end - n0);
    for (int64_t j = 0; j < nk; ++j) {
      const auto [c, p] = rows(n0 + j);
      convert_row(c, &tile[j * dq], rank);
      convert_row(p, &tile[j * dq + rank], rope_dim);
    }
    const at::Tensor k = at::from_blob(tile.data(), {nk, dq}, opts);
    at::Tensor s = at::from_blob(scores.data(), {heads, nk}, opts);
    at::mm_out(s, q, k.t());
    for (int64_t h = 0; h < heads; ++h) {
      const float alpha = softmax_update(&scores[h * nk], nk, 0, nk, ws.m[h], ws.l[h]);
      if (alpha != 1.f) convert_row(&ws.acc[h * rank], &ws.acc[h * rank], rank, alpha);
    }
    acc.addmm_(s, k.narrow(1, 0, rank));
  }
}

// Query row r of sequence seq_of(r) sees its sequence's keys [0, visible(r)); work items are (row, split).
template <typename T>
void mla_attention_impl(const at::Tensor& q_nope, const at::Tensor& q_pe, const at::Tensor& ckv,
                        const at::Tensor& kpe, const at::Tensor& bt, const int32_t* cu, const int32_t* lens,
                        bool causal, const at::Tensor& out, float scale, int64_t splits) {
  const int64_t total_q = q_nope.size(0), heads = q_nope.size(1), rank = q_nope.size(2), rope_dim = q_pe.size(2);
  const int64_t batch = bt.size(0), dq = rank + rope_dim;
  // Decode (cu == nullptr): row b is sequence b's new token, at its last position. Prefill: rows cu[b]:cu[b+1] are
  // sequence b's new tokens, token i at position len - q_len + i (bottom-right aligned).
  const auto seq_of = [&](int64_t r) {
    return cu == nullptr ? r : std::upper_bound(cu, cu + batch + 1, static_cast<int32_t>(r)) - cu - 1;
  };
  const auto visible = [&](int64_t r, int64_t b) -> int64_t {
    if (cu == nullptr || !causal) return lens[b];
    return lens[b] - (cu[b + 1] - cu[b]) + (r - cu[b]) + 1;
  };
  const T* qn = q_nope.const_data_ptr<T>();
  const T* qr = q_pe.const_data_ptr<T>();
  run_split_items<T>(total_q, heads, splits, dq, rank, out, [&](int64_t r, int64_t split, DecodeScratch& ws) {
    const int64_t b = seq_of(r);
    const auto [start, end] = split_range(0, visible(r, b), split, splits);
    for (int64_t h = 0; h < heads; ++h) {
      convert_row(qn + r * q_nope.stride(0) + h * q_nope.stride(1), &ws.q[h * dq], rank, scale);
      convert_row(qr + r * q_pe.stride(0) + h * q_pe.stride(1), &ws.q[h * dq + rank], rope_dim, scale);
    }
    const auto rows = paged_rows<T>(ckv, kpe, bt, b, 0);
    if (heads >= kGemmHeads) {
      mla_range_gemm<T>(rows, start, end, heads, rank, rope_dim, ws);
    } else {
      mla_range<T>(rows, start, end, heads, rank, rope_dim, ws);
    }
  });
}

// q_nope (total_q, heads, kv_lora_rank), q_pe (total_q, heads, rope_dim); out like q_nope (written). Decode: no
// cu_seqlens_q, total_q = batch, seq_lens >= 1. Prefill: cu_seqlens_q int32 (batch + 1,) from 0 to total_q, causal
// bottom-right. num_splits 0 = choose.
void mla_attention(const at::Tensor& q_nope, const at::Tensor& q_pe, const at::Tensor& ckv_cache,
                   const at::Tensor& kpe_cache, const at::Tensor& block_tables,
                   const c10::optional<at::Tensor>& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& out,
                   double scale, bool causal, int64_t num_splits) {
  for (const auto& [t, name] : {std::pair{&q_nope, "q_nope"}, {&q_pe, "q_pe"}, {&ckv_cache, "ckv_cache"},
                                {&kpe_cache, "kpe_cache"}, {&out, "out"}}) {
    check_dim(*t, 3, name);
    check_float(*t, name);
    check_same_dtype(q_nope, *t, "q_nope", name);
    check_last_dim_contiguous(*t, name);
  }
  TORCH_CHECK(out.sizes() == q_nope.sizes(), "llmkern_cpu: out must be like q_nope");
  TORCH_CHECK(q_pe.size(0) == q_nope.size(0) && q_pe.size(1) == q_nope.size(1) &&
                  q_nope.size(2) == ckv_cache.size(2) && q_pe.size(2) == kpe_cache.size(2) &&
                  ckv_cache.size(0) == kpe_cache.size(0) && ckv_cache.size(1) == kpe_cache.size(1),
              "llmkern_cpu: q_nope / q_pe do not fit the ckv / kpe caches");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2,
              "llmkern_cpu: block_tables must be int32 (batch, n)");
  const at::Tensor lens = seq_lens.contiguous();
  const int64_t batch = block_tables.size(0), total_q = q_nope.size(0);
  TORCH_CHECK(lens.scalar_type() == at::kInt && lens.dim() == 1 && lens.size(0) == batch,
              "llmkern_cpu: seq_lens must be int32 (batch,) as block_tables");
  const int32_t* lp = lens.const_data_ptr<int32_t>();
  check_table_rows(block_tables, lp, ckv_cache.size(0), ckv_cache.size(1));
  at::Tensor cu;
  const int32_t* cp = nullptr;
  if (cu_seqlens_q.has_value()) {
    cu = cu_seqlens_q->contiguous();
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) == batch + 1,
                "llmkern_cpu: cu_seqlens_q must be int32 (batch + 1,)");
    cp = cu.const_data_ptr<int32_t>();
    TORCH_CHECK(cp[0] == 0 && cp[batch] == total_q, "llmkern_cpu: cu_seqlens_q must run from 0 to total_q");
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(cp[b] <= cp[b + 1] && cp[b + 1] - cp[b] <= lp[b], "llmkern_cpu: cu_seqlens_q / seq_lens disagree");
    }
  } else {
    TORCH_CHECK(batch == total_q, "llmkern_cpu: decode takes one query row per sequence");
    for (int64_t b = 0; b < batch; ++b) TORCH_CHECK(lp[b] >= 1, "llmkern_cpu: seq_lens must be >= 1 in decode");
  }
  if (q_nope.numel() == 0) return;
  const int64_t max_len = batch == 0 ? 0 : *std::max_element(lp, lp + batch);
  const int64_t splits = num_splits > 0 ? num_splits : auto_splits(total_q, max_len);
  LLMKERN_DISPATCH_FLOAT(q_nope.scalar_type(), "llmkern_cpu::mla_attention", [&] {
    mla_attention_impl<scalar_t>(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cp, lp, causal, out,
                                 static_cast<float>(scale), splits);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkern_cpu, m) {
  m.def("mla_kv_write(Tensor ckv, Tensor kpe, Tensor(a!) ckv_cache, Tensor(b!) kpe_cache, Tensor slot_mapping) -> ()",
        &mla_kv_write);
  m.def("mla_attention(Tensor q_nope, Tensor q_pe, Tensor ckv_cache, Tensor kpe_cache, Tensor block_tables, "
        "Tensor? cu_seqlens_q, Tensor seq_lens, Tensor(a!) out, float scale, bool causal, int num_splits) -> ()",
        &mla_attention);
}

}  // namespace llmkern
