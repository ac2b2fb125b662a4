// What the paged cache kernels share (paged_attention.cpp for K/V caches, mla.cpp for MLA's latent caches): the
// slot write, the block-table check, and split-KV decode: register-blocked tiles that read each cached row once for
// every query head that uses it, the split choice, and the log-sum-exp merge of the splits.
//
// Cache layout: token t of sequence b is in block block_tables[b, t / block_size] at offset t % block_size
// (FlashAttention's block_table, FlashInfer's pages).
#pragma once

#include <cstring>
#include <vector>

#include "attention_tile.h"

namespace llmkern {

// Where token j of one sequence lives: the block table lookup of its two rows (K and V of one KV head, or MLA's
// ckv and kpe).
template <typename T>
struct PagedRows {
  const T* k;          // the first cache (k_cache + kv_head * stride(2), or ckv_cache)
  const T* v;          // the second
  const int32_t* bt;   // this sequence's block-table row
  int64_t bt_stride, block_size, k_sb, k_st, v_sb, v_st;
  std::pair<const T*, const T*> operator()(int64_t j) const {
    const int64_t blk = bt[(j / block_size) * bt_stride], off = j % block_size;
    return {k + blk * k_sb + off * k_st, v + blk * v_sb + off * v_st};
  }
};

// Sequence b's rows of caches kc and vc ((num_blocks, block_size, ...) each): K and V of KV head kvh of a 4-D cache,
// or (kvh = 0) MLA's 3-D ckv and kpe caches.
template <typename T>
PagedRows<T> paged_rows(const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bt, int64_t b, int64_t kvh) {
  return {kc.const_data_ptr<T>() + kvh * kc.stride(2), vc.const_data_ptr<T>() + kvh * vc.stride(2),
          bt.const_data_ptr<int32_t>() + b * bt.stride(0), bt.stride(1), kc.size(1), kc.stride(0), kc.stride(1),
          vc.stride(0), vc.stride(1)};
}

// ------------------------------------------------------------------------------------------------ checks
// The table entries sequence b uses (its first ceil(len / block_size)) must name blocks of the cache; the rest of a
// row may hold anything (padding).
inline void check_table_rows(const at::Tensor& bt, const int32_t* lens, int64_t num_blocks, int64_t block_size) {
  const int32_t* p = bt.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < bt.size(0); ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= bt.size(1) * block_size, "llmkern_cpu: seq_lens out of range");
    for (int64_t n = 0; n * block_size < lens[b]; ++n) {
      const int32_t blk = p[b * bt.stride(0) + n * bt.stride(1)];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "llmkern_cpu: block_tables entry out of range");
    }
  }
}

// ------------------------------------------------------------------------------------------------ cache write
// src (tokens, heads, d) -> dst (num_blocks, block_size, heads, d), any strides, the last dim's included (a cache
// written in place cannot be copied first): write_row(h, from, to) is called for each token t and head h with the
// byte addresses of src[t, h, 0] and of dst's row at slot slot_mapping[t] (int64, stride ss). A slot outside
// [0, num_blocks * block_size), vLLM's -1 padding included, skips its token (as the Triton kernels: the slots are
// never checked on the host, so that the op needs no sync). The caller has checked shapes and dtypes.
template <typename WriteRow>
inline void for_each_slot_row(const at::Tensor& src, const at::Tensor& dst, const int64_t* slot_mapping, int64_t ss,
                              const WriteRow& write_row) {
  const int64_t tokens = src.size(0), heads = src.size(1), d = src.size(2), block_size = dst.size(1);
  const int64_t slots = dst.size(0) * block_size;
  const int64_t es = src.element_size(), ec = dst.element_size();
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* c = static_cast<char*>(dst.mutable_data_ptr());
  at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, heads * d)),
                   [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t slot = slot_mapping[t * ss];
      if (slot < 0 || slot >= slots) continue;   // -1 (padding) or outside the cache: nothing to write
      const int64_t blk = slot / block_size, off = slot % block_size;
      for (int64_t h = 0; h < heads; ++h) {
        write_row(h, s + (t * src.stride(0) + h * src.stride(1)) * es,
                  c + (blk * dst.stride(0) + off * dst.stride(1) + h * dst.stride(2)) * ec);
      }
    }
  });
}

