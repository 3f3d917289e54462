"""Per-pass time and effective bandwidth of the ZO passes, against a device copy and two
per-tensor PyTorch baselines (the published ZOPrO perturbation and a MeZO-style loop, its
perturbation and its whole step).

    python benchmarks/bench_passes.py                      # GPU: 1B and 8B LoRA r=64 shapes
    python benchmarks/bench_passes.py --backend cuda       # csrc/'s kernels (libzopro_csrc.so)
    python benchmarks/bench_passes.py --arch llama-3.2-1b --device cpu --backend cpu torch --threads 1 2
                                                           # CPU: the compiled backend beside the reference
    python benchmarks/bench_passes.py --arch tiny --device cpu --backend torch   # smoke run

Writes benchmarks/results/passes-<device>-<backend>-<date>.json and .md (one backend), or
passes-<device>-<date> (several backends in one run, every row measured in the same process),
and prints the table. With ``--threads`` every row is timed at each thread count
(``torch.set_num_threads``; the compiled CPU backend takes the same count), and the markdown adds
the scaling from the first count to the last. On the CPU the markdown also says whether the CPU
targets are met (DESIGN.md §5).
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
from results_io import command_argv, environment, environment_line, results_stem, write_results  # noqa: E402

from zopro_kernels import ZOPrO  # noqa: E402

ALPHA = 0.5
# DESIGN.md §5, CPU: a guided perturb pass on the 1B shapes within 100 ms and >= 3x faster than
# MeZO's per-tensor loop; a whole guided step without forwards >= 4x faster than MeZO's step.
CPU_TARGETS = {"perturb_ms": 100.0, "perturb_vs_mezo": 3.0, "step_vs_mezo": 4.0}


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


def mezo_step(params, seed, eps, lr, projected_grad=0.5, weight_decay=0.0):
    """MeZO's zo_step and zo_update without the forwards: +εz, −2εz, +εz (back to θ), then the
    update regenerating z once more: four per-tensor loops over the weights."""
    mezo_perturbation(params, seed, eps)
    mezo_perturbation(params, seed, -2 * eps)
    mezo_perturbation(params, seed, eps)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
        p.data = p.data - lr * (projected_grad * z + weight_decay * p.data)


def zopro_rows(add, backend, params, policy, reward, device, reps, numel, size, prefix):
    """The passes of one backend: guided with fp32 or bf16 guidance storage, and unguided."""
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
        label = f"{prefix}zopro ({guidance} guidance)" if guided else f"{prefix}mezo-mode"
        guide_bytes = {"fp32": 8, "bf16": 4, None: 0}[guidance]  # Δπ and ΔR
        if guided:
            pset, kernel = engine.sets[0], engine.backends[0]
            add(f"{label} reduce", bench(lambda: kernel.zo_pass(
                pset, seed=seed, coefs=None, write_master=False, use_policy=False, reduce_seed=seed),
                device, reps), numel * guide_bytes // 2, backend)
        add(f"{label} perturb", bench(lambda: engine.apply_(
            seed, coefs, eps, ones, write_master=False, use_policy=guided), device, reps),
            numel * (4 + size + guide_bytes), backend)
        add(f"{label} update (+ next reduce)", bench(lambda: engine.apply_(
            seed, coefs, eps, ones, write_master=True, use_policy=guided,
            next_seed=seed + 1 if guided else None), device, reps),
            numel * (8 + size + guide_bytes), backend)
        zero = torch.zeros((), device=device)
        add(f"{label} whole step, no forward", bench(lambda: opt.step(lambda: zero), device, reps),
            numel * (3 * size + 16 + 3 * guide_bytes), backend)
        del opt, engine


def run(arch, backends, device, dtype, reps, threads=None):
    shapes = lora_shapes(arch)
    numel = sum(a * b for a, b in shapes)
    params = make_tensors(shapes, dtype, device, 0.01)
    policy = make_tensors(shapes, dtype, device, 1e-3)
    reward = make_tensors(shapes, dtype, device, 1e-3)
    rows = []

    def add(name, timing, bytes_moved, backend=None):
        gbps = bytes_moved / (timing["median_ms"] * 1e-3) / 1e9
        rows.append({"arch": arch, "pass": name, "backend": backend, "threads": threads, "tensors": len(shapes),
                     "values": numel, "bytes": bytes_moved, "GB/s": gbps,
                     "ns/value": timing["median_ms"] * 1e6 / numel, **timing})

    # Device copy of the bytes a perturb pass moves: the bandwidth ceiling.
    src = torch.empty(numel * 7, dtype=torch.int16, device=device)  # 14 B per value
    dst = torch.empty_like(src)
    add("device copy (ceiling)", bench(lambda: dst.copy_(src), device, reps), 2 * src.numel() * 2)
    del src, dst

    size = torch.tensor([], dtype=dtype).element_size()
    for backend in backends:
        prefix = f"{backend}: " if len(backends) > 1 else ""
        zopro_rows(add, backend, params, policy, reward, device, reps, numel, size, prefix)

    add("published per-tensor perturb", bench(
        lambda: published_perturbation(params, policy, reward, 7, 1e-3, ALPHA), device, reps),
        numel * 4 * size)
    add("MeZO per-tensor perturb", bench(lambda: mezo_perturbation(params, 7, 1e-3), device, reps),
        numel * 3 * size)
    add("MeZO per-tensor step, no forward (4 loops)", bench(lambda: mezo_step(params, 7, 1e-3, 1e-4), device, reps),
        numel * 12 * size)
    ceiling = rows[0]["GB/s"]
    for row in rows:
        row["% of copy"] = 100 * row["GB/s"] / ceiling
    return rows


def _row(rows, arch, threads, name):
    return next((r for r in rows if r["arch"] == arch and r["threads"] == threads and r["pass"] == name), None)


def cpu_targets(rows, backends) -> list[dict]:
    """The CPU targets per arch and compiled backend, at the largest thread count timed."""
    checks = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        counts = [r["threads"] for r in rows if r["arch"] == arch]
        threads = max(counts) if None not in counts else None
        mezo = _row(rows, arch, threads, "MeZO per-tensor perturb")
        mezo_whole = _row(rows, arch, threads, "MeZO per-tensor step, no forward (4 loops)")
        for backend in backends:
            prefix = f"{backend}: " if len(backends) > 1 else ""
            perturb = _row(rows, arch, threads, f"{prefix}zopro (fp32 guidance) perturb")
            step = _row(rows, arch, threads, f"{prefix}zopro (fp32 guidance) whole step, no forward")
            if not (perturb and step and mezo and mezo_whole):
                continue
            p_ms, s_ms = perturb["median_ms"], step["median_ms"]
            for what, value, goal, met in (
                (f"guided perturb ≤ {CPU_TARGETS['perturb_ms']:.0f} ms", f"{p_ms:.1f} ms",
                 CPU_TARGETS["perturb_ms"], p_ms <= CPU_TARGETS["perturb_ms"]),
                (f"guided perturb ≥ {CPU_TARGETS['perturb_vs_mezo']:.0f}× faster than MeZO's perturb loop",
                 f"{mezo['median_ms'] / p_ms:.1f}× ({mezo['median_ms']:.1f} ms / {p_ms:.1f} ms)",
                 CPU_TARGETS["perturb_vs_mezo"], mezo["median_ms"] / p_ms >= CPU_TARGETS["perturb_vs_mezo"]),
                (f"whole guided step (no forward) ≥ {CPU_TARGETS['step_vs_mezo']:.0f}× faster than MeZO's step",
                 f"{mezo_whole['median_ms'] / s_ms:.1f}× ({mezo_whole['median_ms']:.1f} ms / {s_ms:.1f} ms)",
                 CPU_TARGETS["step_vs_mezo"], mezo_whole["median_ms"] / s_ms >= CPU_TARGETS["step_vs_mezo"]),
            ):
                checks.append({"arch": arch, "backend": backend, "threads": threads, "target": what,
                               "measured": value, "goal": goal, "met": bool(met)})
    return checks


def scaling(rows) -> list[dict]:
    """Per arch and pass: time at the first and the last thread count, and the speed-up."""
    counts = list(dict.fromkeys(r["threads"] for r in rows))
    if len(counts) < 2 or None in counts:
        return []
    first, last = counts[0], counts[-1]
    out = []
    for r in rows:
        if r["threads"] != first:
            continue
        other = _row(rows, r["arch"], last, r["pass"])
        if other:
            out.append({"arch": r["arch"], "pass": r["pass"], "from": first, "to": last,
                        "ms_from": r["median_ms"], "ms_to": other["median_ms"],
                        "speedup": r["median_ms"] / other["median_ms"]})
    return out


def markdown(rows, env, targets=(), scale=()) -> str:
    threaded = any(r["threads"] is not None for r in rows)
    lines = [f"Passes over LoRA r=64 weights — {env.get('gpu') or env.get('cpu')}, {env['date']}, "
             f"backend {env.get('backend', 'auto')}, torch {env['torch']}, triton {env['triton']}", "",
             environment_line(env), "",
             "| arch | " + ("threads | " if threaded else "") + "pass | median ms | p20–p80 ms | ns/value | GB/s | % of copy |",
             "|---|" + ("---|" if threaded else "") + "---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | " + (f"{r['threads']} | " if threaded else "")
                     + f"{r['pass']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f}–{r['p80_ms']:.3f} "
                     f"| {r['ns/value']:.2f} | {r['GB/s']:.1f} | {r['% of copy']:.0f} |")
    if scale:
        lines += ["", f"Thread scaling ({scale[0]['from']} → {scale[0]['to']} threads):", "",
                  "| arch | pass | ms | ms | speed-up |", "|---|---|---|---|---|"]
        lines += [f"| {s['arch']} | {s['pass']} | {s['ms_from']:.1f} | {s['ms_to']:.1f} | {s['speedup']:.2f}× |"
                  for s in scale]
    if targets:
        lines += ["", "CPU targets (DESIGN.md §5), at the largest thread count timed:", "",
                  "| arch | backend | target | measured | met |", "|---|---|---|---|---|"]
        lines += [f"| {t['arch']} | {t['backend']} | {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |"
                  for t in targets]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--backend", nargs="+", default=["auto"],
                        help="one or more of auto, torch, triton, cuda, cpu (several: one results file)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", nargs="+", type=int, default=None,
                        help="CPU: time every row at each of these torch thread counts (e.g. 1 2)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device, command_argv(__file__, argv))
    env["backend"] = " ".join(args.backend)  # one results file per backend, or per run of several
    previous_threads = torch.get_num_threads()
    thread_counts = args.threads if args.threads and device.type == "cpu" else [None]
    rows = []
    try:
        for threads in thread_counts:
            if threads is not None:
                torch.set_num_threads(threads)
            for arch in args.arch:
                rows += run(arch, args.backend, device, getattr(torch, args.dtype), args.reps, threads)
    finally:
        torch.set_num_threads(previous_threads)
    targets = cpu_targets(rows, args.backend) if device.type == "cpu" else []
    scale = scaling(rows)
    table = markdown(rows, env, targets, scale)
    variant = args.backend[0] if len(args.backend) == 1 else None
    write_results(results_stem(args.out, "passes", env, variant), env, rows, table, targets=targets, scaling=scale)
    print(table)
    return rows


if __name__ == "__main__":
    main()
