#include "thread_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#define DK_PAUSE() _mm_pause()
#else
#define DK_PAUSE() std::this_thread::yield()
#endif

namespace deploykit {
namespace {

// How long an idle worker spins before sleeping. Long enough to bridge the gap between two
// linears of one decode step, short enough not to steal a core from torch between layers.
constexpr auto kSpin = std::chrono::microseconds(100);

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int nthreads, const std::function<void(int, int)>& fn) {
    std::lock_guard<std::mutex> job_lock(job_mu_);  // one job at a time (callers from 2 threads)
    ensure_workers(nthreads - 1);
    fn_ = &fn;
    nthreads_ = nthreads;
    error_ = nullptr;
    // Every worker acknowledges every generation (idle ones just decrement), so no worker can
    // skip or repeat a job: the next job is published only after all have acknowledged.
    pending_.store(static_cast<int>(workers_.size()));
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    try {
      fn(0, nthreads);
    } catch (...) {
      std::lock_guard<std::mutex> lk(err_mu_);
      if (!error_) error_ = std::current_exception();
    }
    while (pending_.load(std::memory_order_acquire) != 0) DK_PAUSE();
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      int idx = static_cast<int>(workers_.size()) + 1;  // tid of this worker
      // The worker starts from the generation current now, before run() publishes the next
      // one; reading it inside the new thread could miss that job and deadlock.
      const unsigned long long g = gen_.load();
      workers_.emplace_back([this, idx, g] { loop(idx, g); });
    }
  }

  void loop(int tid, unsigned long long seen) {
    for (;;) {
      // Spin, then sleep, until a new generation is published.
      auto t0 = std::chrono::steady_clock::now();
      unsigned spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        DK_PAUSE();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - t0 > kSpin) {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return gen_.load() != seen; });
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_) return;
      if (tid < nthreads_) {
        try {
          (*fn_)(tid, nthreads_);
        } catch (...) {
          std::lock_guard<std::mutex> lk(err_mu_);
          if (!error_) error_ = std::current_exception();
        }
      }
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_mu_, mu_, err_mu_;
  std::condition_variable cv_;
  std::atomic<unsigned long long> gen_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int, int)>* fn_ = nullptr;
  int nthreads_ = 1;
  std::exception_ptr error_;
  bool stop_ = false;
};

thread_local bool tl_inside = false;

}  // namespace

void parallel_run(int nthreads, const std::function<void(int, int)>& fn) {
  if (nthreads <= 1 || tl_inside) {
    for (int t = 0; t < (nthreads < 1 ? 1 : nthreads); ++t) fn(t, nthreads < 1 ? 1 : nthreads);
    return;
  }
  // Leaked on purpose: joining threads during interpreter shutdown can deadlock.
  static Pool* pool = new Pool();
  tl_inside = true;
  try {
    pool->run(nthreads, fn);
  } catch (...) {
    tl_inside = false;
    throw;
  }
  tl_inside = false;
}

}  // namespace deploykit