// The same, rows copied bit-exact (src and dst of one dtype): one memcpy a row when both last dims are contiguous,
// else element by element.
inline void write_slots(const at::Tensor& src, const at::Tensor& dst, const int64_t* slot_mapping, int64_t ss) {
  const int64_t d = src.size(2), es = src.element_size();
  const int64_t fs = src.stride(2) * es, ts = dst.stride(3) * es;
  const bool rows = d <= 1 || (src.stride(2) == 1 && dst.stride(3) == 1);
  for_each_slot_row(src, dst, slot_mapping, ss, [&](int64_t, const char* from, char* to) {
    if (rows) {
      std::memcpy(to, from, d * es);
    } else {
      for (int64_t i = 0; i < d; ++i) std::memcpy(to + i * ts, from + i * fs, es);
    }
  });
}

// ------------------------------------------------------------------------------------------------- decode tiles
// Decode is one query per (sequence, head) against every cached key: 2 x heads-per-row FMAs per cached element and
// nothing to reuse across queries, so the loops below are counted in instructions per cached element (callgrind):
// each cached vector is loaded and converted to fp32 once and multiplied into every query head that reads it (GQA's
// group; all heads in MLA) while their accumulators stay in registers.
//
// Tokens per decode tile: the tile's scores (heads x 32 fp32, 4 KB at 32 heads) stay in L1, its K and V rows (32
// tokens x num_kv_heads x head_dim: 128 KB each for 8 fp32 heads of 128) stay in L2 from their prefetch to their
// use, and the exp of a head's scores is vectorized across the tile's tokens.
constexpr int64_t kDecodeTile = 32;

// Per-thread decode scratch, for every query head of a sequence: q rows (pre-scaled, fp32, dq wide), their scores
// for one tile, the accumulators (dv wide), the running max and sum, and the factor each accumulator is rescaled by
// before the tile's P @ V.
struct DecodeScratch {
  std::vector<float> q, s, acc, m, l, alpha;
  void reserve(int64_t heads, int64_t dq, int64_t dv) {
    q.resize(heads * dq);
    s.resize(heads * kDecodeTile);
    acc.resize(heads * dv);
    m.resize(heads);
    l.resize(heads);
    alpha.resize(heads);
  }
  // Every head's accumulator empty, before a new range of keys.
  void clear(int64_t heads, int64_t dv) {
    std::fill(acc.begin(), acc.begin() + heads * dv, 0.f);
    std::fill(m.begin(), m.begin() + heads, -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.begin() + heads, 0.f);
  }
};

// Query heads are processed GN at a time, GN a compile-time count so that the accumulators are registers. Scores:
// GN accumulators + the K vector (AVX2 has 16 vector registers, AVX-512 32), so up to 8. P @ V: 2 x GN accumulators
// (two vectors of head_dim per token, which halves the broadcasts of p per V element), + GN broadcasts + 2 V
// vectors, so up to 4.
constexpr int kScoreHeads = 8;
constexpr int kPvHeads = 4;

// Software prefetch. Decode reads every cached byte once, from blocks at scattered addresses (a KV head's row is
// 4 KB from the next token's in the NHD layout, so each row starts a new 4 KB page, where the hardware prefetchers
// stop), and it has about as much arithmetic per byte as the memory system takes to deliver it, so the two must
// overlap: each tile loop below asks for the lines a later loop reads, a few per step of its own work, so that a
// core's miss buffers stay busy while it computes. Asking for a whole tile at once instead fills the miss queue,
// stalls the core until the burst drains and leaves the memory idle during the arithmetic (1.6x slower at batch 8 x
// 2048, 1 thread, AVX2, fp32 and bf16). The lines go to L2 (locality 1: prefetcht2), which holds a tile's K and V
// (256 KB in fp32), not to L1, where a tile's V rows would evict the q rows, scores and accumulators the loops use.
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 1); }

