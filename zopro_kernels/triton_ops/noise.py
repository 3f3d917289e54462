"""Noise in registers: the values of one aligned window of global indices, and a fill kernel."""

import triton
import triton.language as tl


@triton.jit
def window_noise(seed, window, BLOCK: tl.constexpr):
    """Noise of global indices ``window .. window + BLOCK`` (``window`` a multiple of BLOCK).

    One Philox call per four indices; the four normals are interleaved back into index order,
    so index i gets component i % 4 of counter i // 4, as in ``zopro_kernels.philox``.
    """
    counters = window // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    n0, n1, n2, n3 = tl.randn4x(seed, counters)
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit(do_not_specialize=["seed", "start", "numel"])
def fill_noise_kernel(out_ptr, seed, start, numel, BLOCK: tl.constexpr):
    start = start.to(tl.int64)
    window = (start // BLOCK) * BLOCK + tl.program_id(0).to(tl.int64) * BLOCK
    index = window + tl.arange(0, BLOCK)
    values = window_noise(seed, window, BLOCK)
    tl.store(out_ptr + (index - start), values, mask=(index >= start) & (index < start + numel))


def fill_noise_(out, seed: int, start: int, block: int = 1024):
    """Write the noise of global indices ``[start, start + out.numel())`` into fp32 ``out``."""
    numel = out.numel()
    if numel == 0:
        return out
    first_window = (start // block) * block
    grid = (triton.cdiv(start + numel - first_window, block),)
    fill_noise_kernel[grid](out, seed, start, numel, BLOCK=block)
    return out
