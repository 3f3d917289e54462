"""The largest batch each method can train in a 24 GiB budget (GPU).

    python benchmarks/bench_budget.py                        # 1B bf16 and 8B NF4, zopro / adamw / adamw-ckpt
    python benchmarks/bench_budget.py --arch llama-3.1-8b --base nf4 --methods zopro --max-batch 128
    python benchmarks/bench_budget.py --arch tiny --dry-run --max-batch 4 ...   # plumbing only, no cap (CPU)

The process is capped with ``torch.cuda.set_per_process_memory_fraction(budget / total)`` (after the
model is built: the model counts against the cap). For each method, the batch (prompts per step, k
completions each) is doubled from ``--start-batch`` until a step runs out of memory, then bisected
between the last batch that fitted and the first that did not. A step is bench_step.py's: the three
scoring forwards and the method's update (two forwards for the zeroth-order methods, forward +
backward + AdamW for first order) over micro-batches of ``--micro-batch`` rows; by default 0, the
whole batch at once, so what is measured is how many rows each method can process at a time.
Completions are random token ids here: generation runs in chunks of ``--generation-batch`` rows
whatever the batch, so its memory is checked once per model, at that chunk size, not searched.

Targets: an 8B NF4 base with LoRA r=64 runs a ZOPrO step at batch 64 in 24 GiB (``--check-batch 64``
checks it at the micro-batch of ``--check-micro-batch``, default 16 rows).

Writes benchmarks/results/budget-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import (GiB, METHODS, Method, add_step_arguments, free_memory, generate_rollout,  # noqa: E402
                        memory_kind, peak_bytes, random_prompts, random_rollout, reset_peak, score, settings_from)
from results_io import command_argv, environment, environment_line, results_stem, write_results  # noqa: E402
from step_models import policy_and_reward, random_llama  # noqa: E402


class StopSearch(Exception):
    """Raised by a ``fits`` callable to end the search early (e.g. out of time)."""


@dataclass
class SearchResult:
    largest: int                       # the largest batch that fitted (0: none did)
    first_failure: int | None          # the smallest batch that did not fit (None: none failed)
    trials: list[tuple[int, bool]] = field(default_factory=list)  # (batch, fitted) in the order tried
    complete: bool = True              # False: stopped early, ``largest`` is a lower bound


def largest_fitting_batch(fits, *, start: int = 1, limit: int | None = None, resolution: int = 1) -> SearchResult:
    """The largest batch b with ``fits(b)``, assuming that fitting is monotone in b.

    Doubling from ``start`` until a batch fails (or ``limit`` is reached: ``limit`` itself is
    tried last), then bisection between the largest success and the smallest failure until they
    are ``resolution`` apart. ``fits`` may raise ``StopSearch``: the result so far is returned,
    marked incomplete.
    """
    if start < 1 or resolution < 1 or (limit is not None and limit < start):
        raise ValueError(f"need 1 ≤ start ≤ limit and resolution ≥ 1; got start={start}, limit={limit}, "
                         f"resolution={resolution}")
    result = SearchResult(largest=0, first_failure=None)

    def trial(batch: int) -> bool:
        ok = bool(fits(batch))
        result.trials.append((batch, ok))
        if ok:
            result.largest = max(result.largest, batch)
        elif result.first_failure is None or batch < result.first_failure:
            result.first_failure = batch
        return ok

    try:
        batch = start
        while trial(batch):
            if limit is not None and batch >= limit:
                return result
            batch = batch * 2 if limit is None else min(batch * 2, limit)
        low, high = result.largest, result.first_failure
        while high - low > resolution:
            middle = (low + high) // 2
            if trial(middle):
                low = middle
            else:
                high = middle
    except StopSearch:
        result.complete = False
    return result


# -- the GPU side ------------------------------------------------------------------------------

def out_of_memory_errors() -> tuple:
    return (torch.OutOfMemoryError,)


@dataclass
class Trial:
    fitted: bool
    peak_bytes: int | None
    seconds: float


def _one_step(method: Method, pair, settings, vocab: int, device) -> int:
    """Score and update once on random completions; the peak memory (its tensors die with this frame)."""
    rollout = random_rollout(random_prompts(settings, vocab, device), settings, vocab)
    method.update(score(pair, rollout, settings))
    return peak_bytes(device)


def run_trial(pair, method_name: str, settings, vocab: int, device) -> Trial:
    """One step at ``settings`` with a fresh optimizer; out of memory → not fitted (memory freed)."""
    started = time.perf_counter()
    fitted, peak, method = False, None, None
    reset_peak(device)
    try:
        method = Method(method_name, pair, settings)
        peak = _one_step(method, pair, settings, vocab, device)
        fitted = True
    except out_of_memory_errors():
        pass  # the failed step's frames go with the exception at the end of this block
    finally:
        if method is not None:
            method.close()
    del method
    free_memory(device)
    return Trial(fitted, peak, time.perf_counter() - started)


def generation_check(pair, settings, vocab: int, device) -> dict:
    """One generate call of ``generation_batch`` rows (the largest any step makes) under the cap."""
    rows = settings.generation_batch or settings.rows
    one_chunk = replace(settings, batch=max(1, rows // settings.k), generation_batch=rows)
    reset_peak(device)
    try:
        generate_rollout(pair, random_prompts(one_chunk, vocab, device), one_chunk)
        result = {"rows": one_chunk.rows, "fitted": True, "peak_bytes": peak_bytes(device)}
    except out_of_memory_errors():
        result = {"rows": one_chunk.rows, "fitted": False, "peak_bytes": None}
    free_memory(device)
    return result


def cap_memory(device, budget_bytes: int) -> dict:
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"budget_bytes": budget_bytes, "device_total_bytes": int(total), "fraction": fraction}


def search_config(arch, base, methods, settings, device, args, deadline: float) -> tuple[list[dict], dict]:
    model = random_llama(arch, base, device=device)
    vocab = model.config.vocab_size
    pair = policy_and_reward(model, r=args.lora_r, alpha=args.lora_alpha)
    free_memory(device)
    cap = cap_memory(device, int(args.budget_gib * GiB)) if not args.dry_run else None
    model_bytes = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    info = {"arch": arch, "base": base, "cap": cap, "model_and_adapters_bytes": model_bytes,
            "generation": generation_check(pair, settings, vocab, device)}
    rows = []
    for name in methods:
        peaks = {}

        def fits(batch: int) -> bool:
            if time.monotonic() > deadline:
                raise StopSearch
            trial = run_trial(pair, name, replace(settings, batch=batch), vocab, device)
            peaks[batch] = trial.peak_bytes
            print(f"[bench_budget] {arch} {base} {name} batch {batch}: "
                  f"{'fits' if trial.fitted else 'out of memory'} ({trial.seconds:.1f} s)", flush=True)
            return trial.fitted

        found = largest_fitting_batch(fits, start=args.start_batch, limit=args.max_batch, resolution=args.resolution)
        rows.append({"arch": arch, "base": base, "method": name, "largest_batch": found.largest,
                     "rows_at_once": found.largest * settings.k if not settings.micro_batch else settings.micro_batch,
                     "first_failure": found.first_failure, "limit": args.max_batch, "complete": found.complete,
                     "trials": [{"batch": b, "fitted": ok, "peak_bytes": peaks.get(b)} for b, ok in found.trials],
                     "peak_bytes_at_largest": peaks.get(found.largest), "micro_batch": settings.micro_batch})
    for batch in args.check_batch or []:
        check = replace(settings, batch=batch, micro_batch=args.check_micro_batch)
        trial = run_trial(pair, "zopro", check, vocab, device)
        rows.append({"arch": arch, "base": base, "method": "zopro", "check_batch": batch,
                     "micro_batch": args.check_micro_batch, "fitted": trial.fitted, "peak_bytes": trial.peak_bytes})
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return rows, info  # the model goes with this frame (the caller frees the cache)


def model_configs(archs: list[str] | None, bases: list[str] | None) -> list[tuple[str, str]]:
    """(arch, base) pairs: by default the issue's two shapes, the 1B in bf16 and the 8B on NF4;
    an arch without --base: bf16, except the 8B (NF4)."""
    if not archs:
        if bases:
            raise SystemExit("bench_budget: --base needs --arch")
        return [("llama-3.2-1b", "bf16"), ("llama-3.1-8b", "nf4")]
    if not bases:
        return [(a, "nf4" if a == "llama-3.1-8b" else "bf16") for a in archs]
    return [(a, b) for a in archs for b in bases]


def markdown(rows: list[dict], infos: list[dict], env: dict, args) -> str:
    budget = "no cap (dry run)" if args.dry_run else f"{args.budget_gib:g} GiB"
    lines = [f"Largest batch per step in {budget} — k={args.k}, prompt {args.prompt_len} + {args.new_tokens} tokens, "
             f"LoRA r={args.lora_r}, micro-batch {args.micro_batch or 'whole batch'}; search from {args.start_batch} "
             f"up to {args.max_batch} (doubling, then bisection).", "", environment_line(env), "",
             "| arch | base | method | largest batch (prompts) | first failure | peak GiB at largest | complete |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "check_batch" in r:
            continue
        peak = "—" if r["peak_bytes_at_largest"] is None else f"{r['peak_bytes_at_largest'] / GiB:.2f}"
        lines.append(f"| {r['arch']} | {r['base']} | {r['method']} | {r['largest_batch']} | "
                     f"{r['first_failure'] or '—'} | {peak} | {'yes' if r['complete'] else 'no (time limit)'} |")
    checks = [r for r in rows if "check_batch" in r]
    if checks:
        lines += ["", "| arch | base | ZOPrO step at batch | micro-batch | fits | peak GiB |", "|---|---|---|---|---|---|"]
        for r in checks:
            peak = "—" if r["peak_bytes"] is None else f"{r['peak_bytes'] / GiB:.2f}"
            lines.append(f"| {r['arch']} | {r['base']} | {r['check_batch']} | {r['micro_batch']} | "
                         f"{'yes' if r['fitted'] else 'no'} | {peak} |")
    lines.append(f"\nMemory: {memory_kind(torch.device(env['device']))}.")
    for info in infos:
        g = info["generation"]
        peak = "—" if g["peak_bytes"] is None else f"{g['peak_bytes'] / GiB:.2f} GiB"
        lines.append(f"\n{info['arch']} {info['base']}: generation of {g['rows']} rows at once "
                     f"{'fits' if g['fitted'] else 'does not fit'} (peak {peak}).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.set_defaults(arch=None, base=None, micro_batch=0)
    parser.add_argument("--methods", nargs="+", default=["zopro", "adamw", "adamw-ckpt"], choices=METHODS)
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--start-batch", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=1, help="stop bisecting when this close")
    parser.add_argument("--check-batch", type=int, nargs="*", default=[64],
                        help="also run a ZOPrO step at these batches (micro-batch --check-micro-batch)")
    parser.add_argument("--check-micro-batch", type=int, default=16)
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="stop searching after this long (the results then say the search is incomplete)")
    parser.add_argument("--dry-run", action="store_true", help="no memory cap (any device): checks the plumbing")
    parser.add_argument("--tag", default=None, help="added to the results file name")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("bench_budget: a memory budget needs a CUDA device (torch.cuda.set_per_process_memory_"
                         "fraction); on this machine only --dry-run works, which runs the search without a cap")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = model_configs(args.arch, args.base)
    settings = settings_from(args)
    env = environment(device, command_argv(__file__, argv))
    deadline = time.monotonic() + (args.time_limit_s if args.time_limit_s else float("inf"))
    stem = results_stem(args.out, "budget", env, args.tag)
    rows, infos = [], []
    for arch, base in configs:
        more, info = search_config(arch, base, args.methods, settings, device, args, deadline)
        free_memory(device)
        rows += more
        infos.append(info)
        table = markdown(rows, infos, env, args)  # written after each model: a time-out keeps what was found
        write_results(stem, env, rows, table, settings=vars(settings), budget_gib=None if args.dry_run else args.budget_gib,
                      dry_run=args.dry_run, models=infos)
    print(table)
    return rows


if __name__ == "__main__":
    main()