// Rows for a tile loop to prefetch: rows[t] + off for every row t of the loop's tile (the caller repeats a row when
// it has fewer), or none when rows is null.
template <typename T>
struct PrefetchRows {
  const T* const* rows = nullptr;
  int64_t off = 0;
};

// Elements of T per 64-byte cache line: a whole number of vectors (a vector of kF is at most one line, fp32 on
// AVX-512).
template <typename T>
constexpr int64_t kLine = 64 / sizeof(T);

// s[g * kDecodeTile + t + u] = (or += with Add) the lane sum of a[u][g], for GN heads and 2 tokens (u = 0, 1). On
// AVX2 two heads' 4 sums come out of one transpose-add (two levels of hadd, then the 128-bit halves added): 7
// instructions for 4 sums with their stores, where 4 separate lane sums take 28.
template <int GN, bool Add>
inline void store_pair_sums(const fVec (&a)[2][GN], float* s) {
  int g = 0;
#if defined(CPU_CAPABILITY_AVX2)
  for (; g < GN; g += 2) {
    const int g1 = std::min(g + 1, GN - 1);   // an odd last head sums its two vectors twice and stores one pair
    const __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(a[0][g], a[1][g]), _mm256_hadd_ps(a[0][g1], a[1][g1]));
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    float* s0 = s + g * kDecodeTile;
    float* s1 = s + g1 * kDecodeTile;
    if constexpr (Add) {
      r = _mm_add_ps(r, _mm_loadh_pi(_mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(s0)),
                                     reinterpret_cast<const __m64*>(s1)));
    }
    _mm_storel_pi(reinterpret_cast<__m64*>(s0), r);
    if (g1 != g) _mm_storeh_pi(reinterpret_cast<__m64*>(s1), r);
  }
#endif
  for (; g < GN; ++g) {
    for (int u = 0; u < 2; ++u) {
      float& out = s[g * kDecodeTile + u];
      out = Add ? out + hsum(a[u][g]) : hsum(a[u][g]);
    }
  }
}

// tile_scores with the prefetch decided at compile time (PF: pf.rows is set), so that a loop without one (MLA) has
// none of its instructions. With PF and up to 4 heads (2 x GN accumulators + 2 K vectors fit AVX2's 16 registers),
// two tokens go through the loop together, their lane sums reduced together (store_pair_sums); otherwise (MLA: two
// tokens at 4 bf16 heads took 5% more instructions, GCC shuffling registers) one token at a time, 4 vectors a step.
// With PF the vector loop goes a cache line at a time, and asks for the same line of pf's row(s).
template <int GN, bool Add, bool PF, typename T>
void tile_scores_impl(const float* q, int64_t q_stride, const T* const* kp, int64_t koff, int64_t nt, int64_t d,
                      float* s, PrefetchRows<T> pf) {
  static_assert(kLine<T> % kF == 0, "a cache line is a whole number of vectors");
  constexpr int U = PF && GN <= 4 ? 2 : 1;   // tokens per step (paged decode's; MLA's loop stays one token)
  int64_t t = 0;
  const auto tokens = [&](auto un) {
    constexpr int N = decltype(un)::value;
    const T* k[N];
    const T* pr[N];
    for (int u = 0; u < N; ++u) {
      k[u] = kp[t + u] + koff;
      pr[u] = PF ? pf.rows[t + u] + pf.off : nullptr;
    }
    fVec a[2][GN];
    for (int u = 0; u < N; ++u) {
      for (int g = 0; g < GN; ++g) a[u][g] = fVec(0.f);
    }
    const auto step = [&](int64_t i) {
      fVec kv[N];
      for (int u = 0; u < N; ++u) kv[u] = load_f(k[u] + i);
      for (int g = 0; g < GN; ++g) {
        const fVec qv = fVec::loadu(q + g * q_stride + i);
        for (int u = 0; u < N; ++u) a[u][g] = at::vec::fmadd(qv, kv[u], a[u][g]);
      }
    };
    int64_t i = 0;
    if constexpr (PF) {   // a line at a time (and the same line of pf's rows)
      for (; i + kLine<T> <= d; i += kLine<T>) {
        for (int u = 0; u < N; ++u) prefetch_l2(pr[u] + i);
        for (int64_t j = 0; j < kLine<T>; j += kF) step(i + j);
      }
      if (i < d) {
        for (int u = 0; u < N; ++u) prefetch_l2(pr[u] + i);
      }
    }
#pragma GCC unroll 4
    for (; i + kF <= d; i += kF) step(i);
    if (i < d) {
      for (int u = 0; u < N; ++u) {
        const fVec kv = load_f(k[u] + i, d - i);
        for (int g = 0; g < GN; ++g) a[u][g] = at::vec::fmadd(fVec::loadu(q + g * q_stride + i, d - i), kv, a[u][g]);
      }
    }
    if constexpr (N == 2) {
      store_pair_sums<GN, Add>(a, s + t);
    } else {
      for (int g = 0; g < GN; ++g) {
        float& out = s[g * kDecodeTile + t];
        out = Add ? out + hsum(a[0][g]) : hsum(a[0][g]);
      }
    }
  };
  if constexpr (U == 2) {
    for (; t + 2 <= nt; t += 2) tokens(std::integral_constant<int, 2>{});
  }
  for (; t < nt; ++t) tokens(std::integral_constant<int, 1>{});
}

