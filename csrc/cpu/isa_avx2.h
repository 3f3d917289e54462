// AVX2 + FMA + F16C: 8 lanes. Compiled only into kernels_avx2.cpp (-mavx2 -mfma -mf16c).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace zopro_cpu {
namespace {

struct IsaAvx2 {
  static constexpr int W = 8;
  static constexpr const char* name = "avx2";
  using F = __m256;
  using U = __m256i;
  using M = __m256;  // all-ones / all-zeros lanes

  static F fset(float x) { return _mm256_set1_ps(x); }
  static U uset(uint32_t x) { return _mm256_set1_epi32(int32_t(x)); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fmax(F a, F b) { return _mm256_max_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
  static M flt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static M isnan(F a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static F zero() { return _mm256_setzero_ps(); }

  static U iadd(U a, U b) { return _mm256_add_epi32(a, b); }
  static U isub(U a, U b) { return _mm256_sub_epi32(a, b); }
  static U ixor(U a, U b) { return _mm256_xor_si256(a, b); }
  static U ixor3(U a, U b, U c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static U iand(U a, U b) { return _mm256_and_si256(a, b); }
  static U ior(U a, U b) { return _mm256_or_si256(a, b); }
  template <int N>
  static U srli(U a) { return _mm256_srli_epi32(a, N); }
  template <int N>
  static U slli(U a) { return _mm256_slli_epi32(a, N); }
  template <int N>
  static U srai(U a) { return _mm256_srai_epi32(a, N); }
  static M ieq(U a, U b) { return _mm256_castsi256_ps(_mm256_cmpeq_epi32(a, b)); }
  static U iselect(M m, U a, U b) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(b), _mm256_castsi256_ps(a), m));
  }
  static void mulhilo(U a, U k, U& hi, U& lo) {
    const __m256i even = _mm256_mul_epu32(a, k);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), k);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_mullo_epi32(a, k);
  }
  static F cvt_i32(U a) { return _mm256_cvtepi32_ps(a); }
  static U cvtt_i32(F a) { return _mm256_cvttps_epi32(a); }
  static U as_u(F a) { return _mm256_castps_si256(a); }
  static F as_f(U a) { return _mm256_castsi256_ps(a); }

  // After the in-lane 4x4 transposes, vector k lane (4q + j) holds the counter at lane 4q + k of
  // the input: counters 2k (q = 0) and 2k + 1 (q = 1), i.e. indices 8k .. 8k + 7.
  static U counter_offsets() { return _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7); }
  static void transpose4(F& a, F& b, F& c, F& d) {
    const __m256 t0 = _mm256_unpacklo_ps(a, b), t1 = _mm256_unpacklo_ps(c, d);
    const __m256 t2 = _mm256_unpackhi_ps(a, b), t3 = _mm256_unpackhi_ps(c, d);
    a = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t1)));
    b = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t1)));
    c = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t2), _mm256_castps_pd(t3)));
    d = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t2), _mm256_castps_pd(t3)));
  }
  static M lanes_in(int k, int kb, int ke) {
    const __m256i offset = _mm256_add_epi32(_mm256_set1_epi32(k * W), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i below_end = _mm256_cmpgt_epi32(_mm256_set1_epi32(ke), offset);
    const __m256i before_begin = _mm256_cmpgt_epi32(_mm256_set1_epi32(kb), offset);
    return _mm256_castsi256_ps(_mm256_andnot_si256(before_begin, below_end));
  }

  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static void store_bf16_bits(uint16_t* p, U bits) {  // bits <= 0xFFFF per lane
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_f16(uint16_t* p, F x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store_acc(float* out, F x) { _mm256_storeu_ps(out, x); }
};

}  // namespace
}  // namespace zopro_cpu
