"""Per-pass time and effective bandwidth of the ZO passes, against a device copy and two
per-tensor PyTorch baselines (the published ZOPrO perturbation and a MeZO-style loop).

    python benchmarks/bench_passes.py                      # GPU: 1B and 8B LoRA r=64 shapes
    python benchmarks/bench_passes.py --backend cuda       # csrc/'s kernels (libzopro_csrc.so)
    python benchmarks/bench_passes.py --arch tiny --device cpu --backend torch   # smoke run

Writes benchmarks/results/passes-<device>-<backend>-<date>.json and .md (and prints the table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_shapes import lora_shapes  # noqa: E402
from results_io import command_argv, environment, results_stem, write_results  # noqa: E402

from zopro_kernels import ZOPrO  # noqa: E402

ALPHA = 0.5


def bench(fn, device, reps: int) -> dict:
    """Median and quantiles in ms: CUDA events via triton's do_bench on GPU, wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=25, rep=max(reps, 100), quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p20_ms": times[len(times) // 5],
            "p80_ms": times[(4 * len(times)) // 5]}


def make_tensors(shapes, dtype, device, scale):
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, device=device, dtype=dtype, generator=gen) * scale for s in shapes]


def published_perturbation(params, policy, reward, seed, eps, alpha):
    """The authors' algorithm as per-tensor PyTorch: draw, project off ΔR, rescale, add."""
    torch.manual_seed(seed)
    for p, dpi, dr in zip(params, policy, reward):
        n = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
        r_hat = dr / dr.norm()
        u = n - (n * r_hat).sum() * r_hat
        z = alpha * dpi + (1 - alpha**2) ** 0.5 * u / u.norm() * dpi.norm()
        p.data.add_(eps * z)


def mezo_perturbation(params, seed, eps):
    """MeZO's zo_perturb_parameters: reseed, one normal draw per tensor, add in place."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
        p.data = p.data + eps * z


def run(arch, backend, device, dtype, reps):
    shapes = lora_shapes(arch)
    numel = sum(a * b for a, b in shapes)
    params = make_tensors(shapes, dtype, device, 0.01)
    policy = make_tensors(shapes, dtype, device, 1e-3)
    reward = make_tensors(shapes, dtype, device, 1e-3)
    rows = []

    def add(name, timing, bytes_moved):
        gbps = bytes_moved / (timing["median_ms"] * 1e-3) / 1e9
        rows.append({"arch": arch, "pass": name, "tensors": len(shapes), "values": numel,
                     "bytes": bytes_moved, "GB/s": gbps, **timing})

    # Device copy of the bytes a perturb pass moves: the bandwidth ceiling.
    src = torch.empty(numel * 7, dtype=torch.int16, device=device)  # 14 B per value
    dst = torch.empty_like(src)
    add("device copy (ceiling)", bench(lambda: dst.copy_(src), device, reps), 2 * src.numel() * 2)

    size = torch.tensor([], dtype=dtype).element_size()
    # Guided with Δπ, ΔR stored in fp32 or bf16 (guidance_dtype), and unguided (MeZO mode).
    for guidance in ("fp32", "bf16", None):
        guided = guidance is not None
        guidance_dtype = torch.bfloat16 if guidance == "bf16" else torch.float32
        opt = ZOPrO(params, lr=1e-4, eps=1e-3, alpha=ALPHA, backend=backend, guidance_dtype=guidance_dtype)
        if guided:
            opt.set_guidance(policy_delta=policy, reward_delta=reward)
        engine = opt._ensure_engine()
        seed = 12345
        coefs = engine.coefficients(seed, ALPHA)
        eps = [h[1] for h in opt._hyperparameters()]
        ones = [torch.ones_like(e) for e in eps]
        label = f"zopro ({guidance} guidance)" if guided else "mezo-mode"
        guide_bytes = {"fp32": 8, "bf16": 4, None: 0}[guidance]  # Δπ and ΔR
        if guided:
            pset, kernel = engine.sets[0], engine.backends[0]
            add(f"{label} reduce", bench(lambda: kernel.zo_pass(
                pset, seed=seed, coefs=None, write_master=False, use_policy=False, reduce_seed=seed),
                device, reps), numel * guide_bytes // 2)
        add(f"{label} perturb", bench(lambda: engine.apply_(
            seed, coefs, eps, ones, write_master=False, use_policy=guided), device, reps),
            numel * (4 + size + guide_bytes))
        add(f"{label} update (+ next reduce)", bench(lambda: engine.apply_(
            seed, coefs, eps, ones, write_master=True, use_policy=guided,
            next_seed=seed + 1 if guided else None), device, reps),
            numel * (8 + size + guide_bytes))
        zero = torch.zeros((), device=device)
        add(f"{label} whole step, no forward", bench(lambda: opt.step(lambda: zero), device, reps),
            numel * (3 * size + 16 + 3 * guide_bytes))

    add("published per-tensor perturb", bench(
        lambda: published_perturbation(params, policy, reward, 7, 1e-3, ALPHA), device, reps),
        numel * 4 * size)
    add("MeZO per-tensor perturb", bench(lambda: mezo_perturbation(params, 7, 1e-3), device, reps),
        numel * 3 * size)
    ceiling = rows[0]["GB/s"]
    for row in rows:
        row["% of copy"] = 100 * row["GB/s"] / ceiling
    return rows


def markdown(rows, env) -> str:
    lines = [f"Passes over LoRA r=64 weights — {env.get('gpu') or env.get('cpu')}, {env['date']}, "
             f"backend {env.get('backend', 'auto')}, torch {env['torch']}, triton {env['triton']}", "",
             "| arch | pass | median ms | p20–p80 ms | GB/s | % of copy |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['pass']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f}–{r['p80_ms']:.3f} "
                     f"| {r['GB/s']:.0f} | {r['% of copy']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device, command_argv(__file__, argv))
    env["backend"] = args.backend  # auto | torch | triton | cuda: one results file per backend
    rows = []
    for arch in args.arch:
        rows += run(arch, args.backend, device, getattr(torch, args.dtype), args.reps)
    table = markdown(rows, env)
    write_results(results_stem(args.out, "passes", env, args.backend), env, rows, table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
