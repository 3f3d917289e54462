// The C ABI of libzopro_cpu.so (zopro_cpu.h): argument checks, the ISA choice, and the threads.
//
// Threads: an OpenMP team of `threads` (the caller passes torch.get_num_threads()) takes chunk
// rows from a shared counter, a few at a time; each row is processed by one thread from start to
// end and writes its own partial sums, so what a thread computes never depends on which thread
// it is or how many there are. The per-tensor sums are then added on the calling thread, in row
// order. Each thread of the team runs with the caller's floating-point control word (MXCSR: a
// torch.set_flush_denormal(True) caller gets the same results from every thread).
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(ZOPRO_CPU_X86)
#include <xmmintrin.h>
#endif

#include "../philox.cuh"
#include "kernels.h"
#include "zopro_cpu.h"

#define ZOPRO_CPU_EXPORT extern "C" __attribute__((visibility("default")))

namespace zopro_cpu {
namespace {

// Below this many values a pass or a noise fill runs on the calling thread alone (waking a team
// costs more than it saves).
constexpr int64_t kSerialValues = 1 << 15;
// Values a thread takes from the shared counter at a time.
constexpr int64_t kGrabValues = 1 << 14;

struct IsaList {
  const Kernels* all[3];
  int count = 0;
  std::string names;
};

const IsaList& isa_list() {
  static const IsaList list = [] {
    IsaList l;
#if defined(ZOPRO_CPU_X86)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f")) l.all[l.count++] = kernels_avx512();
    if (avx2) l.all[l.count++] = kernels_avx2();
#endif
    l.all[l.count++] = kernels_scalar();
    for (int i = 0; i < l.count; ++i) {
      if (i) l.names += ",";
      l.names += l.all[i]->name;
    }
    return l;
  }();
  return list;
}

std::atomic<const Kernels*> g_active{nullptr};

const Kernels* active() {
  const Kernels* k = g_active.load(std::memory_order_acquire);
  if (!k) {
    k = isa_list().all[0];
    g_active.store(k, std::memory_order_release);
  }
  return k;
}

int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// fn(i) for i in [0, n), grabbed `grab` at a time by a team of up to `threads` threads.
template <class Fn>
void parallel_for(int64_t n, int64_t grab, int threads, Fn&& fn) {
  int team = threads <= 0 ? max_threads() : threads;
  const int64_t grabs = (n + grab - 1) / grab;
  if (grabs < team) team = static_cast<int>(grabs);
#if defined(_OPENMP)
  if (team > 1) {
    std::atomic<int64_t> next{0};
#if defined(ZOPRO_CPU_X86)
    const unsigned caller_csr = _mm_getcsr();
#endif
#pragma omp parallel num_threads(team)
    {
#if defined(ZOPRO_CPU_X86)
      const unsigned own_csr = _mm_getcsr();
      _mm_setcsr(caller_csr);
#endif
      for (;;) {
        const int64_t begin = next.fetch_add(grab, std::memory_order_relaxed);
        if (begin >= n) break;
        const int64_t end = begin + grab < n ? begin + grab : n;
        for (int64_t i = begin; i < end; ++i) fn(i);
      }
#if defined(ZOPRO_CPU_X86)
      _mm_setcsr(own_csr);
#endif
    }
    return;
  }
#endif
  (void)team;
  for (int64_t i = 0; i < n; ++i) fn(i);
}

int32_t check_args(int32_t model_dtype, const int64_t* chunks, int64_t num_chunks, int32_t block,
                   const int64_t* tensor_starts, const int64_t* arena_shifts,
                   const int64_t* tensor_addresses, const float* coefs, const float* master,
                   const void* policy, const void* reward, int64_t num_tensors, int32_t flags,
                   int64_t* values) {
  if (model_dtype < ZOPRO_FLOAT32 || model_dtype > ZOPRO_FLOAT16) return ZOPRO_ERR_BAD_DTYPE;
  if (block < 64 || block % 64 != 0) return ZOPRO_ERR_BAD_BLOCK;
  if (num_chunks < 0 || num_tensors < 0) return ZOPRO_ERR_BAD_SIZE;
  if (num_chunks > 0 && (!chunks || !arena_shifts)) return ZOPRO_ERR_NULL_POINTER;
  if ((flags & ZOPRO_APPLY) && num_chunks > 0 && (!coefs || !tensor_starts || !tensor_addresses))
    return ZOPRO_ERR_NULL_POINTER;
  if ((flags & ZOPRO_HAS_MASTER) && !master) return ZOPRO_ERR_NULL_POINTER;
  if ((flags & ZOPRO_HAS_POLICY) && !policy) return ZOPRO_ERR_NULL_POINTER;
  if ((flags & ZOPRO_HAS_REWARD) && !reward) return ZOPRO_ERR_NULL_POINTER;
  int64_t total = 0;
  for (int64_t row = 0; row < num_chunks; ++row) {
    const int64_t* c = chunks + 4 * row;
    const int64_t tensor = c[0], window = c[1], lo = c[2], hi = c[3];
    if (tensor < 0 || tensor >= num_tensors || window < 0 || window % block != 0 || lo < window ||
        hi < lo || hi > window + block)
      return ZOPRO_ERR_BAD_TABLE;
    total += hi - lo;
  }
  *values = total;
  return 0;
}

}  // namespace
}  // namespace zopro_cpu

using namespace zopro_cpu;

ZOPRO_CPU_EXPORT int32_t zopro_cpu_abi_version() { return ZOPRO_CPU_ABI_VERSION; }

ZOPRO_CPU_EXPORT const char* zopro_cpu_isa() { return active()->name; }

ZOPRO_CPU_EXPORT const char* zopro_cpu_isas() { return isa_list().names.c_str(); }

