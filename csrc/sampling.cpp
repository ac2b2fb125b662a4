// Fused sampling on CPU: temperature, top-k, top-p and min-p over each row of logits, without sorting the
// vocabulary, and the draw (or the distribution drawn from). The semantics are the Triton kernel's
// (kernels/sampling.py) and llmkern.reference.sampling_probs's:
//
//   q_i = exp((l_i - max l) / T)                       (q = 1 at the top token; T below 2^-126, 0 and float32's
//                                                       subnormals, means greedy: first argmax, as 1 / T would
//                                                       overflow; kernels/sampling.py's GREEDY_BELOW)
//   top-k:  keep l_i >= t_k, t_k the k-th largest logit (ties at the boundary all kept; k = 0 or >= V: off)
//   top-p:  among those, keep l_i >= t_p, t_p the largest logit value v with mass(l >= v) >= top_p * mass(kept)
//           (the smallest most-probable set reaching top_p, ties kept together)
//   min-p:  keep q_i >= min_p
//   p_i = q_i / sum_kept q; the token is the first kept index whose running mass exceeds u * sum_kept q, u the
//   row's Philox uniform (its seed, offset 0), or the last kept token if rounding leaves none.
// A row holding NaN or +inf, or only -inf, is invalid: token -1, probabilities 0.
//
// How the thresholds are found without sorting V logits (one thread per row, the row's fp32 logits and q in L2):
//   * top-k, k <= 1024: a streaming min-heap of the k largest values; a vector of logits whose maximum does not
//     beat the heap's minimum is skipped whole, so after the first few thousand tokens almost every vector costs a
//     load, a max and a compare. Larger k: std::nth_element (expected linear time) on a copy.
//   * top-p over the top-k survivors: they are few (about k), sorted by value.
//   * top-p over the whole row (top-k off): a histogram of q-mass over 4096 buckets of the logits' order-preserving
//     32-bit key (the sign, the exponent and 3 mantissa bits); the bucket where the mass from the top crosses the
//     target is the only one whose elements need sorting.
#include <cstring>
#include <queue>
#include <vector>

#include "llmkern_cpu.h"

