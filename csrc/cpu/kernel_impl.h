// The CPU passes, written once over an ISA struct V (isa_scalar.h, isa_avx2.h, isa_avx512.h)
// and included by exactly one translation unit per ISA, inside an anonymous namespace (each unit
// keeps its own copies, compiled for its own ISA).
//
// Work unit: a group of 4W consecutive global indices g .. g + 4W - 1 (g a multiple of 4W): one
// Philox4x32-10 call per lane (W counters g/4 + offset(lane)), two Box-Muller transforms, an
// in-register transpose so vector k holds indices g + kW .. g + kW + W - 1, then the pass
// arithmetic on those four vectors, in the order of triton_ops/zo_pass.py and the torch reference:
//
//   z   = b*n;  z = z + c*dR;  z = z + a*dpi          (a, b, c per tensor)
//   out = keep*src + scale*z                          (src = fp32 master, or the model tensor)
//
// each product and sum rounded to fp32 on its own (the library is compiled with
// -ffp-contract=off; FMAs appear only where written, in the noise's polynomials and the sums).
// Groups that straddle a chunk's ends run on zero-filled copies of the valid values (written
// back afterwards), with the reduce masked to the valid lanes.
//
// Reduce: global index i adds to accumulator i % 16 (slot (i / W) % (16 / W), lane i % W) with
// an FMA, in increasing index order; a chunk's 16 accumulators are then summed by a fixed tree.
// The same in every ISA, so the per-chunk sums are bit-identical across ISAs and threads.
#pragma once

#include <cstdint>
#include <cstring>

#include "../philox.cuh"  // the Philox constants (the definition: zopro_kernels/philox.py)
#include "../zopro.h"
#include "kernels.h"

// The noise and a group's arithmetic are inlined into the chunk loop (vectors stay in registers).
#define ZOPRO_CPU_INLINE inline __attribute__((always_inline))

namespace zopro_cpu {
namespace {

template <class V>
struct Philox {
  using U = typename V::U;
  U k0[10], k1[10];  // the round keys, broadcast

  explicit Philox(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      k0[r] = V::uset(a);
      k1[r] = V::uset(b);
      a += zopro::kPhiloxKeyA;
      b += zopro::kPhiloxKeyB;
    }
  }