ZOPRO_CPU_EXPORT int32_t zopro_cpu_set_isa(const char* name) {
  const IsaList& list = isa_list();
  if (!name || !*name) {
    g_active.store(list.all[0], std::memory_order_release);
    return 0;
  }
  for (int i = 0; i < list.count; ++i) {
    if (std::strcmp(list.all[i]->name, name) == 0) {
      g_active.store(list.all[i], std::memory_order_release);
      return 0;
    }
  }
  return ZOPRO_ERR_BAD_ISA;
}

ZOPRO_CPU_EXPORT int32_t zopro_cpu_max_threads() {
#if defined(_OPENMP)
  return omp_get_num_procs();
#else
  return 1;
#endif
}

ZOPRO_CPU_EXPORT int32_t zopro_cpu_zo_pass(int32_t model_dtype, const int64_t* chunks,
                                           int64_t num_chunks, int32_t block,
                                           const int64_t* tensor_starts,
                                           const int64_t* tensor_arena_shifts,
                                           const int64_t* tensor_addresses, const float* coefs,
                                           float* master, const void* policy_delta,
                                           const void* reward_delta, float* partials,
                                           int64_t num_tensors, double* sums, uint64_t seed,
                                           uint64_t reduce_seed, int32_t flags, int32_t threads) {
  int64_t values = 0;
  if (const int32_t bad = check_args(model_dtype, chunks, num_chunks, block, tensor_starts,
                                     tensor_arena_shifts, tensor_addresses, coefs, master,
                                     policy_delta, reward_delta, num_tensors, flags, &values))
    return bad;
  const bool apply = flags & ZOPRO_APPLY, reduce = flags & ZOPRO_REDUCE;
  if (sums && reduce) std::memset(sums, 0, sizeof(double) * 2 * num_tensors);
  if (num_chunks == 0 || !(apply || reduce)) return 0;
  try {
    std::vector<float> own;
    float* part = partials;
    if (reduce && !part) {
      own.resize(2 * num_chunks);
      part = own.data();
    }
    const PassArgs args{chunks, tensor_starts, tensor_arena_shifts, tensor_addresses, coefs, master,
                        policy_delta, reward_delta, seed, reduce_seed, flags};
    const int mode = apply && reduce ? kApplyReduce : (apply ? kApply : kReduce);
    const ChunkFn fn = active()->chunk[model_dtype][mode][(flags & ZOPRO_GUIDANCE_BF16) ? 1 : 0];
    const int64_t grab = kGrabValues / block > 0 ? kGrabValues / block : 1;
    const int team = values < kSerialValues ? 1 : threads;
    parallel_for(num_chunks, grab, team, [&](int64_t row) { fn(args, row, part ? part + 2 * row : nullptr); });
    if (sums && reduce) {
      for (int64_t row = 0; row < num_chunks; ++row) {
        const int64_t t = chunks[4 * row];
        sums[2 * t] += static_cast<double>(part[2 * row]);
        sums[2 * t + 1] += static_cast<double>(part[2 * row + 1]);
      }
    }
  } catch (...) {
    return ZOPRO_ERR_INTERNAL;
  }
  return 0;
}

ZOPRO_CPU_EXPORT int32_t zopro_cpu_noise(float* out, uint64_t seed, int64_t start, int64_t numel,
                                         int32_t threads) {
  if (start < 0 || numel < 0) return ZOPRO_ERR_BAD_SIZE;
  if (numel == 0) return 0;
  if (!out) return ZOPRO_ERR_NULL_POINTER;
  const NoiseFn fill = active()->noise;
  // Pieces of kGrabValues global indices, aligned to kGrabValues (a multiple of every group).
  const int64_t first = start / kGrabValues, last = (start + numel - 1) / kGrabValues;
  const int team = numel < kSerialValues ? 1 : threads;
  parallel_for(last - first + 1, 1, team, [&](int64_t piece) {
    int64_t a = (first + piece) * kGrabValues, b = a + kGrabValues;
    if (a < start) a = start;
    if (b > start + numel) b = start + numel;
    fill(out + (a - start), seed, a, b - a);
  });
  return 0;
}

ZOPRO_CPU_EXPORT int32_t zopro_cpu_philox(uint32_t* out, uint64_t seed, const int64_t* counters,
                                          int64_t n) {
  if (n < 0) return ZOPRO_ERR_BAD_SIZE;
  if (n > 0 && (!out || !counters)) return ZOPRO_ERR_NULL_POINTER;
  for (int64_t k = 0; k < n; ++k) {
    const zopro::Words4 w = zopro::philox4x32_10(seed, static_cast<uint64_t>(counters[k]));
    out[4 * k] = w.x;
    out[4 * k + 1] = w.y;
    out[4 * k + 2] = w.z;
    out[4 * k + 3] = w.w;
  }
  return 0;
}

ZOPRO_CPU_EXPORT const char* zopro_cpu_error_string(int32_t code) {
  switch (code) {
    case 0: return "no error";
    case ZOPRO_ERR_BAD_DTYPE: return "unsupported model dtype (fp32, bf16, fp16)";
    case ZOPRO_ERR_BAD_BLOCK: return "block must be a positive multiple of 64";
    case ZOPRO_ERR_BAD_SIZE: return "size out of range (numel, start, chunk and tensor counts >= 0)";
    case ZOPRO_ERR_NULL_POINTER: return "a pointer the flags require is NULL";
    case ZOPRO_ERR_BAD_ISA: return "unknown ISA, or one this CPU lacks (see zopro_cpu_isas())";
    case ZOPRO_ERR_BAD_TABLE: return "a chunk row is outside its window or names no tensor";
    case ZOPRO_ERR_INTERNAL: return "host failure (out of memory)";
    default: return "unknown error";
  }
}