namespace llmkern {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Temperatures below float32's smallest normal are greedy (llmkern.reference.GREEDY_BELOW).
constexpr float kGreedyBelow = std::numeric_limits<float>::min();

// The uniform that Triton's tl.rand(seed, 0) returns: Philox-4x32 with 10 rounds (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC 2011), key = the 64-bit seed, counter = 0, first output word as int32, folded to
// non-negative and scaled by 2^-31 in fp32; reference.philox_uniform replays it in Python.
float philox_uniform(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
  uint32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_b = uint64_t{0xCD9E8D57} * c2, prod_a = uint64_t{0xD2511F53} * c0;
    const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0, n1 = static_cast<uint32_t>(prod_b);
    const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1, n3 = static_cast<uint32_t>(prod_a);
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t v = static_cast<int32_t>(c0);
  if (v < 0) v = ~v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

// An int32 that orders like the float (the Triton kernel's key): same-sign floats order like their bits, negative
// ones backwards, which the xor undoes.
inline int32_t order_key(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

struct RowParams {
  float temperature;
  int64_t top_k;
  float top_p, min_p;
};

// Per-thread buffers: the row as fp32 (x), its q, and the small lists the searches sort.
struct SampleScratch {
  std::vector<float> x, q, tmp;
  std::vector<std::pair<float, float>> cand;   // (logit, q)
  std::vector<double> bucket_mass;
};

// t_k: the k-th largest of x[0:V] (0 < k < V).
float top_k_threshold(const float* x, int64_t V, int64_t k, SampleScratch& ws) {
  if (k > 1024) {
    ws.tmp.assign(x, x + V);
    std::nth_element(ws.tmp.begin(), ws.tmp.begin() + (k - 1), ws.tmp.end(), std::greater<float>());
    return ws.tmp[k - 1];
  }
  std::priority_queue<float, std::vector<float>, std::greater<float>> heap;   // the k largest so far; top = min
  int64_t i = 0;
  for (; i < V && static_cast<int64_t>(heap.size()) < k; ++i) heap.push(x[i]);
  for (; i + kF <= V; i += kF) {
    if (hmax(fVec::loadu(x + i)) <= heap.top()) continue;   // no lane beats the k-th largest so far
    for (int64_t j = i; j < i + kF; ++j) {
      if (x[j] > heap.top()) {
        heap.pop();
        heap.push(x[j]);
      }
    }
  }
  for (; i < V; ++i) {
    if (x[i] > heap.top()) {
      heap.pop();
      heap.push(x[i]);
    }
  }
  return heap.top();
}

// Sum of q over the elements of x >= t (and q >= min_p when min_p > 0), in double.
double kept_mass(const float* x, const float* q, int64_t V, float t, float min_p) {
  const fVec tv(t), mv(min_p), zero(0.f);
  double total = 0.0;
  int64_t i = 0;
  for (; i + 4 * kF <= V; i += 4 * kF) {   // fp32 partial sums over 4 vectors, then double
    fVec s(0.f);
    for (int64_t u = 0; u < 4 * kF; u += kF) {
      const fVec qv = fVec::loadu(q + i + u);
      s = s + fVec::blendv(zero, qv, (fVec::loadu(x + i + u) >= tv) & (qv >= mv));
    }
    total += hsum(s);
  }
  for (; i < V; ++i) {
    if (x[i] >= t && q[i] >= min_p) total += q[i];
  }
  return total;
}

// The largest value v among cand's logits with mass(logit >= v) + above >= target (cand sorted by logit, largest
// first); the smallest logit of cand if none reaches it (rounding).
float mass_threshold(std::vector<std::pair<float, float>>& cand, double above, double target) {
  std::sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  double cum = above;
  for (size_t i = 0; i < cand.size();) {
    size_t j = i;
    while (j < cand.size() && cand[j].first == cand[i].first) cum += cand[j++].second;   // a tie moves together
    if (cum >= target) return cand[i].first;
    i = j;
  }
  return cand.empty() ? -kInf : cand.back().first;
}

// t_p over the whole row (top-k off): the q-mass histogram over key buckets (file comment).
float top_p_threshold_full(const float* x, const float* q, int64_t V, double target, SampleScratch& ws) {
  constexpr int kShift = 20;                       // 32 - 12 bits: 4096 buckets
  constexpr int64_t kBuckets = int64_t{1} << (32 - kShift);
  const auto bucket = [](float v) { return (order_key(v) >> kShift) + kBuckets / 2; };
  ws.bucket_mass.assign(kBuckets, 0.0);
  for (int64_t i = 0; i < V; ++i) ws.bucket_mass[bucket(x[i])] += q[i];
  double above = 0.0;
  int64_t b = kBuckets - 1;
  for (; b > 0 && above + ws.bucket_mass[b] < target; --b) above += ws.bucket_mass[b];
  ws.cand.clear();
  for (int64_t i = 0; i < V; ++i) {
    if (bucket(x[i]) == b) ws.cand.emplace_back(x[i], q[i]);
  }
  return mass_threshold(ws.cand, above, target);
}

// One row: returns the token (sample) or writes the probabilities (probs != nullptr).
template <typename T>
int64_t sample_row(const T* row, int64_t V, const RowParams& p, int64_t seed, float* probs, SampleScratch& ws) {
  ws.x.resize(V);
  ws.q.resize(V);
  float* x = ws.x.data();
  float* q = ws.q.data();
  // Pass 1: fp32 logits, NaN check, max and its first index.
  float m = -kInf;
  int64_t arg = 0;
  bool nan = false;
  for (int64_t i = 0; i < V; ++i) {
    const float v = static_cast<float>(row[i]) + 0.f;   // + 0: -0 and 0 are one value
    x[i] = v;
    nan |= v != v;
    if (v > m) {
      m = v;
      arg = i;
    }
  }
  const bool valid = !nan && m > -kInf && m < kInf;
  if (!valid || p.temperature < kGreedyBelow) {
    if (probs != nullptr) {
      std::fill(probs, probs + V, 0.f);
      if (valid) probs[arg] = 1.f;
    }
    return valid ? arg : -1;
  }
  // q = exp((l - m) / T) and its sum.
  const fVec mv(m), inv_t(1.f / p.temperature);
  double z = 0.0;
  {
    int64_t i = 0;
    for (; i + kF <= V; i += kF) {
      const fVec qv = ((fVec::loadu(x + i) - mv) * inv_t).exp();
      qv.store(q + i);
      z += hsum(qv);
    }
    for (; i < V; ++i) {
      q[i] = std::exp((x[i] - m) * (1.f / p.temperature));
      z += q[i];
    }
  }
  // Thresholds.
  float t = -kInf;
  double mass = z;   // the q-mass of the tokens with l >= t
  if (p.top_k > 0 && p.top_k < V) {
    t = top_k_threshold(x, V, p.top_k, ws);
    if (p.top_p < 1.f) {   // the survivors are few: list them
      ws.cand.clear();
      for (int64_t i = 0; i < V; ++i) {
        if (x[i] >= t) ws.cand.emplace_back(x[i], q[i]);
      }
      double survivors = 0.0;
      for (const auto& c : ws.cand) survivors += c.second;
      t = mass_threshold(ws.cand, 0.0, static_cast<double>(p.top_p) * survivors);
    }
    mass = kept_mass(x, q, V, t, 0.f);
  } else if (p.top_p < 1.f) {
    t = top_p_threshold_full(x, q, V, static_cast<double>(p.top_p) * z, ws);
    mass = kept_mass(x, q, V, t, 0.f);
  }
  const float min_p = p.min_p;
  if (min_p > 0.f) mass = kept_mass(x, q, V, t, min_p);
  const auto kept = [&](int64_t i) { return x[i] >= t && q[i] >= min_p; };

  if (probs != nullptr) {
    const float inv = static_cast<float>(1.0 / mass);   // mass >= 1: the top token (q = 1) is always kept
    for (int64_t i = 0; i < V; ++i) probs[i] = kept(i) ? q[i] * inv : 0.f;
    return 0;
  }
  // Inverse CDF in fp32, in index order, as the GPU kernel sums it.
  const float goal = philox_uniform(seed) * static_cast<float>(mass);
  float running = 0.f;
  int64_t last = -1;
  for (int64_t i = 0; i < V; ++i) {
    if (!kept(i) || q[i] <= 0.f) continue;
    running += q[i];
    last = i;
    if (running > goal) return i;
  }
  return last;
}

void check_sampling(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                    const at::Tensor& top_p, const at::Tensor& min_p) {
  check_float(logits, "logits");
  check_dim(logits, 2, "logits");
  check_last_dim_contiguous(logits, "logits");
  const int64_t batch = logits.size(0);
  for (const auto& [t, name, dtype] : {std::tuple{&temperature, "temperature", at::kFloat},
                                       {&top_k, "top_k", at::kInt}, {&top_p, "top_p", at::kFloat},
                                       {&min_p, "min_p", at::kFloat}}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->dim() == 1 && t->size(0) == batch, "llmkern_cpu: ", name,
                " must be a (batch,) tensor of ", dtype);
  }
}

// Runs f(row, params, seed index) over the rows in parallel (one row per task: rows are long).
template <typename F>
void for_rows(const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
              const at::Tensor& min_p, const F& f) {
  const at::Tensor tc = temperature.contiguous(), kc = top_k.contiguous(), pc = top_p.contiguous(),
                   mc = min_p.contiguous();
  const float* tp = tc.const_data_ptr<float>();
  const int32_t* kp = kc.const_data_ptr<int32_t>();
  const float* pp = pc.const_data_ptr<float>();
  const float* mp = mc.const_data_ptr<float>();
  at::parallel_for(0, tc.size(0), 1, [&](int64_t r0, int64_t r1) {
    thread_local SampleScratch ws;
    for (int64_t r = r0; r < r1; ++r) f(r, RowParams{tp[r], kp[r], pp[r], mp[r]}, ws);
  });
}

// logits (batch, V); per-row temperature (fp32), top_k (int32), top_p, min_p (fp32), already range-checked by
// llmkern/sampling.py; seed int64 (batch,). Returns the int64 tokens.
at::Tensor sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed) {
  check_sampling(logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.dim() == 1 && seed.size(0) == logits.size(0),
              "llmkern_cpu: seed must be int64 (batch,)");
  const at::Tensor sc = seed.contiguous();
  const int64_t* sp = sc.const_data_ptr<int64_t>();
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  int64_t* op = out.mutable_data_ptr<int64_t>();
  LLMKERN_DISPATCH_FLOAT(logits.scalar_type(), "llmkern_cpu::sample", [&] {
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    for_rows(temperature, top_k, top_p, min_p, [&](int64_t r, const RowParams& p, SampleScratch& ws) {
      op[r] = sample_row(lp + r * logits.stride(0), logits.size(1), p, sp[r], nullptr, ws);
    });
  });
  return out;
}

// The distribution `sample` draws from: fp32 (batch, V).
at::Tensor sampling_probs(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                          const at::Tensor& top_p, const at::Tensor& min_p) {
  check_sampling(logits, temperature, top_k, top_p, min_p);
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  float* op = out.mutable_data_ptr<float>();
  LLMKERN_DISPATCH_FLOAT(logits.scalar_type(), "llmkern_cpu::sampling_probs", [&] {
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    for_rows(temperature, top_k, top_p, min_p, [&](int64_t r, const RowParams& p, SampleScratch& ws) {
      sample_row(lp + r * logits.stride(0), logits.size(1), p, 0, op + r * out.stride(0), ws);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkern_cpu, m) {
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed) -> Tensor",
        &sample);
  m.def("sampling_probs(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p) -> Tensor",
        &sampling_probs);
}

}  // namespace llmkern
