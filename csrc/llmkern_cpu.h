// What every CPU kernel file shares: ATen's vector and parallel headers, float loads and stores of fp32 / bf16 /
// fp16 data, and the argument checks the C++ side repeats as a last line of defence.
//
// Vector width: at::vec::Vectorized<float> is 8 lanes when the build defines CPU_CAPABILITY_AVX2 (with -mavx2 -mfma
// -mf16c), 16 with CPU_CAPABILITY_AVX512, and a plain array of scalars when neither is defined: llmkern/cpu.py picks
// the flags from torch's own CPU capability. Every kernel is written for any width (kF below) with scalar tails.
//
// Threads: at::parallel_for splits a range over torch's intra-op thread pool (torch.get_num_threads()); the build
// passes -fopenmp, without which ATen's OpenMP backend compiles parallel_for to a serial loop.
//
// Precision: every kernel loads its inputs as fp32, accumulates in fp32 and rounds once to the output dtype, to
// nearest even (c10::BFloat16 / c10::Half conversions and ATen's vector conversions both do). An fp8 KV cache
// (float8_e4m3fn / float8_e5m2) loads exactly: every fp8 value, NaN and inf included, is an fp32 value.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: a third of its parse time
#include <ATen/ops/empty.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace llmkern {

using BF16 = c10::BFloat16;
using F16 = c10::Half;
using fVec = at::vec::Vectorized<float>;
constexpr int64_t kF = fVec::size();  // fp32 lanes per vector

using E4M3 = c10::Float8_e4m3fn;   // an fp8 KV cache's element types (OCP FP8: 4 exponent bits and 3 mantissa
using E5M2 = c10::Float8_e5m2;     // bits, no inf; or 5 and 2, IEEE-like with inf)

template <typename T>
constexpr bool is_reduced = std::is_same_v<T, BF16> || std::is_same_v<T, F16>;
template <typename T>
constexpr bool is_fp8 = std::is_same_v<T, E4M3> || std::is_same_v<T, E5M2>;

// ------------------------------------------------------------------------------------------ fp8 loads
// fp8 -> fp32, exactly, on whole vectors with ATen's int32 and float lanes (OCP FP8: e4m3fn has bias 7 and 3
// mantissa bits, no inf, NaN at S.1111.111; e5m2 has bias 15 and 2, inf and NaN at exponent 31 as IEEE):
//   normal (exponent >= 1): the 7 exponent and mantissa bits moved under fp32's, the exponent rebiased;
//   subnormal (exponent 0): the mantissa as a number times 2**(1 - bias - mantissa bits);
//   e4m3fn's NaN, e5m2's inf and NaN: fp32's exponent 255 with the mantissa bits kept; then the sign.
// About 13 instructions per vector on AVX2 (a bf16 load is 2), paid once per K/V element for all of a group's heads.
using iVec = at::vec::Vectorized<int32_t>;
static_assert(iVec::size() == kF, "int32 and float vectors have the same lanes");

// n <= kF fp8 bytes at p sign-extended into int32 lanes (zeros after them).
inline iVec load_bytes_i32(const void* p, int64_t n = kF) {
  const int8_t* b = static_cast<const int8_t*>(p);
  if (n < kF) {   // (ATen's partial int8 load fills the rest with ones)
    int8_t tmp[kF] = {};
    std::memcpy(tmp, b, n);
    return load_bytes_i32(tmp);
  }
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::convert_to_int32<int8_t>(b);   // kF bytes widened in one instruction
#else
  int32_t tmp[kF];
  for (int64_t i = 0; i < kF; ++i) tmp[i] = b[i];
  return iVec::loadu(tmp);
#endif
}

template <typename T>
inline fVec fp8_to_float(const iVec& x) {
  constexpr bool e4m3 = std::is_same_v<T, E4M3>;
  constexpr int mant = e4m3 ? 3 : 2, bias = e4m3 ? 7 : 15;
  const iVec mag = x & iVec(0x7F);
  iVec bits = (mag << iVec(23 - mant)) + iVec((127 - bias) << 23);
  if constexpr (e4m3) {
    bits = iVec::blendv(bits, iVec(0x7FC00000), mag == iVec(0x7F));
  } else {
    bits = bits | (mag > iVec(0x7B) & iVec(0x7F800000));
  }
  const fVec sub = at::vec::convert<float>(mag) * fVec(std::ldexp(1.f, 1 - bias - mant));
  const fVec v = fVec::blendv(at::vec::cast<float>(bits), sub, at::vec::cast<float>(mag < iVec(1 << mant)));
  return v | at::vec::cast<float>(x & iVec(std::numeric_limits<int32_t>::min()));
}

