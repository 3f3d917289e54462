"""Data parallel for the RLOO loop (``torchrun``): what each process does alone, what it shares.

Every process holds the same base model, adapters and value head, and the same prompt list.
Alone: the prompts of a step (and the pair prompts of an iteration) are split across processes;
each samples, scores, judges and evaluates its own share. Shared:

- ZO steps: ZOPrO all-gathers (J₊, J₋) and averages them (32 bytes a step).
- First-order steps (AdamW iteration 0, the reward refinement): the loss is the global mean over
  every process's examples — each process scales its local mean by its share of the global
  count and the gradients are summed across processes, so the update equals a single process
  that saw all the examples, and every process applies the same update.
- Metrics: (sum, count) pairs are summed, so a logged mean is the mean over all examples.

A single process is the same code with ``world_size == 1``: every collective is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import torch
import torch.distributed as dist

from ..distributed import _device_for, default_process_group


class DataParallel:
    """The process group of a data-parallel loop (``None``: one process, nothing is shared)."""

    def __init__(self, group=None):
        self.group = default_process_group(group)
        if self.group is None:
            self.world_size, self.rank, self.device = 1, 0, torch.device("cpu")
        else:
            self.world_size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            self.device = _device_for(self.group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list) -> list:
        """This process's share: every world_size-th item, starting at its rank."""
        return items[self.rank::self.world_size]

    # -- reductions ----------------------------------------------------------------------------

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64, one collective)."""
        if not self.active:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.group)
        return tensor.tolist()

    def gather_int(self, value: int) -> list[int]:
        """Every process's value, in rank order."""
        if not self.active:
            return [int(value)]
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        return [int(t.item()) for t in gathered]

    def gather_floats(self, values: torch.Tensor) -> list[float]:
        """Every process's values, concatenated in rank order (the same order at every call)."""
        mine = [float(v) for v in values.detach().double().flatten().tolist()]
        if not self.active:
            return mine
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        return [v for part in gathered for v in part]

    def maxima(self, values: list[float]) -> list[float]:
        """Element-wise maximum over processes (one collective)."""
        if not self.active:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (decisions that must not diverge)."""
        return self.maxima([1.0 if flag else 0.0])[0] > 0

    def means_of(self, *tensors: torch.Tensor) -> list[float]:
        """Per tensor, the mean of its finite entries over every process's values (NaN when none);
        one collective for all of them."""
        sums = []
        for values in tensors:
            values = values.detach().double().flatten()
            finite = values[torch.isfinite(values)]
            sums += [float(finite.sum()) if finite.numel() else 0.0, float(finite.numel())]
        sums = self.sum(sums)
        return [total / count if count else float("nan") for total, count in zip(sums[::2], sums[1::2])]

    def sum_gradients(self, parameters: list[torch.Tensor], loss: torch.Tensor) -> float:
        """Sum ``.grad`` over processes in place (missing grads count as zeros); returns the summed loss.

        One collective for all gradients and the loss: the loss comes back too so that every
        process sees the same value and a non-finite loss is an error everywhere.
        """
        loss_value = loss.detach().double().reshape(1)
        if not self.active:
            return float(loss_value)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1).to(self.device, torch.float32) for g in grads]
                         + [loss_value.to(self.device, torch.float32)])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for p, g in zip(parameters, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.device, g.dtype)
            offset += n
        return float(flat[-1])

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (downloads into a shared cache), then the others."""
        if self.active and not self.is_main:
            dist.barrier(group=self.group)
        try:
            yield
        finally:
            if self.active and self.is_main:
                dist.barrier(group=self.group)

    # -- agreement -----------------------------------------------------------------------------

    def broadcast_tensors(self, tensors: list[torch.Tensor]):
        """Rank 0's values into every process's tensors (weights start identical, as in DDP)."""
        if not self.active:
            return
        with torch.no_grad():
            for tensor in tensors:
                buffer = tensor.detach().to(self.device)
                dist.broadcast(buffer, src=dist.get_global_rank(self.group, 0), group=self.group)
                if buffer.data_ptr() != tensor.data_ptr():
                    tensor.copy_(buffer)

    def broadcast_object(self, value):
        """Rank 0's picklable object on every process (a checkpoint read on rank 0 only)."""
        if not self.active:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def check_same(self, what: str, fingerprint: int):
        """Raise on every process when any process's fingerprint differs from rank 0's."""
        values = self.gather_int(fingerprint)
        differing = [r for r, v in enumerate(values) if v != values[0]]
        if differing:
            raise RuntimeError(f"data-parallel processes disagree on the {what}: ranks {differing} differ "
                               f"from rank 0; every process must start from the same {what}")


def text_fingerprint(value) -> int:
    """A 63-bit hash of a JSON-able value (configs, prompt lists)."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def tensor_fingerprint(tensors) -> int:
    """A 63-bit hash of tensors' bytes (the base model: never broadcast, too large, so checked)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        data = tensor.detach().reshape(-1)
        # a strided sample keeps this cheap for an 8B base; any corrupt or different load shows
        step = max(1, data.numel() // 4096)
        digest.update(data[::step].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def init_from_environment() -> DataParallel:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return DataParallel()