// Scores of GN heads (q rows at q, row stride q_stride, pre-scaled) against the first d elements of the tile's nt K
// rows (kp[t] + koff): s[g * kDecodeTile + t] = the dot product, or += it with Add (a score whose key is split over
// two caches, as MLA's ckv and kpe). Per K vector: one load and conversion, GN FMAs with q read from L1. With pf,
// each line of K row t also asks for the same line of row t of pf (decode: this tile's V row of the same KV head).
template <int GN, bool Add = false, typename T>
void tile_scores(const float* q, int64_t q_stride, const T* const* kp, int64_t koff, int64_t nt, int64_t d,
                 float* s, PrefetchRows<T> pf = {}) {
  if (pf.rows != nullptr) {
    tile_scores_impl<GN, Add, true>(q, q_stride, kp, koff, nt, d, s, pf);
  } else {
    tile_scores_impl<GN, Add, false>(q, q_stride, kp, koff, nt, d, s, pf);
  }
}

// acc[g] = alpha[g] * acc[g] + sum_t p[g * kDecodeTile + t] * V row t (vp[t] + voff), for GN heads: a slice of
// 2 * kF columns of every head's accumulator stays in registers while the tile's V rows stream through it, each V
// element loaded and converted once for all GN heads, each p broadcast once per 2 * kF columns. With pf, each slice
// first asks for the lines that start in its columns of every row of pf (decode: the next tile's K rows of the same
// KV head): one line of fp32 on AVX2, two on AVX-512, one every other slice of 16-bit elements. (Not in the loop
// over V rows, nor with the slice in a function of its own: either way GCC kept the accumulators on the stack.)
template <int GN, typename T>
void tile_pv(float* acc, const float* alpha, const float* p, const T* const* vp, int64_t voff, int64_t nt,
             int64_t d, PrefetchRows<T> pf = {}) {
  int64_t i = 0;
  for (; i + 2 * kF <= d; i += 2 * kF) {
    fVec a0[GN], a1[GN];
    for (int g = 0; g < GN; ++g) {
      const fVec al(alpha[g]);
      a0[g] = fVec::loadu(acc + g * d + i) * al;
      a1[g] = fVec::loadu(acc + g * d + i + kF) * al;
    }
    for (int64_t c = (i + kLine<T> - 1) / kLine<T> * kLine<T>; pf.rows != nullptr && c < i + 2 * kF;
         c += kLine<T>) {
#pragma GCC unroll 8
      for (int64_t t = 0; t < nt; ++t) prefetch_l2(pf.rows[t] + pf.off + c);
    }
#pragma GCC unroll 2
    for (int64_t t = 0; t < nt; ++t) {
      fVec v0, v1;
      load2_f(vp[t] + voff + i, v0, v1);
      for (int g = 0; g < GN; ++g) {
        const fVec pg(p[g * kDecodeTile + t]);
        a0[g] = at::vec::fmadd(pg, v0, a0[g]);
        a1[g] = at::vec::fmadd(pg, v1, a1[g]);
      }
    }
    for (int g = 0; g < GN; ++g) {
      a0[g].store(acc + g * d + i);
      a1[g].store(acc + g * d + i + kF);
    }
  }
  for (; i < d; i += kF) {  // head_dim not a multiple of 2 * kF: the last columns one vector (or less) at a time
    const int64_t n = std::min(kF, d - i);
    fVec a[GN];
    for (int g = 0; g < GN; ++g) a[g] = fVec::loadu(acc + g * d + i, n) * fVec(alpha[g]);
    for (int64_t t = 0; t < nt; ++t) {
      const fVec vv = n == kF ? load_f(vp[t] + voff + i) : load_f(vp[t] + voff + i, n);
      for (int g = 0; g < GN; ++g) a[g] = at::vec::fmadd(fVec(p[g * kDecodeTile + t]), vv, a[g]);
    }
    for (int g = 0; g < GN; ++g) a[g].store(acc + g * d + i, n);
  }
}

