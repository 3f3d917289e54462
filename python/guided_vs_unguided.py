"""Guided ZOPrO against unguided SPSA (MeZO) on a teacher-student regression.

The "previous policy update" Δπ points partly towards the optimum, as consecutive policy updates
do in the method's analysis; ZOPrO follows it while α is near 1 and needs far fewer steps.

    python python/guided_vs_unguided.py --steps 400
"""

import argparse

import torch

from zopro_kernels import ZOPrO


def steps_to_quarter_loss(guided: bool, steps: int, seed: int = 0) -> int | None:
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(16, 32, generator=gen)
    model = torch.nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        model.weight.copy_(0.1 * torch.randn(16, 32, generator=gen))
    x = torch.randn(256, 32, generator=gen)
    y = x @ w_star.T

    def closure():
        return torch.nn.functional.mse_loss(model(x), y)

    optimizer = ZOPrO(model.parameters(), lr=1e-2, eps=1e-3, seed=seed, alpha="linear",
                      steps_per_iteration=steps)
    if guided:
        policy_delta = 0.2 * (w_star - model.weight.detach()) + 0.05 * torch.randn(16, 32, generator=gen)
        optimizer.set_guidance(policy_delta=[policy_delta])
    target = 0.25 * closure().item()
    for step in range(steps):
        optimizer.step(closure)
        if closure().item() < target:
            return step + 1
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    for name, guided in (("guided ZOPrO", True), ("unguided SPSA", False)):
        reached = steps_to_quarter_loss(guided, args.steps)
        print(f"{name:>14}: {'did not reach' if reached is None else reached} "
              f"{'' if reached is None else 'steps to '}a quarter of the initial loss (budget {args.steps})")


if __name__ == "__main__":
    main()
