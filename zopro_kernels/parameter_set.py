"""A set of trainable tensors treated as one virtual vector of global indices.

Parameters are grouped by (device, dtype) in order of first appearance; within a group they keep
the order given. The virtual vector is the groups one after another, each parameter owning a
contiguous global index range of its full (unsharded) size. A ``ParameterSet`` holds the local
tensors of one group: whole parameters, or the shard this process holds of a sharded one (a
contiguous piece of the flattened parameter, so its global indices are too). The optimizer's own
buffers (fp32 master, Δπ, ΔR, snapshot) are flat arenas of the local values, tensor after tensor;
the model's tensors stay where they are and are written through their addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def master_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp32 masters for 16/32-bit models; float64 models keep float64 (the reference path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def describe(name: str | None, index: int) -> str:
    return f"parameter {name!r}" if name else f"parameter #{index}"


@dataclass
class ParameterSet:
    params: list[torch.Tensor]
    names: list[str | None]
    indices: list[int]  # position of each tensor in the optimizer's flat parameter list (frozen ones included)
    starts: list[int]  # global index of each local tensor's first value
    master_weights: bool
    guidance_dtype: torch.dtype = torch.float32  # storage of Δπ and ΔR (fp32, or bf16 to halve their traffic)
    rows: list[int] | None = None  # position of each tensor among the trained ones (the engine's tables)
    master: torch.Tensor | None = None
    policy_delta: torch.Tensor | None = None
    reward_delta: torch.Tensor | None = None
    snapshot: torch.Tensor | None = None
    policy_sq: torch.Tensor | None = None  # float64 [T]: ‖Δπ_t‖²
    reward_sq: torch.Tensor | None = None  # float64 [T]: ‖ΔR_t‖²
    _addresses: list[int] = field(default_factory=list)
    _kernel_tables: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.rows is None:
            self.rows = list(self.indices)
        self._addresses = [p.data_ptr() for p in self.params]
        self.offsets = [0]  # arena position of each tensor's first value
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())
        if self.master_weights:
            self.master = self.flatten(self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def master_dtype(self) -> torch.dtype:
        return master_dtype_for(self.dtype)

    @property
    def numels(self) -> list[int]:
        return [p.numel() for p in self.params]

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def __len__(self) -> int:
        return len(self.params)

    def local_range(self, t: int) -> tuple[int, int]:
        """Arena positions of tensor ``t``."""
        return self.offsets[t], self.offsets[t + 1]

    def views(self, arena: torch.Tensor) -> list[torch.Tensor]:
        """Per-tensor views (flat) of an arena of this set."""
        return [arena[slice(*self.local_range(t))] for t in range(len(self))]

    @property
    def guidance_arena_dtype(self) -> torch.dtype:
        return self.master_dtype if self.master_dtype == torch.float64 else self.guidance_dtype

    def flatten(self, tensors, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new arena (master dtype unless given) holding ``tensors`` (None entries are zeros)."""
        arena = torch.zeros(self.numel, device=self.device, dtype=dtype or self.master_dtype)
        for view, tensor in zip(self.views(arena), tensors):
            if tensor is not None:
                view.copy_(tensor.detach().reshape(-1))
        return arena

    def current_values(self) -> torch.Tensor:
        """θ as an arena: the master itself, or a fresh copy of the model's tensors."""
        return self.master if self.master is not None else self.flatten(self.params)

    def squared_norms(self, arena: torch.Tensor) -> torch.Tensor:
        return torch.stack([v.double().square().sum() for v in self.views(arena)])

    def check_unmoved(self):
        """The passes write through recorded addresses: refuse to run if a tensor moved."""
        for t, p in enumerate(self.params):
            if p.data_ptr() != self._addresses[t]:
                raise RuntimeError(
                    f"{describe(self.names[t], self.indices[t])} was reallocated after the "
                    "optimizer started (model.to(), .data = ..., or a reload?). Call "
                    "optimizer.sync_from_model() to adopt the new tensors and their values."
                )

    def sync_from_model(self):
        """Adopt the parameters' current storage and values (re-reads the master)."""
        self._addresses = [p.data_ptr() for p in self.params]
        self._kernel_tables.clear()
        if self.master is not None:
            for view, p in zip(self.views(self.master), self.params):
                view.copy_(p.detach().reshape(-1))

    def kernel_tables(self, block: int) -> dict:
        """Device tables for the one-launch-per-pass kernels (built once per block size)."""
        if block not in self._kernel_tables:
            self._kernel_tables[block] = self._build_kernel_tables(block)
        return self._kernel_tables[block]

    def _build_kernel_tables(self, block: int) -> dict:
        rows, first_chunk, chunk_count = [], [], []
        for t, (start, numel) in enumerate(zip(self.starts, self.numels)):
            end = start + numel
            windows = torch.arange(start // block, (end - 1) // block + 1, dtype=torch.int64) * block
            first_chunk.append(sum(len(r) for r in rows))
            chunk_count.append(len(windows))
            rows.append(
                torch.stack(
                    (
                        torch.full_like(windows, t),
                        windows,
                        windows.clamp(min=start),
                        (windows + block).clamp(max=end),
                    ),
                    dim=1,
                )
            )
        chunks = torch.cat(rows)
        most = max(chunk_count)
        column = torch.arange(most, dtype=torch.int64)
        first = torch.tensor(first_chunk, dtype=torch.int64)[:, None]
        count = torch.tensor(chunk_count, dtype=torch.int64)[:, None]
        # Per-tensor sums of chunk partials: a padded gather, summed in a fixed order, so results
        # are deterministic (no atomics). Index len(chunks) points at an appended zero row.
        gather = torch.where(column < count, first + column, len(chunks))
        shifts = [s - o for s, o in zip(self.starts, self.offsets)]
        boundaries = self.starts + [s + n for s, n in zip(self.starts, self.numels)] + shifts
        aligned = all(b % 16 == 0 for b in boundaries) and all(
            p.data_ptr() % 16 == 0 for p in self.params
        )
        device = self.device
        return {
            "chunks": chunks.to(device),
            "tensor_starts": torch.tensor(self.starts, dtype=torch.int64, device=device),
            "tensor_arena_shifts": torch.tensor(shifts, dtype=torch.int64, device=device),
            "tensor_addresses": torch.tensor(self._addresses, dtype=torch.int64, device=device),
            "gather": gather.to(device),
            "aligned": aligned,
        }


def build_parameter_sets(pieces, names: list[str | None], master_weights: bool,
                         guidance_dtype: torch.dtype = torch.float32,
                         positions: list[int] | None = None) -> list[ParameterSet]:
    """Group by (device, dtype) in order of first appearance and assign global index ranges.

    ``pieces``: per parameter, (local tensor, full numel, flat offset of the local piece in the
    full parameter). Global ranges follow the full sizes, so every process of a sharded run
    agrees on them; empty local pieces take no part in the passes. ``positions``: each piece's
    place in the optimizer's parameter list (default: its place in ``pieces``), for when frozen
    parameters are left out.
    """
    positions = list(range(len(pieces))) if positions is None else positions
    order: dict[tuple, list[int]] = {}
    for i, (local, _, _) in enumerate(pieces):
        order.setdefault((local.device, local.dtype), []).append(i)
    sets, cursor = [], 0
    for members in order.values():
        starts, kept = [], []
        for i in members:
            local, full_numel, offset = pieces[i]
            if local.numel() > 0:
                kept.append(i)
                starts.append(cursor + offset)
            cursor += full_numel
        if kept:
            sets.append(
                ParameterSet(
                    params=[pieces[i][0] for i in kept],
                    names=[names[i] for i in kept],
                    indices=[positions[i] for i in kept],
                    rows=kept,
                    starts=starts,
                    master_weights=master_weights,
                    guidance_dtype=guidance_dtype,
                )
            )
    return sets


def validate_parameter(p: torch.Tensor, name: str | None, index: int):
    what = describe(name, index)
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{what} is a {type(p).__name__}, not a tensor")
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{what} has dtype {p.dtype}; supported: fp32, bf16, fp16, fp64")
    if p.is_sparse or not p.is_contiguous():
        raise ValueError(f"{what} must be a dense contiguous tensor")
