#include "thread_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
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

// One parallel call. Shared-owned: a worker that wakes late still holds a valid Job, finds no
// chunk left and never touches fn (which lives on the caller's stack).
struct Job {
  ChunkCall call = nullptr;
  const void* ctx = nullptr;
  long long total = 0;
  int max_workers = 0;  // workers with index < max_workers take part
  std::atomic<long long> next{0}, done{0};
  std::mutex err_mu;
  std::exception_ptr error;

  void work() {
    for (;;) {
      const long long c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= total) return;
      try {
        call(ctx, c);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_mu);
        if (!error) error = std::current_exception();
      }
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

class Pool {
 public:
  void run(int nthreads, long long n_chunks, ChunkCall call, const void* ctx) {
    std::lock_guard<std::mutex> job_lock(job_mu_);  // one job at a time (callers from 2 threads)
    std::shared_ptr<Job> job = reusable_job();
    job->call = call;
    job->ctx = ctx;
    job->total = n_chunks;
    job->max_workers = nthreads - 1;
    ensure_workers(nthreads - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = job;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job->work();
    // Wait only for chunks that other threads have started.
    unsigned spins = 0;
    while (job->done.load(std::memory_order_acquire) != job->total) {
      if (++spins < 4096) DK_PAUSE(); else std::this_thread::yield();
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  // A finished job nobody holds any more (only this list: not job_, no worker), reset; else a
  // new one. Workers take jobs only from job_ under mu_, so a count of 1 cannot rise under us.
  std::shared_ptr<Job> reusable_job() {
    for (auto& j : spare_) {
      if (j != job_ && j.use_count() == 1) {
        j->next.store(0);
        j->done.store(0);
        j->error = nullptr;
        return j;
      }
    }
    spare_.push_back(std::make_shared<Job>());
    return spare_.back();
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      const int idx = static_cast<int>(workers_.size());
      const unsigned long long g = gen_.load();  // start from the generation current now
      workers_.emplace_back([this, idx, g] { loop(idx, g); });
      workers_.back().detach();  // the pool lives for the whole process
    }
  }

  void loop(int idx, unsigned long long seen) {
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      unsigned spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        DK_PAUSE();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - t0 > kSpin) {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return gen_.load() != seen; });
        }
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lk(mu_);
        seen = gen_.load();
        job = job_;
      }
      if (job && idx < job->max_workers) job->work();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<unsigned long long> gen_{0};
  std::shared_ptr<Job> job_;
  std::vector<std::shared_ptr<Job>> spare_;  // guarded by job_mu_
};

thread_local bool tl_inside = false;

}  // namespace

void parallel_chunks_raw(int nthreads, long long n_chunks, ChunkCall call, const void* ctx) {
  if (n_chunks <= 0) return;
  if (nthreads <= 1 || n_chunks == 1 || tl_inside) {
    for (long long c = 0; c < n_chunks; ++c) call(ctx, c);
    return;
  }
  static Pool* pool = new Pool();  // leaked on purpose: no joins during interpreter shutdown
  tl_inside = true;
  try {
    pool->run(nthreads, n_chunks, call, ctx);
  } catch (...) {
    tl_inside = false;
    throw;
  }
  tl_inside = false;
}

}  // namespace deploykit
