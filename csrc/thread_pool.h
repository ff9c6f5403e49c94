// A tiny persistent thread pool. Own pool (not OpenMP) because torch ships its own libgomp:
// two OpenMP runtimes in one process would each keep spinning threads on our 2 cores.
#pragma once
#include <functional>

namespace deploykit {

// Runs fn(tid, nthreads) for tid in [0, nthreads) and returns when all are done. The calling
// thread runs tid 0. Workers spin briefly after a job (decode calls kernels back to back) and
// then sleep. Not reentrant: a nested call runs serially on the caller.
void parallel_run(int nthreads, const std::function<void(int, int)>& fn);

// Split [0, n) into nthreads near-equal contiguous chunks; returns chunk tid.
inline void split_range(long long n, int tid, int nthreads, long long& b, long long& e) {
  long long q = n / nthreads, r = n % nthreads;
  b = tid * q + (tid < r ? tid : r);
  e = b + q + (tid < r ? 1 : 0);
}

}  // namespace deploykit
