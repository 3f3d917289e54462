// The one ZO pass kernel (reduce / perturb / update + fused next reduce), one launch over all
// tensors of a parameter set. One CTA per chunk row of the chunk table (a window of `block`
// global indices clipped to one tensor: the same table as the Triton kernel, so the per-chunk
// partials are summed per tensor by the same gather on the Python side). Each thread takes items
// of 8 consecutive indices, strided by the CTA: two Philox calls per item, 16-byte loads/stores
// where the set is aligned. The reduce writes one (sum n^2, sum n*dR) row per chunk, reduced in
// a fixed order (warp shuffles, then one warp): deterministic, no atomics.
#include <cuda_runtime.h>

#include "device_guard.cuh"
#include "zo_pass.cuh"
#include "zopro.h"

#define ZOPRO_EXPORT extern "C" __attribute__((visibility("default")))

namespace zopro {

constexpr int kThreads = 256;
// >= 3 CTAs of 256 threads per SM (<= 85 registers, no spills), each thread with two
// items (2 x 48-96 B of loads) in flight. To tune with ncu on the H100.
constexpr int kMinBlocksPerSM = 3;

__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float shared_a[kThreads / 32], shared_b[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xFFFFFFFFu, a, offset);
    b += __shfl_xor_sync(0xFFFFFFFFu, b, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_a[warp] = a;
    shared_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? shared_a[lane] : 0.0f;
    b = lane < kThreads / 32 ? shared_b[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      a += __shfl_xor_sync(0xFFFFFFFFu, a, offset);
      b += __shfl_xor_sync(0xFFFFFFFFu, b, offset);
    }
  }
}

template <class T, bool APPLY, bool REDUCE>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) zo_pass_kernel(const PassParams p) {
  const int64_t row = blockIdx.x;
  const Chunk ch = load_chunk(p, row);
  const TensorArgs t = load_tensor_args<APPLY>(p, ch.tensor);
  float sum_sq = 0.0f, sum_dot = 0.0f;
  for (int64_t item = first_item(ch) + int64_t(threadIdx.x) * kItem; item < ch.hi;
       item += int64_t(kThreads) * kItem) {
    process_item<T, APPLY, REDUCE>(p, ch, t, item, sum_sq, sum_dot);
  }
  if constexpr (REDUCE) {
    block_sum2(sum_sq, sum_dot);
    if (threadIdx.x == 0) {
      p.partials[2 * row] = sum_sq;
      p.partials[2 * row + 1] = sum_dot;
    }
  }
}

// A kernel whose attributes tell whether this build has an image for the current device.
__global__ void probe_kernel() {}

template <class T, bool APPLY, bool REDUCE>
void host_pass(const PassParams& p, int64_t num_chunks) {
  for (int64_t row = 0; row < num_chunks; ++row) {
    const Chunk ch = load_chunk(p, row);
    const TensorArgs t = load_tensor_args<APPLY>(p, ch.tensor);
    float sum_sq = 0.0f, sum_dot = 0.0f;
    for (int64_t item = first_item(ch); item < ch.hi; item += kItem) {
      process_item<T, APPLY, REDUCE>(p, ch, t, item, sum_sq, sum_dot);
    }
    if (REDUCE) {
      p.partials[2 * row] = sum_sq;
      p.partials[2 * row + 1] = sum_dot;
    }
  }
}

int32_t check_pass_args(int32_t model_dtype, const PassParams& p, int64_t num_chunks) {
  if (model_dtype < ZOPRO_FLOAT32 || model_dtype > ZOPRO_FLOAT16) return ZOPRO_ERR_BAD_DTYPE;
  if (p.block < kItem || p.block % 16 != 0) return ZOPRO_ERR_BAD_BLOCK;
  if (num_chunks < 0 || num_chunks > 0x7FFFFFFF) return ZOPRO_ERR_BAD_SIZE;
  if (num_chunks > 0 && (!p.chunks || !p.arena_shifts)) return ZOPRO_ERR_NULL_POINTER;
  const int32_t f = p.flags;
  if ((f & ZOPRO_APPLY) && (!p.coefs || !p.tensor_starts || !p.tensor_addresses))
    return ZOPRO_ERR_NULL_POINTER;
  if ((f & ZOPRO_HAS_MASTER) && !p.master) return ZOPRO_ERR_NULL_POINTER;
  if ((f & ZOPRO_HAS_POLICY) && !p.policy) return ZOPRO_ERR_NULL_POINTER;
  if ((f & ZOPRO_HAS_REWARD) && !p.reward) return ZOPRO_ERR_NULL_POINTER;
  if ((f & ZOPRO_REDUCE) && !p.partials) return ZOPRO_ERR_NULL_POINTER;
  return 0;
}

