"""Guided ZOPrO against unguided SPSA (MeZO) on a teacher-student regression, as the method runs.

Iteration 0 is first order (a few SGD steps, as the published method's iteration 0), shared by
both. Then one zeroth-order iteration from that point: ZOPrO guided by Δπ, the update iteration 0
made (formed by ``mark_iteration``, as a user would), against plain SPSA, at equal forward passes
(two per step). Δπ is not an oracle: it is what SGD did, on an ill-conditioned problem.

    python python/guided_vs_unguided.py --steps 150
"""

import argparse

import torch

from zopro_kernels import ZOPrO


def zo_iteration_losses(guided: bool, steps: int, seed: int = 0, *, first_order_steps: int = 5,
                        first_order_lr: float = 0.05, condition: float = 10.0) -> tuple[float, list[float]]:
    """(loss at the start of the ZO iteration, loss after each of its ``steps`` steps)."""
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(16, 32, generator=gen)
    model = torch.nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        model.weight.copy_(0.1 * torch.randn(16, 32, generator=gen))
    # input scales spread over √condition: curvatures over `condition`
    x = torch.randn(256, 32, generator=gen) * torch.logspace(0, -0.5 * torch.log10(torch.tensor(condition)), 32)
    y = x @ w_star.T

    def closure():
        return torch.nn.functional.mse_loss(model(x), y)

    optimizer = ZOPrO(model.parameters(), lr=1e-2, eps=1e-3, seed=seed, direction_norm="noise",
                      steps_per_iteration=steps)
    optimizer.mark_iteration()  # θ before iteration 0
    sgd = torch.optim.SGD(model.parameters(), lr=first_order_lr)
    for _ in range(first_order_steps):  # iteration 0: first order
        sgd.zero_grad()
        closure().backward()
        sgd.step()
    model.weight.grad = None
    optimizer.sync_from_model()  # the weights changed outside ZOPrO
    if guided:
        optimizer.mark_iteration()  # Δπ = iteration 0's update; α restarts near 1
    with torch.no_grad():
        start = closure().item()
        losses = []
        for _ in range(steps):
            optimizer.step(closure)
            losses.append(closure().item())
    return start, losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    for name, guided in (("guided ZOPrO", True), ("unguided SPSA", False)):
        start, losses = zo_iteration_losses(guided, args.steps)
        print(f"{name:>14}: loss {start:.3f} at the start of the ZO iteration, {losses[-1]:.3f} after "
              f"{args.steps} steps ({2 * args.steps} forward passes)")


if __name__ == "__main__":
    main()