// ------------------------------------------------------------------------------------------ loads and stores
// kF consecutive elements of p as fp32.
template <typename T>
inline fVec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else if constexpr (is_fp8<T>) {
    return fp8_to_float<T>(load_bytes_i32(p));
  } else {
    fVec v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

// The first n < kF elements of p as fp32, zeros after them (never reads past p + n).
template <typename T>
inline fVec load_f(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p, n);
  } else if constexpr (is_fp8<T>) {
    return fp8_to_float<T>(load_bytes_i32(p, n));
  } else {
    float tmp[kF] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
    return fVec::loadu(tmp);
  }
}

// 2 * kF consecutive elements as two fp32 vectors. Two half-width loads, each widened in place (vpmovzxwd from
// memory + a shift for bf16, vcvtph2ps from memory for fp16), take 4 instructions where ATen's full-width
// load_to_float(p, a, b) takes 7 (a load, a lane extract, then the two conversions).
template <typename T>
inline void load2_f(const T* p, fVec& a, fVec& b) {
  a = load_f(p);
  b = load_f(p + kF);
}

// v rounded to T and stored: kF elements, or the first n.
template <typename T>
inline void store_f(T* p, const fVec& v, int64_t n = kF) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, n);   // the first n of the 2 * kF converted lanes
  }
}

// a and b rounded to T and stored as 2 * kF consecutive elements.
template <typename T>
inline void store2_f(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kF);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// dst[0:d] = src[0:d] as fp32, times mul.
template <typename T>
inline void convert_row(const T* src, float* dst, int64_t d, float mul = 1.f) {
  const fVec mv(mul);
  int64_t i = 0;
  for (; i + kF <= d; i += kF) (load_f(src + i) * mv).store(dst + i);
  if (i < d) (load_f(src + i, d - i) * mv).store(dst + i, d - i);
}

// The values a and b take once rounded to T (identity for fp32): models the roundings of unfused PyTorch code.
template <typename T>
inline void round2(fVec& a, fVec& b) {
  if constexpr (is_reduced<T>) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
  }
}

template <typename T>
inline float round_scalar(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// ------------------------------------------------------------------------------ pairs in a type's lane order
// For streams where lane order does not matter between a load and a store (element-wise ops with per-element
// operands read in the same order), 2 * kF elements travel as two fp32 vectors in T's "pair order":
//   bf16: the even-indexed elements, then the odd-indexed ones. A bf16 value is the top half of its fp32 value, so
//         one whole-vector load splits into both with a shift and a mask (3 instructions for 2 * kF elements, where
//         load2_f takes 4), and the store joins two rounded vectors with a shift, two masks and an or (no pack and
//         lane permute as in ATen's convert_from_float).
//   other types: the first kF elements, then the next kF (load2_f / store2_f).
template <typename T>
inline void load_pair(const T* p, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<T, BF16>) {
    const iVec w = iVec::loadu(p);                 // kF int32 lanes = 2 * kF bf16, little-endian
    a = at::vec::cast<float>(w << iVec(16));        // element 2i: the low half of lane i
    b = at::vec::cast<float>(w & iVec(-65536));     // element 2i + 1: the high half
  } else {
    load2_f(p, a, b);
  }
}

// v's fp32 bits with bf16's round to nearest even applied to the top 16 (the low 16 left as they fall): plus 0x7FFF
// plus the lowest kept bit, c10::BFloat16's rule. NaN lanes become the quiet NaN 0x7FC00000 first, so the add can
// neither carry a NaN into inf nor overflow int32.
// NoNaN: the caller knows v holds no NaN (the blend is skipped; inf and overflow to inf round correctly).
template <bool NoNaN = false>
inline iVec bf16_rounded_bits(const fVec& v) {
  const iVec bits = at::vec::cast<int32_t>(
      NoNaN ? v : fVec::blendv(v, fVec(std::numeric_limits<float>::quiet_NaN()), v.isnan()));
  return bits + iVec(0x7FFF) + ((bits >> iVec(16)) & iVec(1));
}

// a and b (in T's pair order) rounded to T and stored as 2 * kF consecutive elements.
template <typename T, bool NoNaN = false>
inline void store_pair(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, BF16>) {
    const iVec lo = (bf16_rounded_bits<NoNaN>(a) >> iVec(16)) & iVec(0xFFFF);
    (lo | (bf16_rounded_bits<NoNaN>(b) & iVec(-65536))).store(p);
  } else {
    store2_f(p, a, b);
  }
}

// The values a and b take once rounded to T (identity for fp32), lane by lane: pair order is kept.
template <typename T, bool NoNaN = false>
inline void round_pair(fVec& a, fVec& b) {
  if constexpr (std::is_same_v<T, BF16>) {
    a = at::vec::cast<float>(bf16_rounded_bits<NoNaN>(a) & iVec(-65536));
    b = at::vec::cast<float>(bf16_rounded_bits<NoNaN>(b) & iVec(-65536));
  } else {
    round2<T>(a, b);
  }
}

