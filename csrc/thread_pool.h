// A tiny persistent thread pool. Own pool (not OpenMP) because torch ships its own libgomp:
// two OpenMP runtimes in one process would each keep spinning threads on our 2 cores.
#pragma once

namespace deploykit {

// Runs fn(c) for every chunk c in [0, n_chunks) on up to nthreads threads (the caller is one of
// them) and returns when all chunks are done. Chunks are handed out dynamically: if a worker is
// descheduled (a shared, oversubscribed machine), the others take its chunks instead of
// waiting for it, and the caller never waits for a worker that has not started a chunk.
// Not reentrant: a nested call runs serially on the caller.
// No allocation per call: fn is passed by address (no std::function), and the pool reuses its
// job records, so the engine's decode steps allocate nothing.
using ChunkCall = void (*)(const void* ctx, long long chunk);
void parallel_chunks_raw(int nthreads, long long n_chunks, ChunkCall call, const void* ctx);

template <class Fn>
inline void parallel_chunks(int nthreads, long long n_chunks, const Fn& fn) {
  parallel_chunks_raw(nthreads, n_chunks,
                      [](const void* c, long long i) { (*static_cast<const Fn*>(c))(i); }, &fn);
}

// Split [0, n) into parts near-equal contiguous chunks; returns chunk i.
inline void split_range(long long n, long long i, long long parts, long long& b, long long& e) {
  long long q = n / parts, r = n % parts;
  b = i * q + (i < r ? i : r);
  e = b + q + (i < r ? 1 : 0);
}

}  // namespace deploykit
