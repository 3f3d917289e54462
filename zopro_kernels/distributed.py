"""What crosses the network in a ZO step: scalars, never anything of size d.

Data parallel: every process holds the same weights and seeds and evaluates the closure on its
own data; the losses J₊, J₋ are gathered (with the step and seed, to catch a process that
diverged) and averaged in rank order, so every process computes the same g bit for bit.
Sharded parameters (DTensor / FSDP2 ``Shard(0)``): each process runs the passes on its local
shard with the shard's global indices, so the noise is the unsharded run's; the per-tensor
partial sums of the reduce pass (n·n, n·ΔR) and the norms ‖Δπ‖², ‖ΔR‖² are all-reduced
(O(number of tensors) bytes).
"""

from __future__ import annotations

import math
import secrets

import torch
import torch.distributed as dist

SEED_BITS_COMPARED = 52  # seeds travel as float64: compare the bits that survive exactly


def default_process_group(process_group):
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def local_piece(p: torch.Tensor):
    """(local tensor, full numel, flat offset of the local piece, sharded?) of a parameter."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if not isinstance(p, DTensor):
        return p, p.numel(), 0, False
    if p.device_mesh.ndim != 1:
        raise ValueError("ZOPrO supports DTensor parameters on a 1-D device mesh (FSDP2), not HSDP meshes")
    placement = p.placements[0]
    local = p.to_local().detach()
    if placement.is_replicate():
        return local, p.numel(), 0, False
    if not (placement.is_shard() and placement.dim == 0):
        raise ValueError(f"ZOPrO supports Shard(0) or Replicate() DTensor parameters, got {placement}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = math.prod(p.shape[1:])
    return local, p.numel(), int(global_offset[0]) * row, True


def layout_hash(params) -> int:
    """A 52-bit hash of the parameters' full shapes, dtypes and order (exact in a float64), so
    processes holding different models fail before the first pass rather than diverge."""
    import hashlib

    text = ";".join(f"{tuple(p.shape)}:{p.dtype}" for p in params)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little") >> 4


def agreed_seed(seed, process_group):
    """``seed=None``: draw one on rank 0 and broadcast it; otherwise keep the given seed."""
    if seed is not None:
        return seed
    drawn = secrets.randbits(63)
    group = default_process_group(process_group)
    if group is None:
        return drawn
    value = torch.tensor([drawn], dtype=torch.int64, device=_device_for(group))
    dist.broadcast(value, src=dist.get_global_rank(group, 0), group=group)
    return int(value.item())


def _device_for(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Communicator:
    """The collectives of a ZO step over one process group; counts the bytes each rank sends."""

    def __init__(self, group):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = _device_for(group)
        self.bytes_sent = 0

    def mean_losses(self, loss_plus, loss_minus, seed: int, step: int):
        """Average J₊ and J₋ over the processes; also return every process's (seed, step)."""
        mine = torch.stack(
            (
                loss_plus.to(self.device, torch.float64),
                loss_minus.to(self.device, torch.float64),
                # fills, not host-to-device copies: no blocking transfer per step
                torch.full((), float(seed >> (63 - SEED_BITS_COMPARED)), dtype=torch.float64, device=self.device),
                torch.full((), float(step), dtype=torch.float64, device=self.device),
            )
        )
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        self.bytes_sent += mine.numel() * mine.element_size()
        table = torch.stack(gathered)
        # Summed in rank order on every process: the same bits everywhere.
        means = table[:, :2].sum(dim=0) / self.world_size
        return means[0], means[1], table[:, 2:]

    def check_agreement(self, positions, what: str = "seed and step"):
        """Raise on every process if any process's (seed, step) differs from rank 0's."""
        positions = positions.cpu()
        differing = [r for r in range(self.world_size) if not torch.equal(positions[r], positions[0])]
        if differing:
            raise RuntimeError(
                f"ZOPrO processes disagree on the {what}: ranks {differing} differ from rank 0 "
                f"({positions.tolist()}); they would diverge silently. Give every process the same "
                "seed and start (or load the same checkpoint)."
            )

    def agree_on_layout(self, seed: int, step: int, numel: int, count: int, layout: int = 0):
        """Once, before the first pass: every process has the same seed, step and parameter layout
        (``layout``: ``layout_hash`` of the parameters' full shapes, dtypes and order)."""
        mine = torch.tensor([float(seed >> (63 - SEED_BITS_COMPARED)), float(step), float(numel), float(count),
                             float(layout)], dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        self.bytes_sent += mine.numel() * mine.element_size()
        self.check_agreement(torch.stack(gathered), "seed, step or parameter layout")

    def sum_over_shards(self, values: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
        """Per-parameter sums over processes for sharded parameters; replicated rows stay rank 0's
        values exactly (the other processes contribute zeros)."""
        contribution = values.to(self.device, torch.float64)
        if self.rank != 0:
            contribution = torch.where(sharded.to(self.device)[:, None] if values.dim() == 2
                                       else sharded.to(self.device), contribution, 0.0)
        dist.all_reduce(contribution, group=self.group)
        self.bytes_sent += contribution.numel() * contribution.element_size()
        return contribution.to(values.device)
