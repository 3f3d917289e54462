// C ABI of the zopro-kernels native library. The Python side loads it lazily with ctypes and
// checks this version before calling any kernel.
#include <cstdint>

extern "C" __attribute__((visibility("default"))) int32_t zopro_abi_version() { return 1; }
