"""Triton kernels. Imported only when the Triton backend is used, so ``import zopro_kernels``
works without Triton. Set ``TRITON_INTERPRET=1`` before this import to run them on the CPU."""
