"""What the chunk-table backends (triton, cuda, cpu) share: the tables and coefficients a pass takes, the
csrc/zopro.h flags, and the deterministic per-tensor sum of per-chunk partials."""

import os

import torch

COEF_COLUMNS = 5  # a, b, c, scale, keep (triton_ops/zo_pass.py, csrc/zopro.h)


def prepare_chunked_pass(pset, block: int, coefs, reduce: bool):
    """(tables, coefs, partials) for one pass over ``pset`` with the chunk table of ``block``:
    the set's kernel tables, the coefficient table as contiguous fp32 [T, 5] on the set's device
    (None: reduce only), and an uninitialised fp32 [chunks, 2] partials buffer (None: no reduce)."""
    tables = pset.kernel_tables(block)
    device = pset.device
    partials = (
        torch.empty(len(tables["chunks"]), 2, device=device, dtype=torch.float32) if reduce else None
    )
    if coefs is not None:
        coefs = coefs.to(device=device, dtype=torch.float32).contiguous()
        assert coefs.shape == (len(pset), COEF_COLUMNS)
    return tables, coefs, partials


def sum_chunk_partials(partials: torch.Tensor, tables: dict) -> torch.Tensor:
    """Per-tensor [T, 2] sums of per-chunk [chunks, 2] partials: a padded gather summed in a fixed
    order (deterministic, no atomics). Gather index len(chunks) points at an appended zero row."""
    padded = torch.cat((partials, partials.new_zeros(1, 2)))
    return padded[tables["gather"]].sum(dim=1)


def pass_flags(pset, tables: dict, apply: bool, write_master: bool, use_policy: bool, reduce_seed, seed) -> int:
    """The csrc/zopro.h flag bits of one pass (GUIDANCE_BF16 is added from the arenas' dtype)."""
    from .. import native

    has_master = pset.master is not None
    reduce = reduce_seed is not None
    return (
        (native.APPLY if apply else 0)
        | (native.HAS_MASTER if has_master else 0)
        | (native.WRITE_MASTER if write_master and has_master else 0)
        | (native.HAS_POLICY if use_policy else 0)
        | (native.HAS_REWARD if pset.reward_delta is not None else 0)
        | (native.REDUCE if reduce else 0)
        | (native.REDUCE_SAME_SEED if reduce and reduce_seed == seed else 0)
        | (native.ALIGNED if tables["aligned"] else 0)
    )


def block_from_env(variable: str, default: int, minimum: int) -> int:
    """Indices per chunk row: ``default``, or the power of two >= ``minimum`` set in ``variable``
    (results do not depend on it beyond the reduction order)."""
    block = int(os.environ.get(variable, default))
    if block < minimum or block & (block - 1):
        raise ValueError(f"{variable} must be a power of two >= {minimum}, got {block}")
    return block
