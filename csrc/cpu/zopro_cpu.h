/* C ABI of libzopro_cpu.so: the ZO passes compiled for the CPU (no libtorch, no CUDA).
 *
 * The same chunk table, tensor tables, coefficient table, pass flags and model dtype codes as
 * the CUDA library (../zopro.h), so one Python-side preparation serves both. The Python side
 * (zopro_kernels/native.py) loads it lazily with ctypes and checks
 * zopro_cpu_abi_version() == ZOPRO_CPU_ABI_VERSION.
 *
 * Noise: value(seed, i) of ../philox.cuh (Philox4x32-10 + Box-Muller, Triton's tl.randn4x),
 * with its own fp32 log/sin/cos (polynomials evaluated with explicit FMAs in a fixed order),
 * vectorised for AVX-512 and AVX2 and run as plain scalar code elsewhere. Every ISA path gives
 * the same bits: the ISA changes how many lanes run at once, never the per-value arithmetic nor
 * the summation order. Against the float64 definition the values agree to fp32 rounding (a few
 * ulp of log/sin/cos; see tests/test_cpu_backend.py).
 *
 * Reductions: each chunk row is processed by one thread; its sums accumulate in 16 fp32
 * accumulators (value of global index i into accumulator i % 16, in index order) combined by a
 * fixed tree; per-tensor sums add the chunk partials in chunk-row order in double. The result
 * depends on the chunk table (the block size), never on the thread count or the ISA.
 *
 * Every entry point returns 0 on success or a negative ZOPRO_ERR_* code; zopro_cpu_error_string
 * names it. Calls are synchronous and thread-safe (no global state but the chosen ISA).
 */
#ifndef ZOPRO_CPU_H_
#define ZOPRO_CPU_H_

#include <stdint.h>

#include "../zopro.h"

#define ZOPRO_CPU_ABI_VERSION 1

/* Errors beyond ../zopro.h's. */
#define ZOPRO_ERR_BAD_ISA (-16)   /* an ISA this library or CPU does not have               */
#define ZOPRO_ERR_BAD_TABLE (-17) /* a chunk row outside its window or naming no tensor      */
#define ZOPRO_ERR_INTERNAL (-18)  /* out of memory or another host failure                   */

#ifdef __cplusplus
extern "C" {
#endif

int32_t zopro_cpu_abi_version(void);
const char* zopro_cpu_error_string(int32_t code);
/* The ISA the passes run with now ("avx512", "avx2" or "scalar"). */
const char* zopro_cpu_isa(void);
/* The ISAs this CPU can run with this build, best first, comma separated ("avx512,avx2,scalar"). */
const char* zopro_cpu_isas(void);
/* Use ISA `name` (one of zopro_cpu_isas(); NULL or "" = the best). Process-wide. */
int32_t zopro_cpu_set_isa(const char* name);
/* Threads a call may use at most (1 when built without OpenMP). */
int32_t zopro_cpu_max_threads(void);

/* One ZO pass over a parameter set, with `threads` threads (<= 0: all of zopro_cpu_max_threads()).
 * Tables as zopro_zo_pass (../zopro.h), plus num_tensors (rows of tensor_starts etc.; every chunk's
 * tensor id must be below it) and two optional outputs of a reduce (ZOPRO_REDUCE): partials
 * [num_chunks, 2] fp32 per chunk row, and sums [num_tensors, 2] float64 per tensor (sum n^2,
 * sum n*dR of reduce_seed's noise). `block` must be a multiple of 64. ZOPRO_ALIGNED is ignored
 * (unaligned accesses cost nothing here). */
int32_t zopro_cpu_zo_pass(int32_t model_dtype, const int64_t* chunks, int64_t num_chunks,
                          int32_t block, const int64_t* tensor_starts,
                          const int64_t* tensor_arena_shifts, const int64_t* tensor_addresses,
                          const float* coefs, float* master, const void* policy_delta,
                          const void* reward_delta, float* partials, int64_t num_tensors,
                          double* sums, uint64_t seed, uint64_t reduce_seed, int32_t flags,
                          int32_t threads);

/* out[k] = noise(seed, start + k) for k < numel, fp32. */
int32_t zopro_cpu_noise(float* out, uint64_t seed, int64_t start, int64_t numel, int32_t threads);

/* out[4*k .. 4*k+3] = the four Philox4x32-10 words of counters[k] (scalar, ../philox.cuh). */
int32_t zopro_cpu_philox(uint32_t* out, uint64_t seed, const int64_t* counters, int64_t n);

#ifdef __cplusplus
}
#endif

#endif /* ZOPRO_CPU_H_ */