// Sum of a vector's lanes.
inline float hsum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, v);
}

inline float hmax(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return at::vec::maximum(x, y); }, v);
}

// dot(a[0:n], b[0:n]) in fp32 with one vector accumulator per lane group.
template <typename T>
inline float dot_f(const float* a, const T* b, int64_t n) {
  fVec acc(0.f);
  int64_t i = 0;
  for (; i + kF <= n; i += kF) acc = at::vec::fmadd(fVec::loadu(a + i), load_f(b + i), acc);
  if (i < n) acc = at::vec::fmadd(fVec::loadu(a + i, n - i), load_f(b + i, n - i), acc);
  return hsum(acc);
}

// acc[0:n] += p * v[0:n]
template <typename T>
inline void axpy_f(float* acc, float p, const T* v, int64_t n) {
  const fVec pv(p);
  int64_t i = 0;
  for (; i + kF <= n; i += kF) at::vec::fmadd(pv, load_f(v + i), fVec::loadu(acc + i)).store(acc + i);
  if (i < n) at::vec::fmadd(pv, load_f(v + i, n - i), fVec::loadu(acc + i, n - i)).store(acc + i, n - i);
}

// The GEMV tile (linear.cpp, moe.cpp): acc[r] = dot(x[0:K], w row r) for R rows of w (row stride ws), fp32, with x
// in the tile's order for T (gemv_pos below). R = kDotRows = 4 rows per tile.
//   fp32 / fp16 weights: x in natural order; one vector accumulator per row, per step one x vector and R weight
//   loads (4 accumulators, 4 loads and x fit AVX2's 16 vector registers).
//   bf16 weights: per step 2 * kF elements of each row come in one whole-vector load and split into their
//   even-indexed and odd-indexed elements (load_pair: a shift and a mask, where two widening loads and two shifts
//   would take 4 instructions), so x comes in the same pair order (even then odd elements of each 2 * kF block, the
//   last K % (2 * kF) in natural order); two accumulators per row (the even and the odd halves) keep two
//   independent FMA chains per row in flight.
// A reordered x changes which fp32 lane each product is summed in, not what is summed (each product is exact in
// fp32 accumulation as before).
// pf (bf16 on AVX2): where the next tile's rows start; while a tile is read, the next one's rows are prefetched into
// L2, one 64-byte line of each row per 32 elements, when rows are at most kPrefetchRowBytes long. Short rows are each
// a fresh stream of a page or two, which the hardware prefetchers (which stop at 4 KiB page boundaries) pick up
// late; measured on the 2-core AVX2 EPYC, one thread: fused_moe's bf16 decode 12-27% faster, llmkern.linear with 4
// and 8 KiB rows 1-21%, while 28 KiB rows ran 2-8% slower with it (their hardware prefetch is already in step).
// Into L2 (T1), not L1: a 4-row tile of 3 KiB rows, the next tile's and x overfilled the 32 KiB L1 (T0 ran 10%
// slower than no prefetch on a 576 x 1536 linear).
constexpr int64_t kPrefetchRowBytes = 8192;
template <typename T>
inline int64_t gemv_pos(int64_t j, int64_t K) {
  if constexpr (std::is_same_v<T, BF16>) {
    constexpr int64_t S = 2 * kF;
    if (j < K - K % S) {
      const int64_t i = j % S;
      return j - i + (i & 1) * kF + (i >> 1);
    }
  }
  return j;
}

// dst[0:K] = src[0:K] as fp32 in the GEMV tile's order for weights of type T (gemv_pos).
template <typename T>
inline void convert_row_gemv(const T* src, float* dst, int64_t K) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, BF16>) {
    for (; i + 2 * kF <= K; i += 2 * kF) {
      fVec a, b;
      load_pair(src + i, a, b);
      a.store(dst + i);
      b.store(dst + i + kF);
    }
  }
  convert_row(src + i, dst + i, K - i);
}

template <typename T, int R>
inline void dot_rows(const T* w, int64_t ws, const float* x, int64_t K, float* acc, const T* pf = nullptr) {
  fVec a[R];
  for (int r = 0; r < R; ++r) a[r] = fVec(0.f);
  int64_t k = 0;
  if constexpr (std::is_same_v<T, BF16>) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
    // the same in AVX2 intrinsics: ATen's int32 shift is a variable shift (vpsllvd), and its arrays of Vectorized
    // accumulators were stored to the stack on every step
    __m256 ae[R], ao[R];
    for (int r = 0; r < R; ++r) ae[r] = ao[r] = _mm256_setzero_ps();
    const __m256i high = _mm256_set1_epi32(-65536);
    const auto step = [&](int64_t k) {   // 16 elements of each row
      const __m256 xe = _mm256_loadu_ps(x + k), xo = _mm256_loadu_ps(x + k + 8);
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ws + k));
        ae[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, ae[r]);
        ao[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), xo, ao[r]);
      }
    };
    if (pf && K * static_cast<int64_t>(sizeof(T)) <= kPrefetchRowBytes) {   // a 64-byte line of each row per 32 elements
      for (; k + 32 <= K; k += 32) {
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf + r * ws + k), _MM_HINT_T1);
        step(k);
        step(k + 16);
      }
    }
    for (; k + 16 <= K; k += 16) step(k);
    for (int r = 0; r < R; ++r) a[r] = fVec(_mm256_add_ps(ae[r], ao[r]));
