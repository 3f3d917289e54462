"""The step's host-side code (optimizer, engine, direction, distributed) never reads a device value
back or builds a tensor from Python numbers per step, with an LR scheduler changing lr every step
and a closure returning a Python float. On CPU the reads are counted by patching the calls that
would block on a GPU; the ``gpu`` test runs the same under ``torch.cuda.set_sync_debug_mode``."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from zopro_kernels import ZOPrO

PACKAGE = Path(__file__).resolve().parent.parent / "zopro_kernels"
HOST_SIDE = {PACKAGE / name for name in ("optimizer.py", "engine.py", "direction.py", "distributed.py")}
READS = [(torch.Tensor, name) for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")]
BUILDS = [(torch, name) for name in ("tensor", "as_tensor")]


class HostTraffic:
    """Records calls made directly from the step's host-side files."""

    def __init__(self, monkeypatch):
        self.calls = []
        for owner, name in READS + BUILDS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))

    def _wrap(self, original, name):
        def counted(*args, **kwargs):
            caller = inspect.currentframe().f_back
            if Path(caller.f_code.co_filename).resolve() in HOST_SIDE:
                self.calls.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(*args, **kwargs)

        return counted


def guided_run(device, steps_before, steps_after, traffic_factory=None, **options):
    torch.manual_seed(0)
    params = [torch.randn(64, 8, device=device), torch.randn(300, device=device), torch.randn(5, device=device)]
    target = [torch.randn_like(p) for p in params]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 5e-3}]
    opt = ZOPrO(groups, lr=1e-2, eps=1e-3, backend="torch", steps_per_iteration=8, direction_norm="noise", **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    closure = lambda: float(sum((p - t).double().square().sum() for p, t in zip(params, target)))  # noqa: E731
    opt.mark_iteration()
    for _ in range(3):
        opt.step(closure)
    opt.mark_iteration()  # Δπ
    opt.set_guidance(reward_delta=[torch.randn_like(p) for p in params])  # ΔR
    for _ in range(steps_before):  # warm-up: the one-time tables are built
        opt.step(closure)
        scheduler.step()
    traffic = traffic_factory() if traffic_factory else None
    for _ in range(steps_after):
        opt.step(closure)
        scheduler.step()
    return traffic, [p.clone() for p in params]


@pytest.mark.parametrize("options", [{}, {"max_projected_grad": 0.5}], ids=["plain", "bounded-g"])
def test_a_step_reads_nothing_back_and_builds_no_tensor_from_python_numbers(monkeypatch, options):
    traffic, after = guided_run("cpu", 2, 6, lambda: HostTraffic(monkeypatch), **options)
    assert traffic.calls == []
    monkeypatch.undo()
    _, plain = guided_run("cpu", 2, 6, **options)
    assert all(torch.equal(a, b) for a, b in zip(after, plain))  # the patch observed, it did not change


def test_the_counter_sees_a_host_read(monkeypatch):
    # The instrument works: a host read in the step's files is seen.
    traffic = HostTraffic(monkeypatch)
    import zopro_kernels.optimizer as optimizer_module

    original = optimizer_module.ZOPrO._hyperparameters

    def with_a_read(self):
        float(torch.ones(()))  # what a careless lr table would do
        return original(self)

    monkeypatch.setattr(optimizer_module.ZOPrO, "_hyperparameters", with_a_read)
    with_a_read.__code__ = with_a_read.__code__.replace(co_filename=str(PACKAGE / "optimizer.py"))
    params = [torch.randn(4)]
    ZOPrO(params, backend="torch").step(lambda: float(params[0].sum()))
    assert any(call.startswith("__float__") for call in traffic.calls)


@pytest.mark.gpu
def test_no_sync_on_gpu_with_a_scheduler_and_a_float_closure():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    params = [torch.randn(64, 8, device="cuda"), torch.randn(300, device="cuda")]
    opt = ZOPrO(params, lr=1e-2, eps=1e-3, steps_per_iteration=8, direction_norm="noise", max_projected_grad=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    losses = iter(range(10**6))
    closure = lambda: float(next(losses) % 7)  # noqa: E731 - a float computed on the host
    opt.mark_iteration()
    for _ in range(3):
        opt.step(closure)
    opt.mark_iteration()
    opt.set_guidance(reward_delta=[torch.randn_like(p) for p in params])
    for _ in range(2):
        opt.step(closure)
        scheduler.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            opt.step(closure)
            scheduler.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
