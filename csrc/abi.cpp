// C ABI of the zopro-kernels native library: the version the Python side checks before calling
// any kernel, and the build's architecture list. Kernels: zo_pass.cu, noise.cu.
#include "zopro.h"

#ifndef ZOPRO_CUDA_ARCHS_STR
#define ZOPRO_CUDA_ARCHS_STR ""
#endif

extern "C" __attribute__((visibility("default"))) int32_t zopro_abi_version() {
  return ZOPRO_ABI_VERSION;
}

extern "C" __attribute__((visibility("default"))) const char* zopro_cuda_archs() {
  return ZOPRO_CUDA_ARCHS_STR;
}
