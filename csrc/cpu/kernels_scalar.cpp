// The CPU passes for the scalar ISA (IsaScalar), compiled with default flags (the portable path); chosen at run time by
// zo_pass_cpu.cpp when the CPU has it.
#include "isa_scalar.h"
#include "kernel_impl.h"

namespace zopro_cpu {

const Kernels* kernels_scalar() {
  static const Kernels kernels = make_kernels<IsaScalar>();
  return &kernels;
}

}  // namespace zopro_cpu
