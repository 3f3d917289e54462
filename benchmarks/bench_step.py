"""The cost of one RLOO step per optimizer: wall time, samples/s, peak memory, non-forward share.

    python benchmarks/bench_step.py                          # GPU: 1B and 8B, bf16 and NF4 bases
    python benchmarks/bench_step.py --arch llama-3.1-8b --base nf4 --profile
    python benchmarks/bench_step.py --arch tiny --device cpu --batch 2 --prompt-len 8 --new-tokens 4 \\
        --k 2 --reps 1 --warmup 0                            # smoke run anywhere

A step, as the RLOO loop runs it (the loop's own building blocks, zopro_kernels.rloo): k completions
per prompt are generated (KV-cached ``generate`` on random prompt ids, exactly ``--new-tokens`` each),
scored (π_old and π_ref log-probabilities and the reward model: three forward passes) and the
policy's LoRA weights are updated from the RLOO objective J by

    zopro       ZOPrO, guided (Δπ and ΔR set): J at θ+εz and θ−εz, the fused passes
    mezo        the same kernels unguided (plain SPSA)
    published   the authors' per-tensor PyTorch perturbation (bench_passes.published_perturbation)
                around the same two forward passes: +εz, −2εz, +εz, then the update −ηg·z
    adamw       first-order RLOO: J's backward, torch.optim.AdamW
    adamw-ckpt  the same with activation checkpointing (less memory, a recomputed forward)

Forward and backward passes run over micro-batches of ``--micro-batch`` rows (gradients
accumulated), generation over ``--generation-batch`` rows. Reported per method: step time without
and with generation (medians over ``--reps`` after ``--warmup`` steps; CUDA events on a GPU),
samples/s (= prompts·k / step time), peak memory (``torch.cuda.max_memory_allocated``; on a CPU the
process's peak RSS, which only grows and says little per method), and the non-forward share: the
step minus its forward passes timed alone at fixed weights (3 scoring passes + 2 evaluations of J
for the zeroth-order methods, + 1 for AdamW, whose backward is then counted as non-forward).

Writes benchmarks/results/step-<device>-<date>.{json,md,png}; ``--profile`` adds a torch.profiler
table of one step of the zeroth-order methods (``step-...-profile-<arch>-<base>-<method>.txt``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_passes import ALPHA, published_perturbation  # noqa: E402
from results_io import (command_argv, environment, environment_line, matplotlib_pyplot,  # noqa: E402
                        results_stem, write_results)
from step_models import policy_and_reward, random_llama  # noqa: E402

from zopro_kernels import ZOPrO  # noqa: E402
from zopro_kernels.rloo.loop import peak_memory_bytes as peak_bytes  # noqa: E402  (the loop's own measure)
from zopro_kernels.rloo.objective import policy_loss, score_rollout  # noqa: E402
from zopro_kernels.rloo.sampling import Rollout  # noqa: E402

METHODS = ("zopro", "mezo", "published", "adamw", "adamw-ckpt")
ZEROTH_ORDER = ("zopro", "mezo", "published")
GiB = 1 << 30


@dataclass
class StepSettings:
    batch: int = 64            # prompts per step
    k: int = 4                 # completions per prompt
    prompt_len: int = 512
    new_tokens: int = 53
    micro_batch: int = 16      # rows per forward/backward (0: the whole batch at once)
    generation_batch: int = 64  # rows per generate call (0: the whole batch at once)
    logprob_chunk: int = 64    # sequence positions per vocabulary projection (the loop's default)
    beta: float = 0.05
    lr: float = 1e-6
    eps: float = 1e-3
    backend: str = "auto"

    @property
    def rows(self) -> int:
        return self.batch * self.k


# -- timing and memory ---------------------------------------------------------------------------

def timed(fn, device: torch.device):
    """(fn's result, milliseconds): CUDA events around it on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end)
    started = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - started) * 1e3


