// The CPU passes for the avx512 ISA (IsaAvx512), compiled with -mavx512f -mavx2 -mfma -mf16c; chosen at run time by
// zo_pass_cpu.cpp when the CPU has it.
#include "isa_avx512.h"
#include "kernel_impl.h"

namespace zopro_cpu {

const Kernels* kernels_avx512() {
  static const Kernels kernels = make_kernels<IsaAvx512>();
  return &kernels;
}

}  // namespace zopro_cpu
