"""Multi-process ZOPrO on gloo (CPU): sharded parameters equal the single-process run, data-parallel
processes stay bit-identical, disagreements are caught, and only O(1)-in-d bytes cross per step."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zopro_kernels import ZOPrO

SHAPES = [(5, 3), (1, 4), (7,), (10, 2)]  # uneven over 2 and 3 processes; one 1-row tensor
STEPS = 5


def initial_values():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    reward = [torch.randn(s, generator=gen) for s in SHAPES]
    target = [torch.randn(s, generator=gen) for s in SHAPES]
    return params, reward, target


def loss_of(full_params, target):
    return sum(((p.double() - t.double()) ** 2).sum() + 0.1 * (p.double() ** 4).sum()
               for p, t in zip(full_params, target))


def train(params, opt, full, reward, target, steps=STEPS):
    opt.set_guidance(reward_delta=reward)
    opt.mark_iteration()
    for k in range(steps):
        if k == 2:
            opt.mark_iteration()  # forms Δπ: the policy path runs too
        opt.step(lambda: loss_of(full(), target))


def single_process_run(granularity, backend="torch"):
    params, reward, target = initial_values()
    opt = ZOPrO(params, lr=2e-3, eps=1e-3, seed=4, alpha="linear", steps_per_iteration=3,
                granularity=granularity, backend=backend)
    train(params, opt, lambda: params, reward, target)
    return params


def _init(rank, world, store):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _finish(store):
    """Tear the group down together: a rank that destroys it and exits while the other still uses
    it can abort the other ("terminate called without an active exception", seen intermittently,
    also after the barrier). Each rank marks that it got past the barrier, so ``_spawn`` can tell
    that abort from a failure of the work."""
    dist.barrier()
    Path(f"{store}.done{dist.get_rank()}").touch()
    dist.destroy_process_group()


def _spawn(worker, args, nprocs):
    """``mp.spawn``; a SIGABRT after every rank passed ``_finish``'s barrier (all work and results
    done) is gloo's teardown race, not a failure of what the test checks."""
    store = args[1]
    try:
        mp.spawn(worker, args=args, nprocs=nprocs)
    except mp.ProcessExitedException as error:
        if error.signal_name != "SIGABRT" or not all(Path(f"{store}.done{r}").exists() for r in range(nprocs)):
            raise


def _sharded_worker(rank, world, store, out, granularity, backend):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,))
    params, reward, target = initial_values()
    sharded = [distribute_tensor(p, mesh, [Shard(0)]) for p in params]
    # ΔR given both ways: full tensors, and one DTensor with the same placement.
    reward = reward[:-1] + [distribute_tensor(reward[-1], mesh, [Shard(0)])]
    opt = ZOPrO(sharded, lr=2e-3, eps=1e-3, seed=4, alpha="linear", steps_per_iteration=3,
                granularity=granularity, backend=backend)
    train(sharded, opt, lambda: [p.full_tensor() for p in sharded], reward, target)
    full = [p.full_tensor() for p in sharded]
    if rank == 0:
        torch.save({"params": full, "bytes": opt.communicated_bytes}, out)
    _finish(store)


def _cpu_library_reason():
    from zopro_kernels import native

    return native.cpu_unavailable_reason()


@pytest.mark.parametrize(
    "world,granularity,backend",
    [(2, "tensor", "torch"), (3, "global", "torch"), (3, "tensor", "triton"),
     pytest.param(3, "tensor", "cpu", marks=pytest.mark.skipif(_cpu_library_reason() is not None,
                                                               reason=str(_cpu_library_reason())))],
    ids=["2-tensor-torch", "3-global-torch", "3-tensor-triton", "3-tensor-cpu"],
)
def test_sharded_run_equals_single_process(tmp_path, world, granularity, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    out = tmp_path / "result.pt"
    _spawn(_sharded_worker, (world, tmp_path / "store", out, granularity, backend), world)
    result = torch.load(out)
    sharded = result["params"]
    # Layout check (seed, step, numel, count, shape/dtype hash), then per step (J₊, J₋, seed, step)
    # and the [P, 2] reduce sums; ‖Δπ‖², ‖ΔR‖² ([P] each) after each guidance change. Counted per
    # parameter tensor, never per value.
    P = len(SHAPES)
    assert result["bytes"] == 40 + STEPS * (32 + P * 2 * 8) + 2 * (2 * P * 8)
    single = single_process_run(granularity, backend)
    for a, b in zip(sharded, single):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(single, initial_values()[0]))  # it did train


COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "isend",
               "broadcast_object_list", "all_gather_object")