#else
    fVec b[R];
    for (int r = 0; r < R; ++r) b[r] = fVec(0.f);
    for (; k + 2 * kF <= K; k += 2 * kF) {
      const fVec xe = fVec::loadu(x + k), xo = fVec::loadu(x + k + kF);
      for (int r = 0; r < R; ++r) {
        fVec we, wo;
        load_pair(w + r * ws + k, we, wo);
        a[r] = at::vec::fmadd(we, xe, a[r]);
        b[r] = at::vec::fmadd(wo, xo, b[r]);
      }
    }
    for (int r = 0; r < R; ++r) a[r] = a[r] + b[r];
#endif
  }
  for (; k + kF <= K; k += kF) {
    const fVec xv = fVec::loadu(x + k);
    for (int r = 0; r < R; ++r) a[r] = at::vec::fmadd(load_f(w + r * ws + k), xv, a[r]);
  }
  if (k < K) {
    const fVec xv = fVec::loadu(x + k, K - k);
    for (int r = 0; r < R; ++r) a[r] = at::vec::fmadd(load_f(w + r * ws + k, K - k), xv, a[r]);
  }
  for (int r = 0; r < R; ++r) acc[r] = hsum(a[r]);
}

constexpr int kDotRows = 4;

// dot_rows for 1 <= rows <= kDotRows rows: a full tile, or the last rows of a matrix one by one.
// pf: where the next tile's kDotRows rows start (row stride ws), prefetched while this one is read, or nullptr.
template <typename T>
inline void dot_rows_n(const T* w, int64_t ws, int64_t rows, const float* x, int64_t K, float* acc,
                       const T* pf = nullptr) {
  if (rows == kDotRows) {
    dot_rows<T, kDotRows>(w, ws, x, K, acc, pf);
  } else {
    for (int64_t r = 0; r < rows; ++r) dot_rows<T, 1>(w + r * ws, ws, x, K, acc + r);
  }
}

// f(std::integral_constant<int, n>{}) for a run-time 1 <= n <= N: register-blocked loops take their block size as a
// compile-time count, so that their accumulators are registers, and the last, partial block runs with fewer.
template <int N, typename F>
inline void with_count(int64_t n, const F& f) {
  if constexpr (N > 1) {
    if (n < N) return with_count<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>{});
}

// ------------------------------------------------------------------------------------------ checks
// The Python side validates every argument before an op runs (llmkern/*.py, with clear errors). These checks repeat
// the few facts the kernels' address arithmetic relies on, so that a direct call of a torch.ops.llmkern_cpu op with
// inconsistent tensors raises instead of reading or writing out of bounds.
inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "llmkern_cpu: ", name, " must be a CPU tensor");
}

inline void check_float(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "llmkern_cpu: ", name,
              " must be float32, bfloat16 or float16, got ", s);
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "llmkern_cpu: ", name,
              " must have a contiguous last dimension");
}

inline void check_dim(const at::Tensor& t, int64_t ndim, const char* name) {
  TORCH_CHECK(t.dim() == ndim, "llmkern_cpu: ", name, " must have ", ndim, " dimensions, got ", t.dim());
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* a_name, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "llmkern_cpu: ", b_name, " must have ", a_name, "'s dtype ",
              a.scalar_type(), ", got ", b.scalar_type());
}

// A per-head float32 parameter (alibi_slopes, sinks per query head; an fp8 cache's k_scale, v_scale per KV head):
// its data, or nullptr when absent.
inline const float* head_values(const c10::optional<at::Tensor>& t, int64_t heads, const char* name) {
  if (!t.has_value()) return nullptr;
  check_cpu(*t, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == heads && t->is_contiguous(),
              "llmkern_cpu: ", name, " must be contiguous float32 (", heads, ",)");
  return t->const_data_ptr<float>();
}

// Dispatch on the three floating dtypes the kernels take: `scalar_t` is float, c10::BFloat16 or c10::Half.
#define LLMKERN_DISPATCH_FLOAT(dtype, name, ...)                                               \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                    \
                                      AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)             \
                                          AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

}  // namespace llmkern
