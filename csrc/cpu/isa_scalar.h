// The portable ISA: one lane, plain C++. Every vector ISA must give these bits lane by lane:
// the same operations in the same order, FMAs exactly where this uses std::fma.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace zopro_cpu {
namespace {

inline uint32_t f2u(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// IEEE fp16 <-> fp32 in integer/float arithmetic (FP16 library by M. Dukhan, as PyTorch's c10
// uses); NaNs as the x86 F16C instructions convert them (quiet, top payload bits kept), so the
// scalar and vector paths agree on every input.
inline float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized);
  return u2f(sign | bits);
}
inline uint16_t float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f2u(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = u2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f2u(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  const uint32_t nan = 0x7E00u | ((w >> 13) & 0x03FFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? nan : nonsign));
}

struct IsaScalar {
  static constexpr int W = 1;
  static constexpr const char* name = "scalar";
  using F = float;
  using U = uint32_t;
  using M = bool;

  static F fset(float x) { return x; }
  static U uset(uint32_t x) { return x; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F fma(F a, F b, F c) { return std::fma(a, b, c); }  // a*b + c, one rounding
  static F fmax(F a, F b) { return a > b ? a : b; }           // (no NaNs reach it)
  static F sqrt(F a) { return std::sqrt(a); }
  static F select(M m, F a, F b) { return m ? a : b; }
  static M flt(F a, F b) { return a < b; }
  static M isnan(F a) { return a != a; }
  static F zero() { return 0.0f; }

  static U iadd(U a, U b) { return a + b; }
  static U isub(U a, U b) { return a - b; }
  static U ixor(U a, U b) { return a ^ b; }
  static U ixor3(U a, U b, U c) { return a ^ b ^ c; }
  static U iand(U a, U b) { return a & b; }
  static U ior(U a, U b) { return a | b; }
  template <int N>
  static U srli(U a) { return a >> N; }
  template <int N>
  static U slli(U a) { return a << N; }
  template <int N>
  static U srai(U a) { return uint32_t(int32_t(a) >> N); }
  static M ieq(U a, U b) { return a == b; }
  static U iselect(M m, U a, U b) { return m ? a : b; }
  static void mulhilo(U a, U k, U& hi, U& lo) {
    const uint64_t p = uint64_t(a) * k;
    hi = uint32_t(p >> 32);
    lo = uint32_t(p);
  }
  static F cvt_i32(U a) { return float(int32_t(a)); }
  static U cvtt_i32(F a) { return uint32_t(int32_t(a)); }  // truncation; 0 <= a < 2^31 here
  static U as_u(F a) { return f2u(a); }
  static F as_f(U a) { return u2f(a); }

  // Lane l of the Philox counter vector gets counter (group counter) + offset(l).
  static U counter_offsets() { return 0; }
  // n[k] lane l holds word k's normal of counter lane l; afterwards n[k] holds indices kW .. kW+W-1.
  static void transpose4(F&, F&, F&, F&) {}
  // Lanes of vector k (group offsets kW + l) inside [kb, ke).
  static M lanes_in(int k, int kb, int ke) { return k >= kb && k < ke; }

  static F loadf(const float* p) { return *p; }
  static void storef(float* p, F x) { *p = x; }
  static F load_bf16(const uint16_t* p) { return u2f(uint32_t(*p) << 16); }
  static void store_bf16_bits(uint16_t* p, U bits) { *p = uint16_t(bits); }
  static F load_f16(const uint16_t* p) { return half_to_float(*p); }
  static void store_f16(uint16_t* p, F x) { *p = float_to_half(x); }
  // Accumulator vectors: lane l of slot s sums the values of global index i with i % 16 == sW + l.
  static void store_acc(float* out, F x) { *out = x; }
};

}  // namespace
}  // namespace zopro_cpu