  // The four words of counters base + offset(lane). base is a multiple of W, so the low counter
  // word never carries into the high one within a vector.
  ZOPRO_CPU_INLINE void words(uint64_t base, U& x, U& y, U& z, U& w) const {
    const U ka = V::uset(zopro::kPhiloxRoundA), kb = V::uset(zopro::kPhiloxRoundB);
    U c0 = V::iadd(V::uset(static_cast<uint32_t>(base)), V::counter_offsets());
    const U high = V::uset(static_cast<uint32_t>(base >> 32));
    U hi_a, lo_a, hi_b, lo_b;
    // Round 0: c2 = c3 = 0, so the round-B product is 0.
    V::mulhilo(c0, ka, hi_a, lo_a);
    c0 = V::ixor(high, k0[0]);
    U c1 = V::uset(0);
    U c2 = V::ixor(hi_a, k1[0]);
    U c3 = lo_a;
#pragma GCC unroll 9
    for (int r = 1; r < 10; ++r) {
      V::mulhilo(c2, kb, hi_b, lo_b);
      V::mulhilo(c0, ka, hi_a, lo_a);
      c0 = V::ixor3(hi_b, c1, k0[r]);
      c1 = lo_b;
      c2 = V::ixor3(hi_a, c3, k1[r]);
      c3 = lo_a;
    }
    x = c0;
    y = c1;
    z = c2;
    w = c3;
  }
};

// Triton's uint_to_uniform_float: bit-cast to int32, fold negatives (~x), times 4.6566127342e-10.
template <class V>
ZOPRO_CPU_INLINE typename V::F uniform(typename V::U bits) {
  const typename V::U folded = V::ixor(bits, V::template srai<31>(bits));
  return V::mul(V::cvt_i32(folded), V::fset(4.6566127342e-10f));
}

// log(x) for normal x > 0 (Cephes logf: x = m 2^e, m in [sqrt(1/2), sqrt(2)), a degree-9
// polynomial in m - 1, ln 2 in two parts), with FMAs.
template <class V>
ZOPRO_CPU_INLINE typename V::F log_positive(typename V::F x) {
  using F = typename V::F;
  using U = typename V::U;
  const U bits = V::as_u(x);
  U e = V::isub(V::template srli<23>(bits), V::uset(126));  // x = m 2^e, m in [0.5, 1)
  F m = V::as_f(V::ior(V::iand(bits, V::uset(0x007FFFFFu)), V::uset(0x3F000000u)));
  const auto small = V::flt(m, V::fset(0.707106781186547524f));
  e = V::iselect(small, V::isub(e, V::uset(1)), e);
  m = V::select(small, V::add(m, m), m);
  const F t = V::sub(m, V::fset(1.0f));  // exact (Sterbenz)
  const F z = V::mul(t, t);
  F p = V::fset(7.0376836292e-2f);
  p = V::fma(p, t, V::fset(-1.1514610310e-1f));
  p = V::fma(p, t, V::fset(1.1676998740e-1f));
  p = V::fma(p, t, V::fset(-1.2420140846e-1f));
  p = V::fma(p, t, V::fset(1.4249322787e-1f));
  p = V::fma(p, t, V::fset(-1.6668057665e-1f));
  p = V::fma(p, t, V::fset(2.0000714765e-1f));
  p = V::fma(p, t, V::fset(-2.4999993993e-1f));
  p = V::fma(p, t, V::fset(3.3333331174e-1f));
  F y = V::mul(V::mul(p, t), z);
  const F fe = V::cvt_i32(e);
  y = V::fma(fe, V::fset(-2.12194440e-4f), y);
  y = V::fma(z, V::fset(-0.5f), y);
  F r = V::add(t, y);
  return V::fma(fe, V::fset(0.693359375f), r);
}

// sin and cos of 0 <= x < 8192 (Cephes sinf/cosf: octant j (even), x - j pi/4 in three parts by
// FMA, minimax polynomials on [-pi/4, pi/4]).
template <class V>
ZOPRO_CPU_INLINE void sincos_nonnegative(typename V::F x, typename V::F& s, typename V::F& c) {
  using F = typename V::F;
  using U = typename V::U;
  U j = V::cvtt_i32(V::mul(x, V::fset(1.27323954473516f)));  // x * 4/pi, truncated
  j = V::iand(V::iadd(j, V::uset(1)), V::uset(~1u));
  const F y = V::cvt_i32(j);
  x = V::fma(y, V::fset(-0.78515625f), x);
  x = V::fma(y, V::fset(-2.4187564849853515625e-4f), x);
  x = V::fma(y, V::fset(-3.77489497744594108e-8f), x);
  const F z = V::mul(x, x);
  F pc = V::fma(V::fset(2.443315711809948e-5f), z, V::fset(-1.388731625493765e-3f));
  pc = V::fma(pc, z, V::fset(4.166664568298827e-2f));
  F yc = V::fma(z, V::fset(-0.5f), V::fset(1.0f));
  yc = V::fma(pc, V::mul(z, z), yc);
  F ps = V::fma(V::fset(-1.9515295891e-4f), z, V::fset(8.3321608736e-3f));
  ps = V::fma(ps, z, V::fset(-1.6666654611e-1f));
  const F ys = V::fma(V::mul(ps, z), x, x);
  const auto swap = V::ieq(V::iand(j, V::uset(2)), V::uset(2));  // odd quadrant: sin <-> cos
  const F sv = V::select(swap, yc, ys), cv = V::select(swap, ys, yc);
  const U sin_sign = V::template slli<29>(V::iand(j, V::uset(4)));
  const U cos_sign = V::template slli<29>(V::iand(V::iadd(j, V::uset(2)), V::uset(4)));
  s = V::as_f(V::ixor(V::as_u(sv), sin_sign));
  c = V::as_f(V::ixor(V::as_u(cv), cos_sign));
}

// Triton's pair_uniform_to_normal: (r cos theta, r sin theta), r = sqrt(-2 log max(u1, 1e-7)).
template <class V>
ZOPRO_CPU_INLINE void box_muller(typename V::U a, typename V::U b, typename V::F& n1, typename V::F& n2) {
  using F = typename V::F;
  const F u1 = V::fmax(V::fset(1.0e-7f), uniform<V>(a));
  const F theta = V::mul(V::fset(6.283185307179586f), uniform<V>(b));
  const F radius = V::sqrt(V::mul(V::fset(-2.0f), log_positive<V>(u1)));
  F s, c;
  sincos_nonnegative<V>(theta, s, c);
  n1 = V::mul(radius, c);
  n2 = V::mul(radius, s);
}

// The noise of global indices g .. g + 4W - 1 (g a multiple of 4W): n[k] holds g + kW + lane.
template <class V>
ZOPRO_CPU_INLINE void normals(const Philox<V>& philox, int64_t g, typename V::F n[4]) {
  typename V::U x, y, z, w;
  philox.words(static_cast<uint64_t>(g) >> 2, x, y, z, w);
  box_muller<V>(x, y, n[0], n[1]);
  box_muller<V>(z, w, n[2], n[3]);
  V::transpose4(n[0], n[1], n[2], n[3]);
}

template <class V>
struct Accumulators {
  static constexpr int kSlots = 16 / V::W;
  typename V::F v[kSlots];

