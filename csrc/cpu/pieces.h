// How a parallel pass hands its pieces of work to the threads (StealingRuns): each thread owns one
// contiguous run of the pieces and takes it front to back, in address order; a thread whose run is
// done takes the other runs' pieces from their backs. No torch headers.
//
// Owned runs give a thread the same memory in every pass over the same pieces, so the scale pass of
// a clip finds in the thread's own caches what its norm pass read (see aten_parallel_for in
// fastclip_ops.cpp). Fixed halves, as at::parallel_for splits, would do that too, but on a shared
// machine a pass then lasts as long as the slower core's half; stealing from the back of another run
// keeps every thread busy to the end and leaves the front, where the owner is, undisturbed
// (16 x 4 MiB fp32 clip, AMD EPYC, two threads: 2.52-2.72 ms with fixed halves, 2.32-2.53 so).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace fastclip::cpu {

class StealingRuns {
 public:
  // Pieces [0, pieces) in `runs` contiguous runs of nearly equal length. pieces < 2^32 (a piece is
  // at least one chunk of a tensor).
  StealingRuns(int64_t pieces, int runs) : runs_(runs), bounds_(new Bounds[runs]) {
    for (int r = 0; r < runs; ++r) set(r, pieces * r / runs, pieces * (r + 1) / runs);
  }
  // Run r is pieces [starts[r], starts[r + 1]), for r < runs (starts ascending, the last < 2^32).
  StealingRuns(const int64_t* starts, int runs) : runs_(runs), bounds_(new Bounds[runs]) {
    for (int r = 0; r < runs; ++r) set(r, starts[r], starts[r + 1]);
  }

  // Calls take(piece) for every piece that thread `run` gets: its own run's, front to back, then
  // pieces taken from the backs of the other runs. Each piece goes to exactly one caller.
  template <class Take>
  void work(int run, const Take& take) {
    for (int64_t piece; (piece = claim(bounds_[run], /*from_front=*/true)) >= 0;) take(piece);
    for (int k = 1; k < runs_; ++k) {
      Bounds& other = bounds_[(run + k) % runs_];
      for (int64_t piece; (piece = claim(other, /*from_front=*/false)) >= 0;) take(piece);
    }
  }

 private:
  struct alignas(64) Bounds {  // a line each: the owner's claims do not disturb another run's
    std::atomic<uint64_t> packed;  // front in the low 32 bits, back (exclusive) in the high ones
  };
  static uint64_t pack(uint32_t front, uint32_t back) { return (static_cast<uint64_t>(back) << 32) | front; }
  void set(int run, int64_t front, int64_t back) {
    bounds_[run].packed.store(pack(static_cast<uint32_t>(front), static_cast<uint32_t>(back)), std::memory_order_relaxed);
  }

  // The run's first (or last) piece, or -1 if it has none left.
  static int64_t claim(Bounds& bounds, bool from_front) {
    uint64_t packed = bounds.packed.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t front = static_cast<uint32_t>(packed), back = static_cast<uint32_t>(packed >> 32);
      if (front >= back) return -1;
      const uint64_t next = from_front ? pack(front + 1, back) : pack(front, back - 1);
      if (bounds.packed.compare_exchange_weak(packed, next, std::memory_order_relaxed)) return from_front ? front : back - 1;
    }
  }

  int runs_;
  std::unique_ptr<Bounds[]> bounds_;
};

}  // namespace fastclip::cpu
