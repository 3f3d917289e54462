// What the ISA translation units (kernels_<isa>.cpp) and the dispatcher (zo_pass_cpu.cpp) share:
// plain types and the per-ISA function tables. No inline functions: the ISA units are compiled
// with different -m flags, and an inline function emitted by two of them could be merged by the
// linker into the copy compiled for the widest ISA.
#pragma once

#include <cstdint>

namespace zopro_cpu {

// One pass's arguments (the C ABI's, gathered).
struct PassArgs {
  const int64_t* chunks;  // [num_chunks, 4]: tensor, window, lo, hi (global indices)
  const int64_t* tensor_starts;
  const int64_t* arena_shifts;
  const int64_t* tensor_addresses;
  const float* coefs;  // [T, 5]: a, b, c, scale, keep
  float* master;
  const void* policy;  // fp32, or bf16 with ZOPRO_GUIDANCE_BF16
  const void* reward;
  uint64_t seed;
  uint64_t reduce_seed;
  int32_t flags;
};

// Processes chunk row `row`; with a reduce, writes its (sum n^2, sum n*dR) to partial[0..1].
using ChunkFn = void (*)(const PassArgs& args, int64_t row, float* partial);
// out[k] = noise(seed, start + k), k < numel (one thread).
using NoiseFn = void (*)(float* out, uint64_t seed, int64_t start, int64_t numel);

enum Mode { kApply = 0, kApplyReduce = 1, kReduce = 2 };

struct Kernels {
  const char* name;
  int group;                  // values per group: 4 x lanes
  ChunkFn chunk[3][3][2];     // [model dtype][Mode][guidance bf16]
  NoiseFn noise;
};

const Kernels* kernels_scalar();
#if defined(ZOPRO_CPU_X86)
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();
#endif

}  // namespace zopro_cpu
