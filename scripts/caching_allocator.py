"""A caching CPU allocator for the benchmark's "what fresh memory costs" rows; not part of the package.

PyTorch's CPU allocator hands every freed block back to the C library, which unmaps the large ones;
where the kernel reports free memory to a hypervisor (this project's development VM), memory taken
again is backed again, page fault by page fault. This allocator keeps freed blocks of 1 MB and
more in exact-size bins and hands them out again, up to ``cap_gb`` held free (the rest is freed as
usual). It is native code built at first use with ``torch.utils.cpp_extension.load_inline`` (a C++
compiler is needed) and replaces the allocator of the whole process: for measurements only.
"""

from __future__ import annotations

_SOURCE = r"""
#include <torch/extension.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {
std::mutex mu;
std::unordered_map<size_t, std::vector<void*>> bins;  // freed blocks by exact size
std::unordered_map<void*, size_t> live;                // blocks handed out that may be kept
size_t held = 0, cap = 0;
const size_t kMin = 1 << 20;

void release(void* p) {
  {
    std::lock_guard<std::mutex> g(mu);
    auto it = live.find(p);
    if (it != live.end()) {
      size_t n = it->second;
      live.erase(it);
      if (held + n <= cap) {
        bins[n].push_back(p);
        held += n;
        return;
      }
    }
  }
  c10::free_cpu(p);
}

struct Caching final : at::Allocator {
  at::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    if (n < kMin) {
      p = c10::alloc_cpu(n);
    } else {
      std::lock_guard<std::mutex> g(mu);
      auto it = bins.find(n);
      if (it != bins.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        held -= n;
      } else {
        p = c10::alloc_cpu(n);
      }
      live[p] = n;
    }
    // the context must be the data pointer itself: oneDNN asserts a "simple" data pointer
    return {p, p, &release, at::Device(at::DeviceType::CPU)};
  }
  at::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};
Caching allocator;
}  // namespace

void enable(int64_t cap_bytes) {
  {
    std::lock_guard<std::mutex> g(mu);
    cap = static_cast<size_t>(cap_bytes);
  }
  c10::SetCPUAllocator(&allocator, /*priority=*/100);
}
"""


def enable(cap_gb: float = float("inf")) -> None:
    """Build (first time only) and install the caching allocator for this process."""
    from torch.utils.cpp_extension import load_inline

    ext = load_inline("mgrad_bench_caching_allocator", cpp_sources=_SOURCE, functions=["enable"], extra_cflags=["-O2"])
    ext.enable(int(min(cap_gb * 2**30, 2**62)))
