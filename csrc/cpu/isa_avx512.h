// AVX-512F (+ AVX2, FMA, F16C): 16 lanes. Compiled only into kernels_avx512.cpp.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace zopro_cpu {
namespace {

struct IsaAvx512 {
  static constexpr int W = 16;
  static constexpr const char* name = "avx512";
  using F = __m512;
  using U = __m512i;
  using M = __mmask16;

  static F fset(float x) { return _mm512_set1_ps(x); }
  static U uset(uint32_t x) { return _mm512_set1_epi32(int32_t(x)); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fmax(F a, F b) { return _mm512_max_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
  static M flt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static M isnan(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static F zero() { return _mm512_setzero_ps(); }

  static U iadd(U a, U b) { return _mm512_add_epi32(a, b); }
  static U isub(U a, U b) { return _mm512_sub_epi32(a, b); }
  static U ixor(U a, U b) { return _mm512_xor_si512(a, b); }
  static U ixor3(U a, U b, U c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static U iand(U a, U b) { return _mm512_and_si512(a, b); }
  static U ior(U a, U b) { return _mm512_or_si512(a, b); }
  template <int N>
  static U srli(U a) { return _mm512_srli_epi32(a, N); }
  template <int N>
  static U slli(U a) { return _mm512_slli_epi32(a, N); }
  template <int N>
  static U srai(U a) { return _mm512_srai_epi32(a, N); }
  static M ieq(U a, U b) { return _mm512_cmpeq_epi32_mask(a, b); }
  static U iselect(M m, U a, U b) { return _mm512_mask_blend_epi32(m, b, a); }
  static void mulhilo(U a, U k, U& hi, U& lo) {
    const __m512i even = _mm512_mul_epu32(a, k);
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), k);
    hi = _mm512_mask_blend_epi32(__mmask16(0xAAAA), _mm512_srli_epi64(even, 32), odd);
    lo = _mm512_mullo_epi32(a, k);
  }
  static F cvt_i32(U a) { return _mm512_cvtepi32_ps(a); }
  static U cvtt_i32(F a) { return _mm512_cvttps_epi32(a); }
  static U as_u(F a) { return _mm512_castps_si512(a); }
  static F as_f(U a) { return _mm512_castsi512_ps(a); }

  // After the in-lane 4x4 transposes, vector k lane (4q + j) holds the counter at lane 4q + k of
  // the input: counter 4k + q, i.e. vector k holds indices 16k .. 16k + 15.
  static U counter_offsets() {
    return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  }
  static void transpose4(F& a, F& b, F& c, F& d) {
    const __m512 t0 = _mm512_unpacklo_ps(a, b), t1 = _mm512_unpacklo_ps(c, d);
    const __m512 t2 = _mm512_unpackhi_ps(a, b), t3 = _mm512_unpackhi_ps(c, d);
    a = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1)));
    b = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1)));
    c = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t2), _mm512_castps_pd(t3)));
    d = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t2), _mm512_castps_pd(t3)));
  }
  static M lanes_in(int k, int kb, int ke) {
    const int lo = kb - k * W, hi = ke - k * W;  // lanes [lo, hi) of this vector
    const int a = lo < 0 ? 0 : (lo > W ? W : lo), b = hi < 0 ? 0 : (hi > W ? W : hi);
    if (b <= a) return 0;
    return __mmask16(((1u << b) - 1u) & ~((1u << a) - 1u));
  }

  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F load_bf16(const uint16_t* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  static void store_bf16_bits(uint16_t* p, U bits) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
  }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store_f16(uint16_t* p, F x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store_acc(float* out, F x) { _mm512_storeu_ps(out, x); }
};

}  // namespace
}  // namespace zopro_cpu
