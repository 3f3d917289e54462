// The noise fill: out[k] = noise(seed, start + k). One Philox call per group of four indices
// (counter = index / 4), grid-strided; the same normals4 as the pass kernel.
#include <cuda_runtime.h>

#include "device_guard.cuh"
#include "philox.cuh"
#include "zopro.h"

#define ZOPRO_EXPORT extern "C" __attribute__((visibility("default")))

namespace zopro {

constexpr int kNoiseThreads = 256;

ZOPRO_HD void fill_group(float* out, uint64_t seed, int64_t start, int64_t numel, int64_t counter) {
  float v[4];
  normals4(seed, static_cast<uint64_t>(counter), v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = 4 * counter + j - start;
    if (k >= 0 && k < numel) out[k] = v[j];
  }
}

__global__ void __launch_bounds__(kNoiseThreads)
    noise_kernel(float* out, uint64_t seed, int64_t start, int64_t numel, int64_t first, int64_t groups) {
  for (int64_t g = int64_t(blockIdx.x) * kNoiseThreads + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * kNoiseThreads) {
    fill_group(out, seed, start, numel, first + g);
  }
}

}  // namespace zopro

using namespace zopro;

ZOPRO_EXPORT int32_t zopro_noise(float* out, uint64_t seed, int64_t start, int64_t numel,
                                 int32_t device, void* stream) {
  if (start < 0 || numel < 0) return ZOPRO_ERR_BAD_SIZE;
  if (numel == 0) return 0;
  if (!out) return ZOPRO_ERR_NULL_POINTER;
  const DeviceGuard guard(device);  // the caller's current device is restored on return
  if (guard.error() != cudaSuccess) return guard.error();
  const int64_t first = start / 4, groups = (start + numel - 1) / 4 - first + 1;
  const int64_t blocks = (groups + kNoiseThreads - 1) / kNoiseThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  noise_kernel<<<grid, kNoiseThreads, 0, static_cast<cudaStream_t>(stream)>>>(out, seed, start, numel, first, groups);
  return cudaGetLastError();
}

ZOPRO_EXPORT int32_t zopro_noise_host(float* out, uint64_t seed, int64_t start, int64_t numel) {
  if (start < 0 || numel < 0) return ZOPRO_ERR_BAD_SIZE;
  if (numel == 0) return 0;
  if (!out) return ZOPRO_ERR_NULL_POINTER;
  const int64_t first = start / 4, last = (start + numel - 1) / 4;
  for (int64_t c = first; c <= last; ++c) fill_group(out, seed, start, numel, c);
  return 0;
}

ZOPRO_EXPORT int32_t zopro_philox_host(uint32_t* out, uint64_t seed, const int64_t* counters, int64_t n) {
  if (n < 0) return ZOPRO_ERR_BAD_SIZE;
  if (n > 0 && (!out || !counters)) return ZOPRO_ERR_NULL_POINTER;
  for (int64_t k = 0; k < n; ++k) {
    const Words4 w = philox4x32_10(seed, static_cast<uint64_t>(counters[k]));
    out[4 * k] = w.x;
    out[4 * k + 1] = w.y;
    out[4 * k + 2] = w.z;
    out[4 * k + 3] = w.w;
  }
  return 0;
}
