// The CPU passes for the avx2 ISA (IsaAvx2), compiled with -mavx2 -mfma -mf16c; chosen at run time by
// zo_pass_cpu.cpp when the CPU has it.
#include "isa_avx2.h"
#include "kernel_impl.h"

namespace zopro_cpu {

const Kernels* kernels_avx2() {
  static const Kernels kernels = make_kernels<IsaAvx2>();
  return &kernels;
}

}  // namespace zopro_cpu
