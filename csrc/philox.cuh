// Philox4x32-10 and the normal transform: the noise definition of zopro_kernels/philox.py.
//
//   value(seed, i) = component i % 4 of randn4x(seed, counter = i / 4)
//
// key (seed & 0xffffffff, seed >> 32), counter (c & 0xffffffff, c >> 32, 0, 0); each 32-bit
// output bit-cast to int32, negatives folded with ~x, times 4.6566127342e-10f; Box-Muller on
// (u1, u2) and (u3, u4) with u1 clamped to >= 1e-7 and theta = 6.283185307179586f * u2.
// Exactly Triton's tl.randn4x. Host and device: the host copy serves the CPU tests.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ZOPRO_HD __host__ __device__ __forceinline__
#else
#define ZOPRO_HD inline
#endif

namespace zopro {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

ZOPRO_HD uint32_t mul_hi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct Words4 {
  uint32_t x, y, z, w;
};

// Four 32-bit words for one 64-bit counter: one call feeds four consecutive global indices.
ZOPRO_HD Words4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mul_hi(kPhiloxRoundB, c2), lo_b = kPhiloxRoundB * c2;
    const uint32_t hi_a = mul_hi(kPhiloxRoundA, c0), lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

// Triton's uint_to_uniform_float for 32-bit words.
ZOPRO_HD float uint32_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Triton's pair_uniform_to_normal, in IEEE fp32 (precise logf/sqrtf/sincosf, no fast math).
ZOPRO_HD void box_muller(float u1, float u2, float& n1, float& n2) {
  u1 = fmaxf(1.0e-7f, u1);
  const float theta = 6.283185307179586f * u2;
  const float radius = sqrtf(-2.0f * logf(u1));
  float s, c;
#if defined(__CUDA_ARCH__)
  sincosf(theta, &s, &c);
#else
  s = std::sin(theta);
  c = std::cos(theta);
#endif
  n1 = radius * c;
  n2 = radius * s;
}

// The normals of global indices 4*counter .. 4*counter + 3, in index order.
ZOPRO_HD void normals4(uint64_t seed, uint64_t counter, float* out) {
  const Words4 w = philox4x32_10(seed, counter);
  box_muller(uint32_to_uniform(w.x), uint32_to_uniform(w.y), out[0], out[1]);
  box_muller(uint32_to_uniform(w.z), uint32_to_uniform(w.w), out[2], out[3]);
}

}  // namespace zopro