// Picks the instantiation: the model dtype and whether the pass applies and/or reduces are
// template parameters (they decide the Philox work); the other switches are uniform branches.
template <template <class, bool, bool> class Run, class... Args>
void dispatch(int32_t model_dtype, int32_t flags, Args&&... args) {
  const bool apply = flags & ZOPRO_APPLY, reduce = flags & ZOPRO_REDUCE;
  auto by_dtype = [&](auto tag) {
    using T = decltype(tag);
    if (apply && reduce) Run<T, true, true>::run(args...);
    else if (apply) Run<T, true, false>::run(args...);
    else if (reduce) Run<float, false, true>::run(args...);  // the reduce reads no model tensor
  };
  if (model_dtype == ZOPRO_FLOAT32) by_dtype(float{});
  else if (model_dtype == ZOPRO_BFLOAT16) by_dtype(__nv_bfloat16{});
  else by_dtype(__half{});
}

template <class T, bool APPLY, bool REDUCE>
struct LaunchPass {
  static void run(const PassParams& p, int64_t num_chunks, cudaStream_t stream) {
    zo_pass_kernel<T, APPLY, REDUCE>
        <<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(p);
  }
};

template <class T, bool APPLY, bool REDUCE>
struct HostPass {
  static void run(const PassParams& p, int64_t num_chunks) { host_pass<T, APPLY, REDUCE>(p, num_chunks); }
};

PassParams make_params(const int64_t* chunks, int32_t block, const int64_t* tensor_starts,
                       const int64_t* tensor_arena_shifts, const int64_t* tensor_addresses, const float* coefs, float* master,
                       const void* policy_delta, const void* reward_delta, float* partials,
                       uint64_t seed, uint64_t reduce_seed, int32_t flags) {
  return {chunks,   tensor_starts, tensor_arena_shifts, tensor_addresses, coefs, master, policy_delta,
          reward_delta, partials, seed, reduce_seed, flags, block};
}

}  // namespace zopro

using namespace zopro;

ZOPRO_EXPORT int32_t zopro_zo_pass(int32_t model_dtype, const int64_t* chunks, int64_t num_chunks,
                                   int32_t block, const int64_t* tensor_starts,
                                   const int64_t* tensor_arena_shifts,
                                   const int64_t* tensor_addresses, const float* coefs,
                                   float* master, const void* policy_delta,
                                   const void* reward_delta, float* partials,
                                   uint64_t seed, uint64_t reduce_seed,
                                   int32_t flags, int32_t device, void* stream) {
  const PassParams p = make_params(chunks, block, tensor_starts, tensor_arena_shifts,
                                   tensor_addresses, coefs, master, policy_delta, reward_delta,
                                   partials, seed, reduce_seed, flags);
  if (const int32_t bad = check_pass_args(model_dtype, p, num_chunks)) return bad;
  if (num_chunks == 0 || !(flags & (ZOPRO_APPLY | ZOPRO_REDUCE))) return 0;
  const DeviceGuard guard(device);  // the caller's current device is restored on return
  if (guard.error() != cudaSuccess) return guard.error();
  dispatch<LaunchPass>(model_dtype, flags, p, num_chunks, static_cast<cudaStream_t>(stream));
  return cudaGetLastError();
}

ZOPRO_EXPORT int32_t zopro_zo_pass_host(int32_t model_dtype, const int64_t* chunks,
                                        int64_t num_chunks, int32_t block,
                                        const int64_t* tensor_starts,
                                        const int64_t* tensor_arena_shifts,
                                        const int64_t* tensor_addresses, const float* coefs,
                                        float* master, const void* policy_delta,
                                        const void* reward_delta, float* partials,
                                        uint64_t seed, uint64_t reduce_seed,
                                        int32_t flags) {
  const PassParams p = make_params(chunks, block, tensor_starts, tensor_arena_shifts,
                                   tensor_addresses, coefs, master, policy_delta, reward_delta,
                                   partials, seed, reduce_seed, flags);
  if (const int32_t bad = check_pass_args(model_dtype, p, num_chunks)) return bad;
  dispatch<HostPass>(model_dtype, flags, p, num_chunks);
  return 0;
}

ZOPRO_EXPORT int32_t zopro_check_device(int32_t device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= count) return cudaErrorInvalidDevice;
  const DeviceGuard guard(device);  // the caller's current device is restored on return
  if (guard.error() != cudaSuccess) return guard.error();
  cudaFuncAttributes attributes;
  err = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (err != cudaSuccess) return err;
  return cudaFuncGetAttributes(&attributes, zo_pass_kernel<__nv_bfloat16, true, true>);
}

ZOPRO_EXPORT const char* zopro_error_string(int32_t code) {
  switch (code) {
    case 0: return "no error";
    case ZOPRO_ERR_BAD_DTYPE: return "unsupported model dtype (fp32, bf16, fp16)";
    case ZOPRO_ERR_BAD_BLOCK: return "block must be a positive multiple of 16";
    case ZOPRO_ERR_BAD_SIZE: return "size out of range (chunks <= 2**31 - 1, numel >= 0)";
    case ZOPRO_ERR_NULL_POINTER: return "a pointer the flags require is NULL";
    case ZOPRO_ERR_NO_CUDA: return "CUDA is unavailable";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}
