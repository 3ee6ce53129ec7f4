// How gpufit's CPU kernels use threads.
//
// ATen's at::parallel_for is a header template that opens an OpenMP region only where the code
// calling it is compiled with OpenMP, and gpufit's sources are built without -fopenmp (their
// flags, in gpufit/_build.py, are shared with the JIT build): at::parallel_for in them runs on
// the calling thread. The ATen operators they call do run in parallel (libtorch is built with
// OpenMP), one short region per call, which is what made many small operators slow on a busy
// machine. So a CPU kernel here either
//   - runs one parallel region of its own (run_on_threads), through the OpenMP runtime libtorch
//     has loaded: GOMP_parallel is what `#pragma omp parallel` compiles to (libgomp, and LLVM's
//     libomp provides it too). Inside, ATen's operators see an active region and run on their
//     thread alone, and MKL is told so too (see SingleThreadedBlas). Where no such runtime is
//     found, the workers run one after another on the calling thread;
//   - or runs on the calling thread alone (OneThread), for work too small to share.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/ParallelGuard.h>

#include <atomic>
#include <cstdint>
#include <exception>

// Weak: null where the runtime lacks them, never a load failure.
extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags)
    __attribute__((weak));
int omp_get_thread_num(void) __attribute__((weak));
int omp_get_max_threads(void) __attribute__((weak));
void omp_set_num_threads(int) __attribute__((weak));
// MKL, inside libtorch_cpu on x86-64 (the lower-case mkl_set_num_threads_local is its Fortran
// interface, which takes a pointer).
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace gpufit {
namespace cpu_threads {

// ATen sets MKL to keep its thread count inside parallel regions (mkl_set_dynamic(false)), so a
// GEMM called from a worker thread would fork a nested team on every call. While alive, MKL
// runs this thread's calls on this thread alone.
struct SingleThreadedBlas {
  int previous = -1;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (previous >= 0) MKL_Set_Num_Threads_Local(previous);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
};

// While alive, every operator this thread calls runs on this thread alone (ATen's thread count
// for this thread is 1, and MKL's).
struct OneThread {
  int previous = 0;
  SingleThreadedBlas blas;
  OneThread() {
    if (omp_get_max_threads != nullptr && omp_set_num_threads != nullptr) {
      previous = omp_get_max_threads();
      omp_set_num_threads(1);
    }
  }
  ~OneThread() {
    if (previous > 0) omp_set_num_threads(previous);
  }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;
};

inline bool can_fork() {
  return GOMP_parallel != nullptr && omp_get_thread_num != nullptr && !at::in_parallel_region() &&
         at::get_num_threads() > 1;
}

template <typename Body>
struct Region {
  const Body* body;
  int64_t workers;
  at::ThreadLocalState state;  // the caller's: below autograd, no autocast, grad mode
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;

  static void run(void* self) {
    auto& region = *static_cast<Region*>(self);
    const int64_t worker = omp_get_thread_num();
    if (worker >= region.workers) return;
    try {
      at::ThreadLocalStateGuard state_guard(region.state);
      at::internal::ThreadIdGuard id_guard(static_cast<int>(worker));
      c10::ParallelGuard parallel_guard(true);
      SingleThreadedBlas blas;
      (*region.body)(worker);
    } catch (...) {  // nothing may unwind through the OpenMP runtime
      if (!region.failed.test_and_set()) region.error = std::current_exception();
    }
  }
};

// body(worker) for worker in [0, workers), on that many threads of one parallel region (at most
// at::get_num_threads()); the first exception is rethrown here once all have finished.
template <typename Body>
void run_on_threads(int64_t workers, const Body& body) {
  if (workers <= 1 || !can_fork()) {
    OneThread one;
    for (int64_t w = 0; w < workers; ++w) body(w);
    return;
  }
  Region<Body> region{&body, workers, at::ThreadLocalState()};
  // Team size 0: the thread count ATen set (as ATen's own regions; see its note on GOMP's thread
  // pool and the num_threads clause); threads beyond `workers` return at once.
  GOMP_parallel(&Region<Body>::run, &region, 0, 0);
  if (region.error) std::rethrow_exception(region.error);
}

// task(k, worker) for k in [0, tasks), taken from a shared counter by `workers` threads: no
// thread waits for another until all tasks are done, and a thread the OS pauses (a busy
// machine) holds up at most the task it is on.
template <typename Task>
void run_tasks(int64_t tasks, int64_t workers, const Task& task) {
  std::atomic<int64_t> next{0};
  run_on_threads(std::min(workers, tasks), [&](int64_t worker) {
    for (int64_t k = next.fetch_add(1); k < tasks; k = next.fetch_add(1)) task(k, worker);
  });
}

}  // namespace cpu_threads
}  // namespace gpufit
