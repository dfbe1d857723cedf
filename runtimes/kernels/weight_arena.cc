// Copies of constant weights in 2 MB pages, for kernels that stream their weights every call
// (QGemv: a decode step reads every weight once).
//
// onnxruntime maps external-data initializers straight from the file, in 4 KB pages, one
// mapping per tensor. Streaming SmolLM2's ~96 MB of int4 weights then walks ~24,000 pages per
// decode step, and in a virtual machine each TLB miss is a two-level page walk: with the same
// weights in transparent huge pages the products run ~20% faster (measured on this 2-core VM,
// 6.9 -> 5.5 ms per step's worth). Those pages cannot be collapsed in place (file-backed
// private mappings), so each kernel copies its weight once, at session load, into anonymous
// memory advised MADV_HUGEPAGE before it is touched. Copies are carved one after another out
// of 64 MB chunks, so small matrices share huge pages; a chunk is unmapped when the last
// kernel using it is destroyed. The file pages onnxruntime mapped stay clean page cache that
// the kernel may reclaim. Without transparent huge pages (sysfs "never", or not Linux) no copy
// is made and the kernel reads onnxruntime's buffer.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

constexpr size_t kHuge = size_t{2} << 20;
constexpr size_t kChunk = size_t{64} << 20;
constexpr size_t kAlign = 64;

struct Chunk {
  uint8_t* base;
  size_t size, used;
  int users;
};

std::mutex g_mutex;
std::vector<Chunk> g_chunks;  // the last one takes new copies

bool huge_pages_available() {
#ifdef __linux__
  static const bool available = [] {
    FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (f == nullptr) return false;
    char line[128] = {};
    const bool ok = std::fgets(line, sizeof line, f) != nullptr &&
                    std::strstr(line, "[never]") == nullptr;
    std::fclose(f);
    return ok;
  }();
  return available;
#else
  return false;
#endif
}

#ifdef __linux__
uint8_t* map_chunk(size_t size) {
  // over-allocate by one huge page to start on a 2 MB boundary, then advise before touching
  void* p = mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                 -1, 0);
  if (p == MAP_FAILED) return nullptr;
  const uintptr_t raw = reinterpret_cast<uintptr_t>(p);
  const uintptr_t base = (raw + kHuge - 1) & ~(kHuge - 1);
  if (base > raw) munmap(p, base - raw);
  munmap(reinterpret_cast<void*>(base + size), raw + kHuge - base);
  madvise(reinterpret_cast<void*>(base), size, MADV_HUGEPAGE);
  return reinterpret_cast<uint8_t*>(base);
}
#endif

}  // namespace

// A copy of `bytes` bytes at `src` in huge pages, or nullptr (no transparent huge pages, or
// no memory): the caller then reads `src`. Give it back with flagc_arena_release.
const uint8_t* flagc_arena_copy(const uint8_t* src, size_t bytes) {
#ifdef __linux__
  if (!huge_pages_available() || bytes == 0) return nullptr;
  std::lock_guard<std::mutex> lock(g_mutex);
  const size_t need = (bytes + kAlign - 1) & ~(kAlign - 1);
  if (g_chunks.empty() || g_chunks.back().used + need > g_chunks.back().size) {
    const size_t size = need > kChunk ? (need + kHuge - 1) & ~(kHuge - 1) : kChunk;
    uint8_t* base = map_chunk(size);
    if (base == nullptr) return nullptr;
    g_chunks.push_back({base, size, 0, 0});
  }
  Chunk& c = g_chunks.back();
  uint8_t* dst = c.base + c.used;
  std::memcpy(dst, src, bytes);
  c.used += need;
  ++c.users;
  return dst;
#else
  (void)src;
  (void)bytes;
  return nullptr;
#endif
}

void flagc_arena_release(const uint8_t* copy) {
#ifdef __linux__
  if (copy == nullptr) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  for (size_t i = 0; i < g_chunks.size(); ++i) {
    Chunk& c = g_chunks[i];
    if (copy < c.base || copy >= c.base + c.size) continue;
    if (--c.users == 0) {
      munmap(c.base, c.size);
      g_chunks.erase(g_chunks.begin() + static_cast<std::ptrdiff_t>(i));
    }
    return;
  }
#else
  (void)copy;
#endif
}
