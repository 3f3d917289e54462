/* C ABI of libzopro_csrc.so (no libtorch). The Python side (zopro_kernels/native.py) loads it
 * lazily with ctypes, checks zopro_abi_version() == ZOPRO_ABI_VERSION, and passes raw pointers.
 *
 * Every entry point returns 0 on success, a negative ZOPRO_ERR_* for a bad argument, or a
 * positive cudaError_t; zopro_error_string() names any of them. Launches are asynchronous on
 * `stream` (a cudaStream_t; NULL = the legacy default stream) of CUDA device `device`.
 */
#ifndef ZOPRO_H_
#define ZOPRO_H_

#include <stdint.h>

#define ZOPRO_ABI_VERSION 2

/* zopro_zo_pass flags (the Triton kernel's constexpr switches, as bits). */
#define ZOPRO_APPLY 1            /* theta <- keep*src + scale*z                              */
#define ZOPRO_HAS_MASTER 2       /* src = fp32 master arena (else the model tensor itself)   */
#define ZOPRO_WRITE_MASTER 4     /* also store the result in the master arena                */
#define ZOPRO_HAS_POLICY 8       /* z includes a*policy_delta                                */
#define ZOPRO_HAS_REWARD 16      /* z includes c*reward_delta; the reduce's dot uses it      */
#define ZOPRO_REDUCE 32          /* write per-chunk partials (sum n^2, sum n*dR) of reduce_seed */
#define ZOPRO_REDUCE_SAME_SEED 64 /* reduce_seed == seed: reuse the noise                     */
#define ZOPRO_ALIGNED 128        /* tensor starts/ends and arena shifts multiples of 16, every base 16 B aligned */
#define ZOPRO_GUIDANCE_BF16 256  /* policy_delta/reward_delta arenas hold bf16 (else fp32)     */

/* Model dtypes. */
#define ZOPRO_FLOAT32 0
#define ZOPRO_BFLOAT16 1
#define ZOPRO_FLOAT16 2

/* Argument errors (negative; CUDA errors are positive). */
#define ZOPRO_ERR_BAD_DTYPE (-1)
#define ZOPRO_ERR_BAD_BLOCK (-2)
#define ZOPRO_ERR_BAD_SIZE (-3)
#define ZOPRO_ERR_NULL_POINTER (-4)
#define ZOPRO_ERR_NO_CUDA (-5)

#ifdef __cplusplus
extern "C" {
#endif

int32_t zopro_abi_version(void);
/* The CMake CUDA_ARCHITECTURES the library was built with, comma separated ("80-real,...,90"). */
const char* zopro_cuda_archs(void);
const char* zopro_error_string(int32_t code);
/* 0 if the kernels have an image (SASS or JIT-able PTX) for `device` and the driver can run
 * them; else the CUDA error (e.g. cudaErrorNoKernelImageForDevice, cudaErrorInsufficientDriver). */
int32_t zopro_check_device(int32_t device);

/* One ZO pass over a parameter set: one launch, one CTA per chunk row.
 * chunks [num_chunks, 4] int64 (tensor id, window start, lo, hi) in global indices, windows
 * aligned to `block` (a multiple of 16); per tensor t, int64: tensor_starts[t] (global index of
 * its first value), tensor_arena_shifts[t] (arena position of global index i is
 * i - tensor_arena_shifts[t]: a tensor may be one shard of a sharded parameter) and
 * tensor_addresses[t] (device address of the model tensor); coefs [T, 5] fp32 (a, b, c, scale,
 * keep); master fp32 arena; policy_delta/reward_delta arenas fp32, or bf16 with
 * ZOPRO_GUIDANCE_BF16; partials [num_chunks, 2] fp32
 * (sum n^2, sum n*dR of reduce_seed's noise). Pointers a pass does not use may be NULL. */
int32_t zopro_zo_pass(int32_t model_dtype, const int64_t* chunks, int64_t num_chunks,
                      int32_t block, const int64_t* tensor_starts,
                      const int64_t* tensor_arena_shifts, const int64_t* tensor_addresses, const float* coefs, float* master,
                      const void* policy_delta, const void* reward_delta, float* partials,
                      uint64_t seed, uint64_t reduce_seed, int32_t flags,
                      int32_t device, void* stream);

/* out[k] = noise(seed, start + k) for k < numel, fp32. */
int32_t zopro_noise(float* out, uint64_t seed, int64_t start, int64_t numel, int32_t device,
                    void* stream);

/* Host (CPU) executions of the same per-item code, on host memory: for tests without a GPU. */
int32_t zopro_zo_pass_host(int32_t model_dtype, const int64_t* chunks, int64_t num_chunks,
                           int32_t block, const int64_t* tensor_starts,
                           const int64_t* tensor_arena_shifts, const int64_t* tensor_addresses, const float* coefs, float* master,
                           const void* policy_delta, const void* reward_delta,
                           float* partials, uint64_t seed,
                           uint64_t reduce_seed, int32_t flags);
int32_t zopro_noise_host(float* out, uint64_t seed, int64_t start, int64_t numel);
/* out[4*k .. 4*k+3] = the four Philox4x32-10 words of counters[k]. */
int32_t zopro_philox_host(uint32_t* out, uint64_t seed, const int64_t* counters, int64_t n);

#ifdef __cplusplus
}
#endif

#endif /* ZOPRO_H_ */