// Runs f(std::integral_constant<int, GN>{}, g0) over `heads` heads in blocks of at most MaxGN.
template <int MaxGN, typename F>
void for_head_blocks(int64_t heads, const F& f) {
  for (int64_t g0 = 0; g0 < heads; g0 += MaxGN) {
    with_count<MaxGN>(std::min<int64_t>(MaxGN, heads - g0), [&](auto gn) { f(gn, g0); });
  }
}

// Online softmax of every head over one tile's nt scores (after any soft-cap): p overwrites the scores, alpha is
// the factor tile_pv rescales the head's accumulator by.
inline void tile_softmax(DecodeScratch& ws, int64_t heads, int64_t nt) {
  for (int64_t h = 0; h < heads; ++h) {
    ws.alpha[h] = softmax_update(&ws.s[h * kDecodeTile], nt, 0, nt, ws.m[h], ws.l[h]);
  }
}

// Asks for the cache lines of `bytes` bytes at p, to arrive while other work runs.
inline void prefetch(const void* p, int64_t bytes) {
#pragma GCC unroll 4
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}

// ------------------------------------------------------------------------------------------------- split-KV
// Splits per query row when the caller leaves it to us (num_splits = 0): enough work items for every thread to get
// two (so one long sequence does not leave threads idle), but never fewer than 256 tokens per split, below which
// the partial writes and the merge stop being noise next to the keys read (the GPU path's rule too).
inline int64_t auto_splits(int64_t items, int64_t max_len) {
  const int64_t want = 2 * std::max<int64_t>(1, at::get_num_threads());
  if (items >= want) return 1;
  return std::clamp<int64_t>((want + items - 1) / items, 1, std::max<int64_t>(1, max_len / 256));
}

// Split `split` of `splits` equal shares of the keys [start, end).
inline std::pair<int64_t, int64_t> split_range(int64_t start, int64_t end, int64_t split, int64_t splits) {
  const int64_t per = (end - start + splits - 1) / splits;
  return {std::min(end, start + split * per), std::min(end, start + (split + 1) * per)};
}

// The results of (query row, head, split) work: with one split each head's output goes straight to its place;
// with more, each split keeps its normalized output and lse (fp32) here, and merge() combines them.
struct SplitPartials {
  int64_t heads, splits, d;
  std::vector<float> o, lse;
  SplitPartials(int64_t rows, int64_t heads_, int64_t splits_, int64_t d_)
      : heads(heads_), splits(splits_), d(d_), o(splits_ > 1 ? rows * heads_ * splits_ * d_ : 0),
        lse(splits_ > 1 ? rows * heads_ * splits_ : 0) {}

