// The measured memory roof: STREAM-style kernels over all of torch's threads.
//
// McCalpin's STREAM (https://www.cs.virginia.edu/stream/) defines the kernels and how their bytes are counted:
// copy a[i] = b[i] moves 2 arrays, triad a[i] = b[i] + s * c[i] moves 3; "read" (a sum over one array, 1 array)
// is the pure load rate that decode attention and weight-only matmuls see. Arrays must be much larger than the
// last-level cache (the Python caller sizes them), each thread touches the same slice in every kernel and in the
// first-touch initialisation (so pages sit near the thread on NUMA machines), and the best of several repetitions
// is reported, as STREAM does. Write-allocate traffic is not counted, also as STREAM does.
#include <chrono>

#include "llmkern_cpu.h"

namespace llmkern {
namespace {

// Splits [0, n) into one contiguous slice per thread, the same slices every call (a static schedule): grain n / T.
template <typename F>
void per_thread(int64_t n, const F& f) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, n, (n + threads - 1) / threads, f);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Best GB/s (1e9 bytes/s) of each kernel over `reps` repetitions on arrays of n fp32: a float64 tensor
// [read, copy, triad].
at::Tensor stream(int64_t n, int64_t reps) {
  TORCH_CHECK(n >= kF && reps >= 1, "llmkern_cpu::stream: n >= ", kF, " and reps >= 1");
  n -= n % (4 * kF);  // whole unrolled vector steps
  at::Tensor ta = at::empty({n}, at::kFloat), tb = at::empty({n}, at::kFloat), tc = at::empty({n}, at::kFloat);
  float *a = ta.data_ptr<float>(), *b = tb.data_ptr<float>(), *c = tc.data_ptr<float>();
  per_thread(n, [&](int64_t i0, int64_t i1) {  // first touch
    for (int64_t i = i0; i < i1; ++i) {
      a[i] = 1.f;
      b[i] = 2.f;
      c[i] = 0.5f;
    }
  });
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<float> sums(threads, 0.f);
  double best[3] = {0, 0, 0};
  const double bytes[3] = {4.0 * n, 8.0 * n, 12.0 * n};
  for (int64_t r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    per_thread(n, [&](int64_t i0, int64_t i1) {  // read: four accumulators hide the add latency
      fVec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
      for (int64_t i = i0; i + 4 * kF <= i1; i += 4 * kF) {
        s0 = s0 + fVec::loadu(a + i);
        s1 = s1 + fVec::loadu(a + i + kF);
        s2 = s2 + fVec::loadu(a + i + 2 * kF);
        s3 = s3 + fVec::loadu(a + i + 3 * kF);
      }
      sums[at::get_thread_num()] += hsum((s0 + s1) + (s2 + s3));
    });
    best[0] = std::max(best[0], bytes[0] / seconds_since(t0) / 1e9);

    t0 = std::chrono::steady_clock::now();
    per_thread(n, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i + kF <= i1; i += kF) fVec::loadu(b + i).store(c + i);
    });
    best[1] = std::max(best[1], bytes[1] / seconds_since(t0) / 1e9);

    t0 = std::chrono::steady_clock::now();
    const fVec scalar(3.f);
    per_thread(n, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i + kF <= i1; i += kF) {
        at::vec::fmadd(scalar, fVec::loadu(c + i), fVec::loadu(b + i)).store(a + i);
      }
    });
    best[2] = std::max(best[2], bytes[2] / seconds_since(t0) / 1e9);
  }
  // The read kernel's sums are used, so the loads cannot be optimized away.
  float total = 0.f;
  for (float s : sums) total += s;
  TORCH_CHECK(std::isfinite(total), "llmkern_cpu::stream: the read kernel's checksum is not finite");
  at::Tensor out = at::empty({3}, at::kDouble);
  std::copy(best, best + 3, out.data_ptr<double>());
  return out;
}

// How this library was really compiled: the vector ISA Vectorized<float> maps to and whether OpenMP (and so
// at::parallel_for's threads) was on. `llmkern build-ext` prints it.
std::string build_info() {
#if defined(CPU_CAPABILITY_AVX512)
  std::string isa = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  std::string isa = "avx2";
#else
  std::string isa = "default";
#endif
#ifdef _OPENMP
  const char* threads = "openmp";
#else
  const char* threads = "serial";
#endif
  return isa + ", " + std::to_string(kF) + " fp32 lanes, " + threads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkern_cpu, m) {
  m.def("stream(int n, int reps) -> Tensor", &stream);
  m.def("build_info() -> str", &build_info);
}

}  // namespace llmkern
