"""The one ZO pass kernel: every pass of a step (reduce, perturb ±, update + next reduce) is this
kernel with different constexpr switches, launched once over all tensors of a parameter set.

Work is cut into aligned windows of BLOCK global indices; a chunk is a window clipped to one
tensor, so a program touches one tensor and its noise is generated for whole windows.
Chunk table row: (tensor id, window start, first index, end index), all global indices.
Arena position of global index i of tensor t: i − arena_shift[t] (a tensor may be one shard of a
sharded parameter, so a set's global ranges need not be contiguous).

    z   = a·Δπ + b·n + c·ΔR                     (a, b, c per tensor: eq. 2, see direction.py)
    out = keep·src + scale·z                    (src = fp32 master, or the model tensor itself)

Model tensors are reached through a table of raw addresses (no copy of the user's parameters is
ever needed) and read as raw 16/32-bit words, bit-cast to their float type.
"""

import triton
import triton.language as tl

from .noise import window_noise



@triton.jit
def round_to_bf16_bits(x):
    """fp32 → bf16 bits, round to nearest even (PyTorch's rule). Triton's interpreter truncates
    in ``.to(tl.bfloat16)``; the GPU path uses the hardware conversion instead."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.int16)


@triton.jit(do_not_specialize=["seed", "reduce_seed"])
def zo_pass_kernel(
    chunk_ptr,
    tensor_start_ptr,
    tensor_arena_shift_ptr,
    tensor_addr_ptr,
    coef_ptr,
    master_ptr,
    policy_delta_ptr,
    reward_delta_ptr,
    partial_ptr,
    seed,
    reduce_seed,
    MODEL_DTYPE: tl.constexpr,
    RAW_DTYPE: tl.constexpr,
    APPLY: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    WRITE_MASTER: tl.constexpr,
    HAS_POLICY: tl.constexpr,
    HAS_REWARD: tl.constexpr,
    REDUCE: tl.constexpr,
    REDUCE_SAME_SEED: tl.constexpr,
    ALIGNED: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(chunk_ptr + pid * 4)
    window = tl.multiple_of(tl.load(chunk_ptr + pid * 4 + 1), BLOCK)
    lo = tl.load(chunk_ptr + pid * 4 + 2)
    hi = tl.load(chunk_ptr + pid * 4 + 3)
    if ALIGNED:  # every tensor boundary is a multiple of 16: lets loads vectorise
        lo = tl.multiple_of(lo, 16)
        hi = tl.multiple_of(hi, 16)
    index = window + tl.arange(0, BLOCK)
    mask = (index >= lo) & (index < hi)
    arena_shift = tl.load(tensor_arena_shift_ptr + tensor)
    if ALIGNED:
        arena_shift = tl.multiple_of(arena_shift, 16)
    arena = index - arena_shift

    noise = window_noise(seed, window, BLOCK)
    reward = tl.zeros((BLOCK,), tl.float32)
    if HAS_REWARD:
        reward = tl.load(reward_delta_ptr + arena, mask=mask, other=0.0).to(tl.float32)

    if APPLY:
        coef = coef_ptr + tensor * 5
        a = tl.load(coef)
        b = tl.load(coef + 1)
        c = tl.load(coef + 2)
        scale = tl.load(coef + 3)
        keep = tl.load(coef + 4)
        z = b * noise
        if HAS_REWARD:
            z += c * reward
        if HAS_POLICY:
            z += a * tl.load(policy_delta_ptr + arena, mask=mask, other=0.0).to(tl.float32)

        tensor_start = tl.load(tensor_start_ptr + tensor)
        if ALIGNED:
            tensor_start = tl.multiple_of(tensor_start, 16)
        model = tl.load(tensor_addr_ptr + tensor).to(tl.pointer_type(RAW_DTYPE), bitcast=True)
        if ALIGNED:
            model = tl.multiple_of(model, 16)
        local = index - tensor_start
        if HAS_MASTER:
            src = tl.load(master_ptr + arena, mask=mask, other=0.0)
        else:
            src = tl.load(model + local, mask=mask, other=0).to(MODEL_DTYPE, bitcast=True)
            src = src.to(tl.float32)
        out = keep * src + scale * z
        if WRITE_MASTER:
            tl.store(master_ptr + arena, out, mask=mask)
        if SOFTWARE_BF16:
            bits = round_to_bf16_bits(out)
        else:
            bits = out.to(MODEL_DTYPE).to(RAW_DTYPE, bitcast=True)
        tl.store(model + local, bits, mask=mask)

    if REDUCE:
        if REDUCE_SAME_SEED:
            reduce_noise = noise
        else:
            reduce_noise = window_noise(reduce_seed, window, BLOCK)
        reduce_noise = tl.where(mask, reduce_noise, 0.0)
        tl.store(partial_ptr + pid * 2, tl.sum(reduce_noise * reduce_noise, axis=0))
        tl.store(partial_ptr + pid * 2 + 1, tl.sum(reduce_noise * reward, axis=0))