  Accumulators() {
    for (int s = 0; s < kSlots; ++s) v[s] = V::zero();
  }
  // The slot of vector k of the group at g: global index i goes to accumulator i % 16.
  static int slot(int64_t g, int k) { return static_cast<int>((g / V::W + k) % kSlots); }
  float total() const {
    float a[16];
    for (int s = 0; s < kSlots; ++s) V::store_acc(a + s * V::W, v[s]);
    for (int h = 8; h > 0; h >>= 1)
      for (int j = 0; j < h; ++j) a[j] = a[j] + a[j + h];
    return a[0];
  }
};

template <class V, int DT>
ZOPRO_CPU_INLINE typename V::F load_model(const void* base, int k) {
  if constexpr (DT == ZOPRO_FLOAT32) {
    return V::loadf(static_cast<const float*>(base) + k);
  } else if constexpr (DT == ZOPRO_BFLOAT16) {
    return V::load_bf16(static_cast<const uint16_t*>(base) + k);
  } else {
    return V::load_f16(static_cast<const uint16_t*>(base) + k);
  }
}

// fp32 -> model dtype, round to nearest even (bf16: PyTorch's rule, NaN -> 0x7FC0).
template <class V, int DT>
ZOPRO_CPU_INLINE void store_model(void* base, int k, typename V::F x) {
  if constexpr (DT == ZOPRO_FLOAT32) {
    V::storef(static_cast<float*>(base) + k, x);
  } else if constexpr (DT == ZOPRO_BFLOAT16) {
    using U = typename V::U;
    const U bits = V::as_u(x);
    const U lsb = V::iand(V::template srli<16>(bits), V::uset(1));
    U rounded = V::template srli<16>(V::iadd(V::iadd(bits, V::uset(0x7FFFu)), lsb));
    rounded = V::iselect(V::isnan(x), V::uset(0x7FC0u), rounded);
    V::store_bf16_bits(static_cast<uint16_t*>(base) + k, rounded);
  } else {
    V::store_f16(static_cast<uint16_t*>(base) + k, x);
  }
}

template <class V, bool BF16>
ZOPRO_CPU_INLINE typename V::F load_guidance(const void* base, int k) {
  if constexpr (BF16) {
    return V::load_bf16(static_cast<const uint16_t*>(base) + k);
  } else {
    return V::loadf(static_cast<const float*>(base) + k);
  }
}

// One chunk row's constants.
template <class V>
struct ChunkContext {
  using F = typename V::F;
  F a, b, c, scale, keep;
  bool has_master, write_master, has_policy, has_reward, same_seed;
  Philox<V> noise, reduce_noise;

