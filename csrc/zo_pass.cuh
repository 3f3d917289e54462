// The ZO pass, per item of 8 consecutive global indices (two Philox calls): the code the CUDA
// kernel (zo_pass.cu) runs per thread and the host execution (zopro_zo_pass_host) runs in a loop,
// so the CPU tests exercise the same indexing, masking, vector paths and arithmetic.
//
//   z   = a*dpi + b*n + c*dR                  (a, b, c per tensor; eq. 2, computed in Python)
//   out = keep*src + scale*z                  (src = fp32 master, or the model tensor itself)
//
// Same order of operations as triton_ops/zo_pass.py.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "philox.cuh"
#include "zopro.h"

namespace zopro {

constexpr int kItem = 8;  // values per item: two Philox calls; 16 B of a 16-bit model tensor

struct PassParams {
  const int64_t* chunks;
  const int64_t* tensor_starts;
  const int64_t* arena_shifts;
  const int64_t* tensor_addresses;
  const float* coefs;
  float* master;
  const void* policy;  // fp32, or bf16 with ZOPRO_GUIDANCE_BF16
  const void* reward;
  float* partials;
  uint64_t seed;
  uint64_t reduce_seed;
  int32_t flags;
  int32_t block;
};

struct Chunk {
  int64_t tensor, window, lo, hi;
};

template <class T>
struct Model;
template <>
struct Model<float> {
  static ZOPRO_HD float load(const float* p) { return *p; }
  static ZOPRO_HD void store(float* p, float x) { *p = x; }
};
template <>
struct Model<__nv_bfloat16> {
  static ZOPRO_HD float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static ZOPRO_HD void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
};
template <>
struct Model<__half> {
  static ZOPRO_HD float load(const __half* p) { return __half2float(*p); }
  static ZOPRO_HD void store(__half* p, float x) { *p = __float2half_rn(x); }
};

// 16-byte loads/stores: vector instructions on the device, memcpy on the host.
ZOPRO_HD uint4 load16(const void* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint4*>(p);
#else
  uint4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}
ZOPRO_HD void store16(void* p, uint4 v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(p) = v;
#else
  std::memcpy(p, &v, sizeof v);
#endif
}

// 8 fp32 values at p (32 B aligned when vec).
ZOPRO_HD void load8(const float* p, float* v, bool vec, unsigned valid) {
  if (vec) {
    const uint4 a = load16(p), b = load16(p + 4);
    std::memcpy(v, &a, 16);
    std::memcpy(v + 4, &b, 16);
  } else {
#pragma unroll
    for (int j = 0; j < kItem; ++j) v[j] = (valid >> j) & 1u ? p[j] : 0.0f;
  }
}
ZOPRO_HD void store8(float* p, const float* v, bool vec, unsigned valid) {
  if (vec) {
    uint4 a, b;
    std::memcpy(&a, v, 16);
    std::memcpy(&b, v + 4, 16);
    store16(p, a);
    store16(p + 4, b);
  } else {
#pragma unroll
    for (int j = 0; j < kItem; ++j)
      if ((valid >> j) & 1u) p[j] = v[j];
  }
}

// 8 model values at p (16 B aligned when vec: 16 B for 16-bit types, 32 B for fp32).
template <class T>
ZOPRO_HD void load_model8(const T* p, float* v, bool vec, unsigned valid) {
  if constexpr (sizeof(T) == 4) {
    load8(reinterpret_cast<const float*>(p), v, vec, valid);
  } else {
    if (vec) {
      const uint4 raw = load16(p);
      T h[kItem];
      std::memcpy(h, &raw, 16);
#pragma unroll
      for (int j = 0; j < kItem; ++j) v[j] = Model<T>::load(&h[j]);
    } else {
#pragma unroll
      for (int j = 0; j < kItem; ++j) v[j] = (valid >> j) & 1u ? Model<T>::load(p + j) : 0.0f;
    }
  }
}
template <class T>
ZOPRO_HD void store_model8(T* p, const float* v, bool vec, unsigned valid) {
  if constexpr (sizeof(T) == 4) {
    store8(reinterpret_cast<float*>(p), v, vec, valid);
  } else {
    if (vec) {
      T h[kItem];
#pragma unroll
      for (int j = 0; j < kItem; ++j) Model<T>::store(&h[j], v[j]);
      uint4 raw;
      std::memcpy(&raw, h, 16);
      store16(p, raw);
    } else {
#pragma unroll
      for (int j = 0; j < kItem; ++j)
        if ((valid >> j) & 1u) Model<T>::store(p + j, v[j]);
    }
  }
}

// 8 guidance values (Δπ or ΔR) at arena position `arena`: fp32 or bf16 storage.
ZOPRO_HD void load_guidance8(const void* base, int64_t arena, bool bf16, float* v, bool vec,
                             unsigned valid) {
  if (bf16) {
    load_model8(static_cast<const __nv_bfloat16*>(base) + arena, v, vec, valid);
  } else {
    load8(static_cast<const float*>(base) + arena, v, vec, valid);
  }
}

// The noise of global indices item .. item+7 (item a multiple of 8): counters item/4, item/4+1.
ZOPRO_HD void normals8(uint64_t seed, int64_t item, float* n) {
  const uint64_t counter = static_cast<uint64_t>(item) >> 2;
  normals4(seed, counter, n);
  normals4(seed, counter + 1, n + 4);
}

ZOPRO_HD Chunk load_chunk(const PassParams& p, int64_t row) {
  const int64_t* r = p.chunks + 4 * row;
  return {r[0], r[1], r[2], r[3]};
}

// The first item of a chunk: the 8-aligned item of the window that holds lo.
ZOPRO_HD int64_t first_item(const Chunk& ch) {
  return ch.window + ((ch.lo - ch.window) / kItem) * kItem;
}

struct TensorArgs {
  float a, b, c, scale, keep;
  int64_t start;        // global index of the tensor's first value
  int64_t arena_shift;  // arena position of global index i = i - arena_shift
  uintptr_t address;
};

template <bool APPLY>
ZOPRO_HD TensorArgs load_tensor_args(const PassParams& p, int64_t tensor) {
  TensorArgs t{};
  t.arena_shift = p.arena_shifts[tensor];
  if (APPLY) {
    const float* coef = p.coefs + 5 * tensor;
    t.a = coef[0];
    t.b = coef[1];
    t.c = coef[2];
    t.scale = coef[3];
    t.keep = coef[4];
    t.start = p.tensor_starts[tensor];
    t.address = static_cast<uintptr_t>(p.tensor_addresses[tensor]);
  }
  return t;
}

// One item: apply (if APPLY) and accumulate the reduce sums (if REDUCE).
template <class T, bool APPLY, bool REDUCE>
ZOPRO_HD void process_item(const PassParams& p, const Chunk& ch, const TensorArgs& t,
                           int64_t item, float& sum_sq, float& sum_dot) {
  const int32_t f = p.flags;
  unsigned valid = 0;
#pragma unroll
  for (int j = 0; j < kItem; ++j) valid |= unsigned(item + j >= ch.lo && item + j < ch.hi) << j;
  // Aligned sets: boundaries are multiples of 16, so an item is wholly inside or outside.
  const bool vec = (f & ZOPRO_ALIGNED) && valid == 0xFFu;
  const int64_t arena = item - t.arena_shift;  // may be < 0 for invalid lanes: never dereferenced

  const bool bf16_guidance = (f & ZOPRO_GUIDANCE_BF16) != 0;
  // Loads first, then the Philox work: the loads are in flight while the noise is computed.
  float reward[kItem];
  if (f & ZOPRO_HAS_REWARD) {
    load_guidance8(p.reward, arena, bf16_guidance, reward, vec, valid);
  } else {
#pragma unroll
    for (int j = 0; j < kItem; ++j) reward[j] = 0.0f;
  }
  float policy[kItem], src[kItem];
  T* model = nullptr;
  if constexpr (APPLY) {
    if (f & ZOPRO_HAS_POLICY) load_guidance8(p.policy, arena, bf16_guidance, policy, vec, valid);
    model = reinterpret_cast<T*>(t.address) + (item - t.start);
    if (f & ZOPRO_HAS_MASTER) {
      load8(p.master + arena, src, vec, valid);
    } else {
      load_model8(model, src, vec, valid);
    }
  }

  float n[kItem];
  const bool same = (f & ZOPRO_REDUCE_SAME_SEED) != 0;
  if (APPLY || (REDUCE && same)) normals8(p.seed, item, n);

  if constexpr (APPLY) {
    float z[kItem];
#pragma unroll
    for (int j = 0; j < kItem; ++j) z[j] = t.b * n[j];
    if (f & ZOPRO_HAS_REWARD) {
#pragma unroll
      for (int j = 0; j < kItem; ++j) z[j] += t.c * reward[j];
    }
    if (f & ZOPRO_HAS_POLICY) {
#pragma unroll
      for (int j = 0; j < kItem; ++j) z[j] += t.a * policy[j];
    }
    float out[kItem];
#pragma unroll
    for (int j = 0; j < kItem; ++j) out[j] = t.keep * src[j] + t.scale * z[j];
    if ((f & ZOPRO_WRITE_MASTER) && (f & ZOPRO_HAS_MASTER)) store8(p.master + arena, out, vec, valid);
    store_model8(model, out, vec, valid);
  }

  if constexpr (REDUCE) {
    float m[kItem];
    if (same) {
#pragma unroll
      for (int j = 0; j < kItem; ++j) m[j] = n[j];
    } else {
      normals8(p.reduce_seed, item, m);
    }
#pragma unroll
    for (int j = 0; j < kItem; ++j) {
      if ((valid >> j) & 1u) {
        sum_sq += m[j] * m[j];
        sum_dot += m[j] * reward[j];
      }
    }
  }
}

}  // namespace zopro
