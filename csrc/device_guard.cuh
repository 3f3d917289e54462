// DeviceGuard: make `device` the calling thread's current CUDA device for a scope and give the
// caller its own current device back on every exit path: the library leaves the thread as it
// found it (PyTorch and other callers read the current device with cudaGetDevice).
//
// Nothing is set or restored when the thread is already on `device` (the usual case; the Python
// side makes it so with torch.cuda.device(...), whose own guard restores without creating a CUDA
// context on a device the caller never used: since CUDA 12, cudaSetDevice creates the device's
// primary context, so a C caller that lets this guard switch devices gets its previous device
// back with a context on it).
#pragma once

#include <cuda_runtime.h>

namespace zopro {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int current = -1;
    error_ = cudaGetDevice(&current);
    if (error_ != cudaSuccess || current == device) return;
    error_ = cudaSetDevice(device);
    if (error_ == cudaSuccess) previous_ = current;
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

  // cudaSuccess, or why `device` could not be made current (the thread's device is unchanged then).
  cudaError_t error() const { return error_; }

 private:
  int previous_ = -1;
  cudaError_t error_ = cudaSuccess;
};

}  // namespace zopro
