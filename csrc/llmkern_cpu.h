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
// nearest even (c10::BFloat16 / c10::Half conversions and ATen's vector conversions both do).
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: a third of its parse time
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace llmkern {

using BF16 = c10::BFloat16;
using F16 = c10::Half;
using fVec = at::vec::Vectorized<float>;
constexpr int64_t kF = fVec::size();  // fp32 lanes per vector

template <typename T>
constexpr bool is_reduced = std::is_same_v<T, BF16> || std::is_same_v<T, F16>;

// ------------------------------------------------------------------------------------------ loads and stores
// kF consecutive elements of p as fp32.
template <typename T>
inline fVec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
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

// Dispatch on the three floating dtypes the kernels take: `scalar_t` is float, c10::BFloat16 or c10::Half.
#define LLMKERN_DISPATCH_FLOAT(dtype, name, ...)                                               \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                    \
                                      AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)             \
                                          AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

}  // namespace llmkern