  // Head h of query row `row` over split `split`, from its unnormalized accumulator acc and running max m and sum l
  // (natural log): out (the head's output row, used when splits == 1) = acc / l.
  template <typename T>
  void store(int64_t row, int64_t h, int64_t split, const float* acc, float m, float l, T* out) {
    const float inv = (l > 0.f || std::isnan(l)) ? 1.f / l : 0.f;   // an empty split: 0; a NaN sum (sink): NaN
    if (splits == 1) {  // a row's one split sees at least one key
      for (int64_t i = 0; i < d; i += kF) {
        const int64_t n = std::min(kF, d - i);
        store_f(out + i, fVec::loadu(acc + i, n) * fVec(inv), n);
      }
      return;
    }
    const int64_t slot = (row * heads + h) * splits + split;
    float* po = &o[slot * d];
    for (int64_t i = 0; i < d; ++i) po[i] = acc[i] * inv;
    lse[slot] = (l > 0.f || std::isnan(l)) ? m + std::log(l) : -std::numeric_limits<float>::infinity();  // empty
  }

  // Log-sum-exp merge of every (row, head) when splits > 1: o = sum_s exp(lse_s - lse) o_s, lse = log sum_s
  // exp(lse_s); out_row(row, h) is where the head's output row (T) goes.
  template <typename T, typename OutRow>
  void merge(int64_t rows, const OutRow& out_row) const {
    if (splits == 1) return;
    at::parallel_for(0, rows * heads, 16, [&](int64_t r0, int64_t r1) {
      std::vector<float> acc(d);
      for (int64_t r = r0; r < r1; ++r) {
        const float* ls = &lse[r * splits];
        const float mx = *std::max_element(ls, ls + splits);
        float total = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < splits; ++s) {
          if (ls[s] == -std::numeric_limits<float>::infinity()) continue;
          const float w = std::exp(ls[s] - mx);
          total += w;
          axpy_f(acc.data(), w, &o[(r * splits + s) * d], d);
        }
        T* out = out_row(r / heads, r % heads);
        for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(acc[i] / total);
      }
    });
  }
};

// Split-KV decode over the threads: item(row, split, ws) fills ws (cleared by the item, its q rows included) with
// every head's accumulator (dv wide), max and sum for query row `row` over split `split` of its keys; the results go
// to out (rows, heads, dv) of T, merged over the splits when there are several. Work items are (row, split), dealt
// round-robin to the threads: the rows of a causal prefill see more keys the later they come, so at::parallel_for's
// contiguous chunks would give the last thread most of the work (3/4 of it over 2 threads for one prompt).
template <typename T, typename Item>
void run_split_items(int64_t rows, int64_t heads, int64_t splits, int64_t dq, int64_t dv, const at::Tensor& out,
                     const Item& item) {
  T* op = out.mutable_data_ptr<T>();
  const auto out_row = [&](int64_t r, int64_t h) { return op + r * out.stride(0) + h * out.stride(1); };
  SplitPartials parts(rows, heads, splits, dv);
  const int64_t items = rows * splits, lanes = std::clamp<int64_t>(at::get_num_threads(), 1, items);
  at::parallel_for(0, lanes, 1, [&](int64_t l0, int64_t l1) {
    thread_local DecodeScratch ws;
    ws.reserve(heads, dq, dv);
    for (int64_t lane = l0; lane < l1; ++lane) {
      for (int64_t w = lane; w < items; w += lanes) {
        const int64_t split = w % splits, r = w / splits;
        item(r, split, ws);
        for (int64_t h = 0; h < heads; ++h) parts.store(r, h, split, &ws.acc[h * dv], ws.m[h], ws.l[h], out_row(r, h));
      }
    }
  });
  parts.merge<T>(rows, out_row);
}

}  // namespace llmkern