class CountedCollectives:
    """Wraps every torch.distributed collective and counts the bytes of the tensors this process
    hands to them: what crosses, measured beside the optimizer's own bookkeeping."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self.originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def __enter__(self):
        for name, original in self.originals.items():
            setattr(dist, name, self._counted(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(dist, name, original)

    def _counted(self, name, original):
        def counted(*args, **kwargs):
            self.calls += 1
            if name.endswith("_object") or name.endswith("_object_list"):
                raise AssertionError(f"{name}: pickled objects cross in the step")
            sent = args[1] if name.startswith("all_gather") else args[0]  # (outputs, input) for gathers
            self.bytes += sent.numel() * sent.element_size()
            return original(*args, **kwargs)

        return counted


def _data_parallel_worker(rank, world, store, out, sizes):
    _init(rank, world, store)
    results = {}
    for size in sizes:
        gen = torch.Generator().manual_seed(1)
        w = torch.randn(size, generator=gen)
        data = torch.randn(size, generator=torch.Generator().manual_seed(100 + rank))  # per-rank data
        with CountedCollectives() as counted:
            opt = ZOPrO([w], lr=1e-2, eps=1e-3, seed=2)
            for _ in range(STEPS):
                opt.step(lambda: ((w - data) ** 2).mean())
        gathered = [torch.empty_like(w) for _ in range(world)]
        dist.all_gather(gathered, w)
        results[size] = {"weights": gathered, "bytes": opt.communicated_bytes, "measured": counted.bytes,
                         "calls": counted.calls}
    if rank == 0:
        torch.save(results, out)
    _finish(store)


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_ranks_stay_identical_and_send_o1_bytes(tmp_path, world):
    out = tmp_path / "result.pt"
    sizes = (10, 100_000)
    _spawn(_data_parallel_worker, (world, tmp_path / "store", out, sizes), world)
    results = torch.load(out)
    for size in sizes:
        weights = results[size]["weights"]
        assert all(torch.equal(weights[0], w) for w in weights[1:])
    # Per step: J₊, J₋, seed and step as float64, whatever d is; once: seed, step, numel, count and
    # the layout hash. Measured at the collectives, and the optimizer's own count agrees.
    for size in sizes:
        assert results[size]["measured"] == STEPS * 4 * 8 + 5 * 8
        assert results[size]["bytes"] == results[size]["measured"]
        assert results[size]["calls"] == STEPS + 1

    # The same run in one process, with the loss averaged over the ranks' data.
    w = torch.randn(10, generator=torch.Generator().manual_seed(1))
    datas = [torch.randn(10, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    opt = ZOPrO([w], lr=1e-2, eps=1e-3, seed=2)
    for _ in range(STEPS):
        opt.step(lambda: sum(((w - d) ** 2).mean().double() for d in datas) / world)
    assert torch.allclose(results[10]["weights"][0], w, rtol=1e-6, atol=1e-7)


def _mismatch_worker(rank, world, store, out, what="seed"):
    _init(rank, world, store)
    if what == "seed":
        w = torch.zeros(4)
        opt = ZOPrO([w], seed=rank)  # rank 1 disagrees
    else:  # the same numel and tensor count, other shapes (or dtypes): rank 1 holds another model
        w = torch.zeros(6) if rank == 0 else torch.zeros(6, dtype=torch.float64 if what == "dtype" else None)
        w = w.reshape(2, 3) if rank == 0 or what == "dtype" else w.reshape(3, 2)
        opt = ZOPrO([w], seed=0)
    try:
        opt.step(lambda: w.sum())
        message = None
    except RuntimeError as err:
        message = str(err)
    torch.save(message, f"{out}.{rank}")
    _finish(store)


@pytest.mark.parametrize("what", ["seed", "shape", "dtype"])
def test_seed_or_layout_mismatch_is_an_error_on_every_rank(tmp_path, what):
    out = tmp_path / "message"
    _spawn(_mismatch_worker, (2, tmp_path / "store", out, what), 2)
    for rank in range(2):
        message = torch.load(f"{out}.{rank}")
        assert message is not None and "disagree" in message and "[1]" in message


def _seed_broadcast_worker(rank, world, store, out):
    _init(rank, world, store)
    opt = ZOPrO([torch.zeros(3)], seed=None)
    torch.save(opt.seed, f"{out}.{rank}")
    _finish(store)


def test_seed_none_is_drawn_once_and_broadcast(tmp_path):
    out = tmp_path / "seed"
    _spawn(_seed_broadcast_worker, (2, tmp_path / "store", out), 2)
    seeds = [torch.load(f"{out}.{r}") for r in range(2)]
    assert seeds[0] == seeds[1] and 0 <= seeds[0] < 2**63


def _fsdp_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _fsdp_train(model, steps=4):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)
    opt = ZOPrO(model.parameters(), lr=1e-2, eps=1e-3, seed=5, alpha=0.5, backend="torch")
    opt.set_guidance(reward_delta=[torch.ones_like(p) for p in model.parameters()])
    for _ in range(steps):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))


def _fsdp_worker(rank, world, store, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,))
    model = _fsdp_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _fsdp_train(model)
    full = [p.full_tensor() for p in model.parameters()]
    if rank == 0:
        torch.save(full, out)
    _finish(store)


def test_fsdp2_fully_sharded_model_equals_single_process(tmp_path):
    """FSDP2 shards every parameter on dim 0 (rank 1 holds an empty shard of the last layer)."""
    out = tmp_path / "result.pt"
    _spawn(_fsdp_worker, (2, tmp_path / "store", out), 2)
    model = _fsdp_model()
    _fsdp_train(model)
    for a, b in zip(torch.load(out), model.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