def reset_peak(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def memory_kind(device: torch.device) -> str:
    return "cuda max_memory_allocated" if device.type == "cuda" else "cpu process peak RSS (cumulative)"


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p20": ordered[len(ordered) // 5],
            "p80": ordered[(4 * len(ordered)) // 5] if len(ordered) > 1 else ordered[0]}


# -- the step's parts --------------------------------------------------------------------------

def random_prompts(settings: StepSettings, vocab: int, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (settings.batch, settings.prompt_len), generator=gen)  # no pad/bos/eos ids
    return ids.to(device)


def rollout_from(prompt_ids: torch.Tensor, completion_ids: torch.Tensor, k: int) -> Rollout:
    """A Rollout of prompts (each repeated k times) and completions of full length (no eos)."""
    rows = prompt_ids.repeat_interleave(k, dim=0)
    input_ids = torch.cat([rows, completion_ids], dim=1)
    completion_mask = torch.ones_like(completion_ids)
    return Rollout(prompts=[""] * prompt_ids.shape[0], completions=[""] * rows.shape[0], k=k,
                   input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                   completion_mask=completion_mask, prompt_length=prompt_ids.shape[1])


@torch.no_grad()
def generate_rollout(pair, prompt_ids: torch.Tensor, settings: StepSettings, seed: int = 0) -> Rollout:
    """k sampled completions per prompt from the policy adapter, exactly ``new_tokens`` long."""
    rows = prompt_ids.repeat_interleave(settings.k, dim=0)
    chunk = settings.generation_batch or rows.shape[0]
    model = pair.model
    model.eval()
    torch.manual_seed(seed)
    pieces = []
    with pair.adapter(pair.policy_adapter):
        for part in rows.split(chunk):
            out = model.generate(input_ids=part, attention_mask=torch.ones_like(part), do_sample=True,
                                 max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens,
                                 temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=2,
                                 use_cache=True)
            pieces.append(out[:, part.shape[1]:])
    return rollout_from(prompt_ids, torch.cat(pieces), settings.k)


def random_rollout(prompt_ids: torch.Tensor, settings: StepSettings, vocab: int, seed: int = 1) -> Rollout:
    """Completions of random token ids: the step without generation costs the same."""
    gen = torch.Generator().manual_seed(seed)
    completion = torch.randint(3, vocab, (settings.rows, settings.new_tokens), generator=gen)
    return rollout_from(prompt_ids, completion.to(prompt_ids.device), settings.k)


def micro_batches(rollout: Rollout, settings: StepSettings) -> list[list[int]]:
    """Prompt indices per micro-batch (whole prompts: leave-one-out needs the k rows together)."""
    per = max(1, (settings.micro_batch or rollout.input_ids.shape[0]) // rollout.k)
    n = len(rollout.prompts)
    return [list(range(start, min(start + per, n))) for start in range(0, n, per)]


def score(pair, rollout: Rollout, settings: StepSettings) -> list[tuple]:
    """(ScoredBatch, weight) per micro-batch: π_old, π_ref and reward-model forwards, advantages."""
    parts = micro_batches(rollout, settings)
    n = len(rollout.prompts)
    return [(score_rollout(pair, rollout.select_prompts(p), beta=settings.beta, chunk_size=settings.logprob_chunk),
             len(p) / n) for p in parts]


def objective(pair, scored: list[tuple], settings: StepSettings) -> torch.Tensor:
    """J over the whole batch (the weighted mean of the micro-batches' means), no gradients kept."""
    return sum(policy_loss(pair, batch, chunk_size=settings.logprob_chunk) * weight for batch, weight in scored)


class Method:
    """One optimizer's update of the policy LoRA weights from a scored batch."""

    def __init__(self, name: str, pair, settings: StepSettings, seed: int = 0):
        if name not in METHODS:
            raise ValueError(f"method {name!r} is not one of {METHODS}")
        self.name, self.pair, self.settings = name, pair, settings
        self.params = [p for _, p in pair.named_policy_parameters()]
        self.forward_passes = 2 if name in ZEROTH_ORDER else 1  # evaluations of J per update
        self.optimizer = None
        self.step_index = 0
        gen = torch.Generator().manual_seed(seed)

        def delta(scale):
            return [(torch.randn(p.shape, generator=gen) * scale).to(p.device, p.dtype) for p in self.params]

        if name in ("zopro", "published"):
            self.policy_delta, self.reward_delta = delta(1e-3), delta(1.0)
        if name in ("zopro", "mezo"):
            self.optimizer = ZOPrO(pair.named_policy_parameters(), lr=settings.lr, eps=settings.eps, seed=seed,
                                   alpha=ALPHA, backend=settings.backend)
            if name == "zopro":
                self.optimizer.set_guidance(policy_delta=self.policy_delta, reward_delta=self.reward_delta)
                del self.policy_delta, self.reward_delta  # the optimizer holds its own copies
        elif name.startswith("adamw"):
            self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr)
        if name == "adamw-ckpt":
            enable = getattr(pair.model.get_base_model(), "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                pair.model.get_base_model().gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})

    def close(self):
        """Leave the model as it was: no checkpointing, no optimizer state."""
        if self.name == "adamw-ckpt":
            base = self.pair.model.get_base_model()
            disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
            disable()
        for p in self.params:
            p.grad = None
        self.optimizer = None

    def update(self, scored: list[tuple]):
        s = self.settings
        if self.name in ("zopro", "mezo"):
            self.optimizer.step(lambda: objective(self.pair, scored, s))
        elif self.name == "published":
            self.published_step(scored)
        else:
            self.first_order_step(scored)
        self.step_index += 1

    @torch.no_grad()
    def published_step(self, scored):
        s, seed = self.settings, 1000 + self.step_index
        perturb = lambda scale: published_perturbation(  # noqa: E731
            self.params, self.policy_delta, self.reward_delta, seed, scale, ALPHA)
        perturb(s.eps)
        loss_plus = objective(self.pair, scored, s)
        perturb(-2 * s.eps)
        loss_minus = objective(self.pair, scored, s)
        perturb(s.eps)
        grad = float(loss_plus - loss_minus) / (2 * s.eps)  # the reference syncs here too
        perturb(-s.lr * grad)

    def first_order_step(self, scored):
        model = self.pair.model
        if self.name == "adamw-ckpt":
            model.train()  # checkpointing is active in training mode only (no dropout in these models)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                for batch, weight in scored:
                    (policy_loss(self.pair, batch, chunk_size=self.settings.logprob_chunk) * weight).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            model.eval()


# -- one configuration ---------------------------------------------------------------------------

@torch.no_grad()
def plain_forward_ms(pair, scored, settings: StepSettings, device, reps: int) -> float:
    """One evaluation of J at fixed weights: the forward cost a zeroth-order update pays twice."""
    objective(pair, scored, settings)
    return statistics.median(timed(lambda: objective(pair, scored, settings), device)[1] for _ in range(reps))


def profile_step(method: Method, pair, rollout, settings, device, path: Path):
    """A torch.profiler table (top operators by self time) of one step without generation."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        method.update(score(pair, rollout, settings))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30))
    return str(path)


def measure_method(name, pair, rollout, settings: StepSettings, device, *, warmup: int, reps: int,
                   forward_ms: float, profile_path: Path | None = None) -> dict:
    """Score + update steps of one method on a fixed rollout: times, peak memory, non-forward share."""
    method = Method(name, pair, settings)
    times = {"score": [], "update": []}
    peak = 0
    try:
        for rep in range(warmup + reps):
            reset_peak(device)
            scored, score_ms = timed(lambda: score(pair, rollout, settings), device)
            _, update_ms = timed(lambda: method.update(scored), device)
            peak = max(peak, peak_bytes(device))
            scored = None  # freed before the next step's scoring
            if rep >= warmup:
                times["score"].append(score_ms)
                times["update"].append(update_ms)
        profile = None
        if profile_path is not None and name in ZEROTH_ORDER:
            profile = profile_step(method, pair, rollout, settings, device, profile_path)
    finally:
        method.close()
    step_q = quantiles([a + b for a, b in zip(times["score"], times["update"])])
    score_ms, update_ms = statistics.median(times["score"]), statistics.median(times["update"])
    forwards_ms = score_ms + method.forward_passes * forward_ms  # every forward pass of the step, timed alone
    return {"method": name, "step_ms": step_q["median"], "step_p20_ms": step_q["p20"], "step_p80_ms": step_q["p80"],
            "score_ms": score_ms, "update_ms": update_ms, "plain_forward_ms": forward_ms,
            "forward_passes": 3 + method.forward_passes,
            "samples_per_s": settings.rows / (step_q["median"] / 1e3),
            "non_forward_ms": step_q["median"] - forwards_ms,
            "non_forward_share": (step_q["median"] - forwards_ms) / step_q["median"],
            "update_over_plain_forwards": update_ms / (method.forward_passes * forward_ms),
            "peak_memory_bytes": peak, "profile": profile}


def run_config(arch: str, base: str, methods, settings: StepSettings, device, *, lora_r: int, lora_alpha: int,
               warmup: int, reps: int, profile_stem: Path | None = None) -> list[dict]:
    """Every method on one model. Generation does not depend on the optimizer: it is timed once per
    model (``reps`` times after ``warmup``) and its median added to each method's step."""
    model = random_llama(arch, base, device=device)
    vocab = model.config.vocab_size
    pair = policy_and_reward(model, r=lora_r, alpha=lora_alpha)
    initial = {slot: t.cpu() for slot, t in pair.policy_tensors().items()}  # off the device: not in any peak
    prompt_ids = random_prompts(settings, vocab, device)
    shared = {"arch": arch, "base": base, "batch": settings.batch, "k": settings.k,
              "prompt_len": settings.prompt_len, "new_tokens": settings.new_tokens,
              "micro_batch": settings.micro_batch, "generation_batch": settings.generation_batch,
              "lora_r": lora_r, "lora_tensors": len(initial),
              "trainable_values": sum(t.numel() for t in initial.values()),
              "memory_kind": memory_kind(device), "warmup": warmup, "reps": reps}
    generation_ms, generation_peak = [], 0
    for rep in range(warmup + reps):
        reset_peak(device)
        rollout, ms = timed(lambda: generate_rollout(pair, prompt_ids, settings, seed=rep), device)
        generation_peak = max(generation_peak, peak_bytes(device))
        if rep >= warmup:
            generation_ms.append(ms)
    generation = statistics.median(generation_ms)
    forward_ms = plain_forward_ms(pair, score(pair, rollout, settings), settings, device, max(1, reps))
    free_memory(device)
    rows = []
    for name in methods:
        pair.load_adapter_tensors("policy", initial)
        free_memory(device)
        profile_path = Path(f"{profile_stem}-profile-{arch}-{base}-{name}.txt") if profile_stem else None
        try:
            row = measure_method(name, pair, rollout, settings, device, warmup=warmup, reps=reps,
                                 forward_ms=forward_ms, profile_path=profile_path)
        except torch.OutOfMemoryError:
            row = None
        free_memory(device)
        if row is None:  # recorded, and the other methods still run
            print(f"[bench_step] {arch} {base} {name}: out of memory", flush=True)
            rows.append(shared | {"method": name, "error": "out of memory"})
            continue
        with_generation = row["step_ms"] + generation
        rows.append(shared | row | {
            "generation_ms": generation, "step_with_generation_ms": with_generation,
            "samples_per_s_with_generation": settings.rows / (with_generation / 1e3),
            "peak_memory_with_generation_bytes": max(row["peak_memory_bytes"], generation_peak)})
    return rows  # the model goes with this frame (the caller frees the cache)


# -- targets, table, plot -------------------------------------------------------------------------

def target_checks(rows: list[dict]) -> list[dict]:
    """The issue's targets per (arch, base): ZOPrO vs first-order RLOO (AdamW) at the same batch."""
    checks = []
    for arch, base in dict.fromkeys((r["arch"], r["base"]) for r in rows):
        by = {r["method"]: r for r in rows if r["arch"] == arch and r["base"] == base}
        zo = by.get("zopro")
        if zo is None or "error" in zo:
            continue

        def check(name, value, goal, higher_is_better, note=None):
            met = value is not None and (value >= goal if higher_is_better else value <= goal)
            checks.append({"arch": arch, "base": base, "target": name, "value": value, "goal": goal,
                           "met": bool(met) if value is not None else None,
                           "shortfall": None if value is None or met else abs(value - goal), "note": note})

        check("non-forward share of a ZOPrO step ≤ 2 %", zo["non_forward_share"], 0.02, False)
        check("ZOPrO update ≤ 1.05 × two plain forwards", zo["update_over_plain_forwards"], 1.05, False)
        for first_order in ("adamw", "adamw-ckpt"):
            fo = by.get(first_order)
            if fo is None:
                continue
            if "error" in fo:
                check(f"ZOPrO peak memory ≤ 0.5 × {first_order}", None, 0.5, False,
                      note=f"{first_order}: {fo['error']} at this batch; ZOPrO ran")
                continue
            if zo["memory_kind"].startswith("cuda"):
                check(f"ZOPrO peak memory ≤ 0.5 × {first_order}",
                      zo["peak_memory_bytes"] / fo["peak_memory_bytes"], 0.5, False)
            check(f"ZOPrO samples/s ≥ 1.5 × {first_order}", zo["samples_per_s"] / fo["samples_per_s"], 1.5, True)
    return checks


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict], checks: list[dict], env: dict) -> str:
    s = rows[0] if rows else {}
    lines = [f"One RLOO step — batch {s.get('batch')} prompts × k={s.get('k')}, prompt {s.get('prompt_len')} "
             f"+ {s.get('new_tokens')} new tokens, LoRA r={s.get('lora_r')} on all linear layers, micro-batch "
             f"{s.get('micro_batch')} rows; medians of {s.get('reps')} steps after {s.get('warmup')} warm-up.",
             "", environment_line(env), "",
             "| arch | base | method | step ms (no gen.) | step ms (with gen.) | samples/s (no gen.) | "
             "samples/s (with gen.) | peak GiB | non-forward share | update / plain forwards |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['base']} | {r['method']} | {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['arch']} | {r['base']} | {r['method']} | {r['step_ms']:.1f} | "
                     f"{r['step_with_generation_ms']:.1f} | {r['samples_per_s']:.1f} | "
                     f"{r['samples_per_s_with_generation']:.1f} | {r['peak_memory_bytes'] / GiB:.2f} | "
                     f"{100 * r['non_forward_share']:.1f} % | {r['update_over_plain_forwards']:.3f} |")
    if rows and not rows[0]["memory_kind"].startswith("cuda"):
        lines += ["", f"Peak memory here is the {rows[0]['memory_kind']}: it only grows over the run, so it "
                      "does not compare methods; the memory targets need a GPU."]
    if checks:
        lines += ["", "| arch | base | target | value | met | short by |", "|---|---|---|---|---|---|"]
        for c in checks:
            met = {True: "yes", False: "no", None: c.get("note") or "—"}[c["met"]]
            lines.append(f"| {c['arch']} | {c['base']} | {c['target']} | {_fmt(c['value'], '.3f')} | {met} | "
                         f"{_fmt(c['shortfall'], '.3f')} |")
    profiles = [r["profile"] for r in rows if r.get("profile")]
    if profiles:
        lines += ["", "Profiles (torch.profiler, one step): " + ", ".join(f"`{Path(p).name}`" for p in profiles)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> str | None:
    plt = matplotlib_pyplot()
    rows = [r for r in rows if "error" not in r]
    if plt is None or not rows:
        return None
    configs = list(dict.fromkeys(f"{r['arch']}\n{r['base']}" for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("samples_per_s", "samples/s (generation excluded)", 1), ("peak_memory_bytes", "peak memory, GiB", 1 / GiB))
    for panel, (key, label, scale) in zip(axes, panels):
        for i, method in enumerate(methods):
            values = [next((r[key] * scale for r in rows if f"{r['arch']}\n{r['base']}" == c and r["method"] == method),
                           math.nan) for c in configs]
            panel.bar([j + i * width for j in range(len(configs))], values, width, label=method)
        panel.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], configs)
        panel.set_ylabel(label)
    axes[1].set_title(rows[0]["memory_kind"], fontsize=9)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)