  ChunkContext(const PassArgs& p, int64_t tensor, bool apply)
      : noise(p.seed), reduce_noise(p.reduce_seed) {
    const int32_t f = p.flags;
    has_master = (f & ZOPRO_HAS_MASTER) != 0;
    write_master = has_master && (f & ZOPRO_WRITE_MASTER);
    has_policy = apply && (f & ZOPRO_HAS_POLICY);
    has_reward = (f & ZOPRO_HAS_REWARD) != 0;
    same_seed = (f & ZOPRO_REDUCE_SAME_SEED) != 0;
    if (apply) {
      const float* coef = p.coefs + 5 * tensor;
      a = V::fset(coef[0]);
      b = V::fset(coef[1]);
      c = V::fset(coef[2]);
      scale = V::fset(coef[3]);
      keep = V::fset(coef[4]);
    } else {
      a = b = c = scale = keep = V::zero();
    }
  }
};

// One group at g. model/master/policy/reward point at index g's element (or at a zero-filled
// copy); with PARTIAL only offsets [kb, ke) are real and the reduce is masked to them.
template <class V, int DT, bool APPLY, bool REDUCE, bool GBF16, bool PARTIAL>
ZOPRO_CPU_INLINE void group_pass(const ChunkContext<V>& cx, int64_t g, void* model, float* master,
                const void* policy, const void* reward, int kb, int ke, Accumulators<V>& sq,
                Accumulators<V>& dot) {
  using F = typename V::F;
  constexpr int W = V::W;
  F n[4];
  if (APPLY || cx.same_seed) {
    normals<V>(cx.noise, g, n);
  } else {
    for (int k = 0; k < 4; ++k) n[k] = V::zero();  // unused (a reduce of another seed's noise)
  }
  F r[4];
  for (int k = 0; k < 4; ++k) r[k] = cx.has_reward ? load_guidance<V, GBF16>(reward, k * W) : V::zero();
  if constexpr (APPLY) {
    for (int k = 0; k < 4; ++k) {
      F z = V::mul(cx.b, n[k]);
      if (cx.has_reward) z = V::add(z, V::mul(cx.c, r[k]));
      if (cx.has_policy) z = V::add(z, V::mul(cx.a, load_guidance<V, GBF16>(policy, k * W)));
      const F src = cx.has_master ? V::loadf(master + k * W) : load_model<V, DT>(model, k * W);
      const F out = V::add(V::mul(cx.keep, src), V::mul(cx.scale, z));
      if (cx.write_master) V::storef(master + k * W, out);
      store_model<V, DT>(model, k * W, out);
    }
  }
  if constexpr (REDUCE) {
    F m[4];
    if (cx.same_seed) {
      for (int k = 0; k < 4; ++k) m[k] = n[k];
    } else {
      normals<V>(cx.reduce_noise, g, m);
    }
    for (int k = 0; k < 4; ++k) {
      F mk = m[k];
      if constexpr (PARTIAL) mk = V::select(V::lanes_in(k, kb, ke), mk, V::zero());
      const int s = Accumulators<V>::slot(g, k);
      sq.v[s] = V::fma(mk, mk, sq.v[s]);
      if (cx.has_reward) dot.v[s] = V::fma(mk, r[k], dot.v[s]);
    }
  }
}

template <class V, int DT, int MODE, bool GBF16>
void chunk_pass(const PassArgs& p, int64_t row, float* partial) {
  constexpr bool APPLY = MODE != kReduce, REDUCE = MODE != kApply;
  constexpr int G = 4 * V::W;
  constexpr int64_t kModelSize = DT == ZOPRO_FLOAT32 ? 4 : 2;
  constexpr int64_t kGuidanceSize = GBF16 ? 2 : 4;
  const int64_t* c = p.chunks + 4 * row;
  const int64_t tensor = c[0], lo = c[2], hi = c[3];
  const ChunkContext<V> cx(p, tensor, APPLY);
  Accumulators<V> sq, dot;
  const int64_t shift = p.arena_shifts[tensor];
  char* model_base = nullptr;
  int64_t start = 0;
  if (APPLY) {
    model_base = reinterpret_cast<char*>(static_cast<uintptr_t>(p.tensor_addresses[tensor]));
    start = p.tensor_starts[tensor];
  }
  char* master = reinterpret_cast<char*>(cx.has_master ? p.master : nullptr);
  const char* policy = static_cast<const char*>(cx.has_policy ? p.policy : nullptr);
  const char* reward = static_cast<const char*>(cx.has_reward ? p.reward : nullptr);
  auto model_at = [&](int64_t i) { return APPLY ? model_base + (i - start) * kModelSize : nullptr; };
  auto master_at = [&](int64_t i) { return master ? master + (i - shift) * 4 : nullptr; };
  auto policy_at = [&](int64_t i) { return policy ? policy + (i - shift) * kGuidanceSize : nullptr; };
  auto reward_at = [&](int64_t i) { return reward ? reward + (i - shift) * kGuidanceSize : nullptr; };

  for (int64_t g = lo - lo % G; g < hi; g += G) {
    const int kb = g < lo ? static_cast<int>(lo - g) : 0;
    const int ke = g + G > hi ? static_cast<int>(hi - g) : G;
    if (kb == 0 && ke == G) {
      group_pass<V, DT, APPLY, REDUCE, GBF16, false>(
          cx, g, model_at(g), reinterpret_cast<float*>(master_at(g)), policy_at(g), reward_at(g),
          0, G, sq, dot);
      continue;
    }
    // A group straddling the chunk's ends: run it on zero-filled copies of the valid values.
    alignas(64) unsigned char model_buf[G * 4], policy_buf[G * 4], reward_buf[G * 4];
    alignas(64) float master_buf[G];
    std::memset(model_buf, 0, sizeof model_buf);
    std::memset(policy_buf, 0, sizeof policy_buf);
    std::memset(reward_buf, 0, sizeof reward_buf);
    std::memset(master_buf, 0, sizeof master_buf);
    const int64_t first = g + kb, count = ke - kb;
    if (APPLY) std::memcpy(model_buf + kb * kModelSize, model_at(first), count * kModelSize);
    if (master) std::memcpy(master_buf + kb, master_at(first), count * 4);
    if (policy) std::memcpy(policy_buf + kb * kGuidanceSize, policy_at(first), count * kGuidanceSize);
    if (reward) std::memcpy(reward_buf + kb * kGuidanceSize, reward_at(first), count * kGuidanceSize);
    group_pass<V, DT, APPLY, REDUCE, GBF16, true>(cx, g, model_buf, master ? master_buf : nullptr,
                                                  policy_buf, reward_buf, kb, ke, sq, dot);
    if (APPLY) {
      std::memcpy(model_at(first), model_buf + kb * kModelSize, count * kModelSize);
      if (cx.write_master) std::memcpy(master_at(first), master_buf + kb, count * 4);
    }
  }
  if (REDUCE) {
    partial[0] = sq.total();
    partial[1] = dot.total();
  }
}

template <class V>
void noise_range(float* out, uint64_t seed, int64_t start, int64_t numel) {
  constexpr int G = 4 * V::W;
  const Philox<V> philox(seed);
  const int64_t end = start + numel;
  for (int64_t g = start - start % G; g < end; g += G) {
    typename V::F n[4];
    normals<V>(philox, g, n);
    if (g >= start && g + G <= end) {
      for (int k = 0; k < 4; ++k) V::storef(out + (g - start) + k * V::W, n[k]);
      continue;
    }
    alignas(64) float values[G];
    for (int k = 0; k < 4; ++k) V::storef(values + k * V::W, n[k]);
    const int64_t a = g > start ? g : start, b = g + G < end ? g + G : end;
    std::memcpy(out + (a - start), values + (a - g), (b - a) * sizeof(float));
  }
}

template <class V, int DT, int MODE>
void fill_row(Kernels& k) {
  k.chunk[DT][MODE][0] = &chunk_pass<V, DT, MODE, false>;
  k.chunk[DT][MODE][1] = &chunk_pass<V, DT, MODE, true>;
}

template <class V>
Kernels make_kernels() {
  Kernels k{};
  k.name = V::name;
  k.group = 4 * V::W;
  fill_row<V, ZOPRO_FLOAT32, kApply>(k);
  fill_row<V, ZOPRO_FLOAT32, kApplyReduce>(k);
  fill_row<V, ZOPRO_BFLOAT16, kApply>(k);
  fill_row<V, ZOPRO_BFLOAT16, kApplyReduce>(k);
  fill_row<V, ZOPRO_FLOAT16, kApply>(k);
  fill_row<V, ZOPRO_FLOAT16, kApplyReduce>(k);
  // The reduce reads no model tensor: one instantiation serves every dtype.
  fill_row<V, ZOPRO_FLOAT32, kReduce>(k);
  for (int dt = 1; dt < 3; ++dt)
    for (int g = 0; g < 2; ++g) k.chunk[dt][kReduce][g] = k.chunk[ZOPRO_FLOAT32][kReduce][g];
  k.noise = &noise_range<V>;
  return k;
}

}  // namespace
}  // namespace zopro_cpu