def merged_rows(stem: Path, new_rows: list[dict], settings: dict) -> tuple[list[dict], list[dict]]:
    """Rows of an earlier run written to the same file (same settings), minus those re-measured now,
    then the new ones; and the earlier runs' environments. Lets a long benchmark be split into
    several commands (e.g. one per model on a device with a per-command time limit)."""
    path = stem.with_suffix(".json")
    if not path.exists():
        return new_rows, []
    earlier = json.loads(path.read_text())
    if earlier.get("settings") != settings:
        raise SystemExit(f"--merge: {path} was measured with other settings {earlier.get('settings')}; "
                         f"use another --tag or --out")
    fresh = {(r["arch"], r["base"], r["method"]) for r in new_rows}
    kept = [r for r in earlier["results"] if (r["arch"], r["base"], r["method"]) not in fresh]
    environments = earlier.get("earlier_environments", []) + [earlier["environment"]]
    return kept + new_rows, environments


def settings_from(args) -> StepSettings:
    return StepSettings(batch=args.batch, k=args.k, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                        micro_batch=args.micro_batch, generation_batch=args.generation_batch,
                        logprob_chunk=args.logprob_chunk, backend=args.backend)


def add_step_arguments(parser: argparse.ArgumentParser):
    """The model and step settings shared with bench_budget.py."""
    parser.add_argument("--arch", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--base", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64, help="prompts per step")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=53)
    parser.add_argument("--micro-batch", type=int, default=16, help="rows per forward/backward (0: all)")
    parser.add_argument("--generation-batch", type=int, default=64, help="rows per generate call (0: all)")
    parser.add_argument("--logprob-chunk", type=int, default=64)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=128)
    parser.add_argument("--backend", default="auto", help="ZOPrO backend: auto | torch | triton | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="a torch.profiler table of each ZO method's step")
    parser.add_argument("--tag", default=None, help="added to the results file name")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an earlier run in the same results file (same settings)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device, command_argv(__file__, argv))
    stem = results_stem(args.out, "step", env, args.tag)
    stem.parent.mkdir(parents=True, exist_ok=True)
    settings = settings_from(args)
    rows = []
    for arch in args.arch:
        for base in args.base:
            rows += [r | {"command": env["command"]} for r in run_config(
                arch, base, args.methods, settings, device, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                warmup=args.warmup, reps=args.reps, profile_stem=stem if args.profile else None)]
            free_memory(device)
            print(f"[bench_step] {arch} {base}: done", flush=True)
            table = write_step_results(stem, env, rows, vars(settings), args.merge)  # after each model
    print(table)
    return rows


def write_step_results(stem: Path, env: dict, rows: list[dict], settings: dict, merge: bool) -> str:
    earlier = []
    if merge:
        rows, earlier = merged_rows(stem, rows, settings)
    checks = target_checks(rows)
    table = markdown(rows, checks, env)
    png = plot(rows, stem.with_suffix(".png"))
    write_results(stem, env, rows, table, settings=settings, targets=checks, plot=png, earlier_environments=earlier)
    return table

if __name__ == "__main__":
    main()
