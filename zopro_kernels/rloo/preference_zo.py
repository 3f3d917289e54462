"""Preference-only zeroth order: ZPG, ZBCPG and ZO-RankSGD on ZOPrO's engine (no reward model).

The policy is perturbed in place by the engine's passes (noise from (seed, global index), never
stored; fp32 master weights, so θ₀ ± εz restores bit for bit), completions are sampled from the
perturbed policies, the judge compares them, and the update θ₀ ← θ₀(1 − ηλ) + η·ĝ is one more
pass per direction. docs/preference_zo.md has the estimators, their sources and the settings.

z is ε-scaled as in the rest of the engine: θ ± εz. "sphere" draws z = √d·n/‖n‖ (d values; the
published v uniform on the unit sphere with perturbation radius μ = ε√d, so (d/μ)·Δ̂·v = (Δ̂/ε)·z),
"gaussian" z = n ~ N(0, I); the guided variants take ZOPrO's eq. 2 z (Δπ of the last iteration,
no ΔR). With a value difference estimate Δ̂ per prompt (the trimmed inverse link of the judge's
empirical preference p̂):

    zpg     ĝ = mean_prompts(Δ̂) / ε · z               (one-sided: θ₀+εz against θ₀, published)
            ĝ = mean_prompts(Δ̂) / (2ε) · z            (two-sided: θ₀+εz against θ₀−εz)
            Δ̂ = F⁻¹(clip(p̂, δ, 1 − δ)),  p̂ = (wins + ties/2) / answered queries
    zbcpg   the same per block B_j of tensors (z zero outside B_j; sphere over B_j's d_j values),
            ``blocks`` blocks per step, each from its share of the step's prompts
    zorank  m perturbed policies θ₀ + εz_i (two-sided: m/2 directions, ±), all pairs of their
            completions judged per prompt: ĝ = Σ_i w_i z_i with
            w_i = mean_prompts((wins_i − losses_i) / |E|), |E| the answered non-tie queries
            (the rank estimator of Tang et al. on the comparison graph; no 1/ε)

``PreferencePasses`` (a ZOPrO) drives the engine; ``PreferenceEstimator`` is one step of a mode
for any sampler and comparer (a softmax toy in the tests, LLM completions and a judge here);
``PreferenceLoop`` is the RLOO loop's dispatch target for ``optimizer: zpg | zbcpg | zorank``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..optimizer import ZOPrO
from ..seeds import step_seed
from .judges import Comparisons, JudgeError, compare_many
from .links import check_link, inverse_link

PREFERENCE_MODES = ("zpg", "zbcpg", "zorank")
PERTURBATIONS = ("published", "sphere", "gaussian")
# The published direction of each mode: ZPG/ZBCPG a uniform unit vector (of the whole vector or
# of the block), ZO-RankSGD Gaussian.
PUBLISHED = {"zpg": "sphere", "zbcpg": "sphere", "zorank": "gaussian"}


def link_bound(delta: float, link: str = "bt", shape: float = 2.0) -> float:
    """D = F⁻¹(1 − δ) = −F⁻¹(δ): the largest |Δ̂| trimming to [δ, 1 − δ] allows."""
    return -float(inverse_link(torch.tensor(delta, dtype=torch.float64), link, shape))


def trimmed_value_differences(comparisons: Comparisons, delta: float, link: str = "bt",
                              shape: float = 2.0) -> torch.Tensor:
    """Δ̂ per pair: F⁻¹(clip(p̂, δ, 1 − δ)) with p̂ the first response's share of the answered queries
    (a tie counts half to each); NaN where no query was answered.

    F⁻¹ is odd about ½, so Δ̂ is taken as ∓F⁻¹ of the smaller of the two responses' shares: in floating
    point 1 − p̂ is not always the second response's share, and this way swapping the pair negates Δ̂
    exactly and a won and a lost pair cancel to 0 (not to ±1e-16)."""
    answered = comparisons.answered
    queries = answered.clamp(min=1.0)
    first = (comparisons.first_wins + 0.5 * comparisons.ties) / queries
    second = (comparisons.second_wins + 0.5 * comparisons.ties) / queries
    magnitude = inverse_link(torch.minimum(first, second).clamp(delta, 0.5), link, shape).abs()  # F⁻¹ ≤ 0 there
    value = torch.sign(first - second) * magnitude
    return torch.where(answered > 0, value, math.nan)


def rank_edges(comparisons_by_pair: dict, policies: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, each policy's net wins (wins − losses) and the number of edges |E| (answered,
    non-tie queries) of the comparison graph; ``comparisons_by_pair[(a, b)]``: policy a's
    completions (first) against policy b's (second)."""
    net = torch.zeros(count, policies, dtype=torch.float64)
    edges = torch.zeros(count, dtype=torch.float64)
    for (a, b), comparisons in comparisons_by_pair.items():
        first, second = comparisons.first_wins, comparisons.second_wins
        net[:, a] += first - second
        net[:, b] += second - first
        edges += first + second
    return net, edges


@dataclass
class PreferenceSettings:
    mode: str
    eps: float
    lr: float
    weight_decay: float = 0.0
    trim_delta: float = 0.05
    link: str = "bt"
    weibull_shape: float = 2.0
    judge_queries: int = 1
    two_sided: bool = False
    perturbation: str = "published"
    blocks: int = 1
    block_tensors: int = 2
    rank_policies: int = 4
    guided: bool = False

    def __post_init__(self):
        if self.mode not in PREFERENCE_MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {PREFERENCE_MODES}")
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation {self.perturbation!r} is not one of {PERTURBATIONS}")
        check_link(self.link, self.weibull_shape)
        if not 0 < self.trim_delta < 0.5:
            raise ValueError(f"trim_delta must be in (0, 0.5), got {self.trim_delta}")
        if not (self.eps > 0 and self.lr >= 0):
            raise ValueError(f"eps must be > 0 and lr ≥ 0, got eps={self.eps}, lr={self.lr}")
        for name in ("judge_queries", "blocks", "block_tensors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.rank_policies < 2 or (self.two_sided and self.rank_policies % 2):
            raise ValueError(f"rank_policies must be ≥ 2 (and even when two_sided), got {self.rank_policies}")

    @property
    def direction(self) -> str:
        """"sphere" or "gaussian": the unguided z."""
        return PUBLISHED[self.mode] if self.perturbation == "published" else self.perturbation

    @classmethod
    def from_config(cls, config) -> "PreferenceSettings":
        return cls(mode=config.optimizer, eps=config.eps, lr=config.lr, weight_decay=config.weight_decay,
                   trim_delta=config.trim_delta, link=config.link, weibull_shape=config.weibull_shape,
                   judge_queries=config.judge_queries, two_sided=config.two_sided,
                   perturbation=config.perturbation, blocks=config.blocks, block_tensors=config.block_tensors,
                   rank_policies=config.rank_policies, guided=config.guided)


class PreferencePasses(ZOPrO):
    """ZOPrO's engine driven from outside ``step``: perturb θ = θ₀ + s·z, restore θ = θ₀, update
    θ₀ ← keep·θ₀ + Σ_j s_j z_j, each one pass over every tensor (per-tensor coefficients make a
    block: z = 0 outside it). ``state_dict`` is ZOPrO's (master, snapshot, Δπ, step counters), so a
    checkpoint resumes bit for bit; ``advance()`` moves the counters as ``step`` would.

    Coefficient tables are [P, 3] float64 (a, b, c) per trained parameter: z = a·Δπ + b·n + c·ΔR.
    """

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        if not self.master_weights:
            raise ValueError("the preference modes restore θ₀ from the fp32 master copy: master_weights=True")
        self._set_rows = None

    # -- layout ------------------------------------------------------------------------------
    def _rows(self):
        engine = self._ensure_engine()
        if self._set_rows is None:
            self._set_rows = [torch.tensor(s.rows, dtype=torch.long) for s in engine.sets]
        return engine, self._set_rows

    @property
    def parameter_count(self) -> int:
        return self._ensure_engine().parameter_count

    def numels(self) -> torch.Tensor:
        """Values per trained parameter (float64 [P])."""
        engine, rows = self._rows()
        table = torch.zeros(engine.parameter_count, dtype=torch.float64)
        for s, r in zip(engine.sets, rows):
            table[r] = torch.tensor([float(p.numel()) for p in s.params], dtype=torch.float64)
        return table

    def noise_squares(self, seed: int) -> torch.Tensor:
        """n·n per trained parameter for ``seed`` (float64 [P]; the engine's reduce pass)."""
        engine, rows = self._rows()
        table = torch.zeros(engine.parameter_count, dtype=torch.float64)
        for r, stats in zip(rows, engine.statistics(seed)):
            table[r] = stats[:, 0].double().cpu()
        return table

    # -- directions ---------------------------------------------------------------------------
    @property
    def guided_now(self) -> bool:
        """Δπ is set (an iteration has been marked twice) and α > 0 for the next step."""
        engine = self._ensure_engine()
        return engine.has_policy and self.current_alpha() > 0.0

    def direction(self, seed: int, *, kind: str, blocks: list[list[int]] | None = None,
                  guided: bool = False) -> list[torch.Tensor]:
        """One coefficient table per block (``blocks=None``: one block of every parameter).

        Unguided (``kind`` "sphere": b = √d_B/‖n_B‖ over the block's values; "gaussian": b = 1); guided
        (when ``guided`` and ``guided_now``): eq. 2's coefficients at the current α, masked to the block.
        """
        count = self.parameter_count
        blocks = [list(range(count))] if blocks is None else blocks
        if guided and self.guided_now:
            engine, rows = self._rows()
            full = torch.zeros(count, 3, dtype=torch.float64)
            for r, coefs in zip(rows, engine.coefficients(seed, self.current_alpha())):
                full[r] = coefs.double().cpu()
            tables = []
            for block in blocks:
                table = torch.zeros(count, 3, dtype=torch.float64)
                table[block] = full[block]
                tables.append(table)
            return tables
        squares = self.noise_squares(seed) if kind == "sphere" else None
        numels = self.numels() if kind == "sphere" else None
        tables = []
        for block in blocks:
            table = torch.zeros(count, 3, dtype=torch.float64)
            if kind == "sphere":
                norm_sq = float(squares[block].sum())
                table[block, 1] = math.sqrt(float(numels[block].sum()) / norm_sq) if norm_sq > 0 else 0.0
            elif kind == "gaussian":
                table[block, 1] = 1.0
            else:
                raise ValueError(f"direction kind {kind!r} is not 'sphere' or 'gaussian'")
            tables.append(table)
        return tables

    # -- passes -------------------------------------------------------------------------------
    def _apply(self, seed: int, table: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor, *, write_master: bool):
        engine, rows = self._rows()
        coefs = [table[r].to(s.device) for s, r in zip(engine.sets, rows)]
        scales = [scale[r].to(s.device) for s, r in zip(engine.sets, rows)]
        keeps = [keep[r].to(s.device) for s, r in zip(engine.sets, rows)]
        engine.apply_(seed, coefs, scales, keeps, write_master=write_master,
                      use_policy=bool((table[:, 0] != 0).any()))

    @torch.no_grad()
    def perturb(self, seed: int, table: torch.Tensor, scale: float):
        """θ = θ₀ + scale·z (the master θ₀ is not touched)."""
        count = self.parameter_count
        self._apply(seed, table, torch.full((count,), float(scale), dtype=torch.float64),
                    torch.ones(count, dtype=torch.float64), write_master=False)

    @torch.no_grad()
    def restore(self):
        """θ = θ₀, exactly: the model's tensors are rewritten from the master copy."""
        engine = self._ensure_engine()
        for s in engine.sets:
            for p, view in zip(s.params, s.views(s.master)):
                p.detach().copy_(view.view_as(p))

    @torch.no_grad()
    def update(self, terms: list[tuple[int, torch.Tensor, torch.Tensor]], weight_decay_keep: float = 1.0):
        """θ₀ ← keep·θ₀ + Σ_j scale_j·z_j for ``terms`` = [(seed_j, table_j, per-parameter scale_j [P])]
        (keep applied once, with the first term), then θ = θ₀."""
        count = self.parameter_count
        if not terms:
            terms = [(0, torch.zeros(count, 3, dtype=torch.float64), torch.zeros(count, dtype=torch.float64))]
        for i, (seed, table, scale) in enumerate(terms):
            keep = torch.full((count,), weight_decay_keep if i == 0 else 1.0, dtype=torch.float64)
            self._apply(seed, table, scale.to(torch.float64), keep, write_master=True)

    def advance(self):
        """One optimisation step done (the seeds' and α's counters, as ``step`` moves them)."""
        self.global_step += 1
        self.iteration_step += 1


class PreferenceEstimator:
    """One step of a preference-only mode on ``passes``.

    ``step(count, sample, compare, reduce)``: ``count`` prompts (this process's);
    ``sample(rows, key)`` draws one completion per prompt of ``rows`` (indices into the count)
    from the policy as it is now (perturbed or not), ``key`` naming the policy (0: θ₀; a distinct
    int per perturbed policy of the step); ``compare(rows, first, second, key)`` returns the
    judge's ``Comparisons`` of first[i] against second[i] for those prompts; ``reduce(values)``
    sums a list of floats over processes (default: one process). Returns the step's metrics and
    (under ``"_diagnostics"``) the per-prompt estimates, the directions' tables and the weights.
    """

    def __init__(self, passes: PreferencePasses, settings: PreferenceSettings):
        self.passes, self.settings = passes, settings

    def blocks_for(self, seed: int) -> list[list[int]]:
        """ZBCPG's blocks of this step: ``blocks`` distinct windows of ``block_tensors`` consecutive
        parameters (in the optimizer's order: a peft adapter's lora_A, lora_B of one module are
        neighbours), drawn uniformly without replacement from a generator seeded with the step's seed."""
        s, count = self.settings, self.passes.parameter_count
        windows = [list(range(start, min(start + s.block_tensors, count)))
                   for start in range(0, count, s.block_tensors)]
        if s.blocks > len(windows):
            raise ValueError(f"blocks={s.blocks} but the {count} tensors make only {len(windows)} windows of "
                             f"block_tensors={s.block_tensors}")
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed & ((1 << 63) - 1)))
        return [windows[i] for i in order[: s.blocks].tolist()]

    def step(self, *, count: int, sample, compare, reduce=None) -> dict:
        reduce = reduce or (lambda values: [float(v) for v in values])
        if self.settings.mode == "zorank":
            info = self._rank_step(count, sample, compare, reduce)
        else:
            info = self._value_step(count, sample, compare, reduce)
        self.passes.advance()
        return info

    # -- ZPG / ZBCPG ----------------------------------------------------------------------------
    def _value_step(self, count, sample, compare, reduce) -> dict:
        s, p = self.settings, self.passes
        seed = step_seed(p.seed, p.global_step)
        guided = s.guided and p.guided_now
        alpha = p.current_alpha() if guided else 0.0
        blocks = self.blocks_for(seed) if s.mode == "zbcpg" else None
        tables = p.direction(seed, kind=s.direction, blocks=blocks, guided=s.guided)
        groups = [list(range(j, count, len(tables))) for j in range(len(tables))]
        differences = torch.full((count,), math.nan, dtype=torch.float64)
        failures, first_error, ties, answered = 0, None, 0.0, 0.0
        for j, (table, rows) in enumerate(zip(tables, groups)):
            if not rows:
                continue
            current = None if s.two_sided else sample(rows, 3 * j)  # θ₀ (the table is unused there)
            p.perturb(seed, table, s.eps)
            plus = sample(rows, 3 * j + 1)
            if s.two_sided:
                p.perturb(seed, table, -s.eps)
                other = sample(rows, 3 * j + 2)
            else:
                other = current
            p.restore()
            comparisons = compare(rows, plus, other, j)
            differences[rows] = trimmed_value_differences(comparisons, s.trim_delta, s.link, s.weibull_shape)
            failures += comparisons.failures
            first_error = first_error or comparisons.first_error
            ties += float(comparisons.ties.sum())
            answered += float(comparisons.answered.sum())
        sums = []
        for rows in groups:
            values = differences[rows]
            finite = values[torch.isfinite(values)]
            sums += [float(finite.sum()), float(finite.numel())]
        totals = reduce(sums + [failures, ties, answered])
        *sums, failures, ties, answered = totals
        span = s.eps if not s.two_sided else 2.0 * s.eps
        estimates = [total / n / span if n else 0.0 for total, n in zip(sums[::2], sums[1::2])]
        combined = torch.zeros(p.parameter_count, 3, dtype=torch.float64)
        scales = torch.zeros(p.parameter_count, dtype=torch.float64)
        block_rows = blocks if blocks is not None else [list(range(p.parameter_count))]
        for table, rows, g in zip(tables, block_rows, estimates):
            combined[rows] = table[rows]
            scales[rows] = s.lr * g  # ascent on the value: θ₀ + η ĝ
        judged = int(sum(sums[1::2]))
        if judged:
            p.update([(seed, combined, scales)], 1.0 - s.lr * s.weight_decay)
        info = {"g": sum(estimates) / len(estimates), "value_difference": (sum(sums[::2]) / judged if judged
                                                                            else math.nan),
                "judged_prompts": judged, "judge_queries": int(answered), "judge_ties": int(ties),
                "judge_failures": int(failures), "alpha": alpha, "lr": s.lr, "eps": s.eps,
                "updated": bool(judged)}
        if blocks is not None:
            info |= {"blocks": [block[0] // s.block_tensors for block in blocks], "block_g": estimates}
        info["_diagnostics"] = {"differences": differences, "tables": tables, "seed": seed, "blocks": blocks,
                                "groups": groups, "first_error": first_error, "estimates": estimates}
        return info

    # -- ZO-RankSGD -----------------------------------------------------------------------------
    def _rank_step(self, count, sample, compare, reduce) -> dict:
        s, p = self.settings, self.passes
        guided = s.guided and p.guided_now
        alpha = p.current_alpha() if guided else 0.0
        directions = s.rank_policies // 2 if s.two_sided else s.rank_policies
        seeds = [step_seed(p.seed, p.global_step, i) for i in range(directions)]
        tables = [p.direction(seed, kind=s.direction, guided=s.guided)[0] for seed in seeds]
        signs = (1.0, -1.0) if s.two_sided else (1.0,)
        rows = list(range(count))
        completions = []  # per policy (direction i, sign): one completion per prompt
        for seed, table in zip(seeds, tables):
            for sign in signs:
                if rows:
                    p.perturb(seed, table, sign * s.eps)
                    completions.append(sample(rows, 1 + len(completions)))
                else:
                    completions.append([])
        p.restore()
        policies = len(completions)
        by_pair, failures, first_error, ties, answered = {}, 0, None, 0.0, 0.0
        if rows:
            for a in range(policies):
                for b in range(a + 1, policies):
                    comparisons = compare(rows, completions[a], completions[b], len(by_pair))
                    by_pair[(a, b)] = comparisons
                    failures += comparisons.failures
                    first_error = first_error or comparisons.first_error
                    ties += float(comparisons.ties.sum())
                    answered += float(comparisons.answered.sum())
        net, edges = rank_edges(by_pair, policies, count)
        ok = edges > 0
        per_prompt = torch.where(ok[:, None], net / edges.clamp(min=1.0)[:, None], 0.0)
        totals = reduce(per_prompt.sum(0).tolist() + [float(ok.sum()), failures, ties, answered])
        *weight_sums, judged, failures, ties, answered = totals
        weights = [w / judged if judged else 0.0 for w in weight_sums]  # per policy
        if s.two_sided:
            direction_weights = [weights[2 * i] - weights[2 * i + 1] for i in range(directions)]
        else:
            direction_weights = weights
        if judged:
            p.update([(seed, table, torch.full((p.parameter_count,), s.lr * w, dtype=torch.float64))
                      for seed, table, w in zip(seeds, tables, direction_weights)], 1.0 - s.lr * s.weight_decay)
        info = {"g": math.sqrt(sum(w * w for w in direction_weights)), "rank_weights": direction_weights,
                "judged_prompts": int(judged), "judge_queries": int(answered), "judge_ties": int(ties),
                "judge_failures": int(failures), "alpha": alpha, "lr": s.lr, "eps": s.eps,
                "updated": bool(judged)}
        info["_diagnostics"] = {"per_prompt": per_prompt, "edges": edges, "tables": tables, "seeds": seeds,
                                "first_error": first_error}
        return info


class PreferenceLoop:
    """The RLOO loop's dispatch for ``optimizer: zpg | zbcpg | zorank``: a step samples the global batch's
    prompts (this process's share) from θ₀ and the perturbed policies, one completion per prompt
    and policy, asks the judge ``judge_queries`` times per pair in batches, and updates the
    policy adapter. No reward model, value head or RLOO objective is used; iteration 0 is
    unguided, later iterations guided by Δπ when ``guided``."""

    def __init__(self, trainer):
        c = trainer.config
        self.trainer = trainer
        self.settings = PreferenceSettings.from_config(c)
        self.passes = PreferencePasses(trainer.pair.named_policy_parameters(), lr=c.lr, eps=c.eps, seed=c.seed,
                                       weight_decay=c.weight_decay, alpha=c.alpha,
                                       steps_per_iteration=trainer.optimizer_steps, granularity=c.granularity,
                                       direction_norm=c.direction_norm, backend=c.backend,
                                       process_group=trainer.parallel.group)
        self.estimator = PreferenceEstimator(self.passes, self.settings)

    def mode(self, iteration: int) -> str:
        c = self.trainer.config
        return c.optimizer + ("+guided" if c.guided and iteration > 0 else "")

    def policy_step(self, iteration: int, rollout_index: int, prompts: list[str], mode: str) -> list[dict]:
        from .loop import derived_seed, peak_memory_bytes

        trainer, c = self.trainer, self.trainer.config
        parallel = trainer.parallel
        started = time.perf_counter()
        mine = parallel.shard(prompts)
        sampled: dict[int, list[tuple[str, str]]] = {}

        def sample(rows, key):
            rollout = trainer.sample([mine[i] for i in rows], k=1,
                                     seed=derived_seed(c.seed, iteration, rollout_index, 20 + key, parallel.rank))
            sampled.setdefault(key, []).extend(zip(rollout.prompts, rollout.completions))
            return rollout.completions

        def compare(rows, first, second, key):
            return compare_many(trainer.judge, [mine[i] for i in rows], first, second, queries=c.judge_queries,
                                seed=derived_seed(c.seed, iteration, rollout_index, 60 + key, parallel.rank))

        record = {"iteration": iteration, "rollout": rollout_index, "mode": mode, "step": trainer.global_step,
                  "step_in_iteration": rollout_index, "reuse": 0}
        info = self.estimator.step(count=len(mine), sample=sample, compare=compare, reduce=parallel.sum)
        diagnostics = info.pop("_diagnostics")
        trainer.counters["judge_failures"] += info["judge_failures"]
        trainer.counters["judge_ties"] += info["judge_ties"]
        if info["judge_failures"]:
            trainer.say(f"step {trainer.global_step}: {info['judge_failures']} judge quer(ies) failed; "
                        f"first: {diagnostics['first_error']}")
        if not info["judged_prompts"]:
            if info["judge_failures"]:  # decided on global counts: every process raises together
                raise JudgeError(f"every judge call failed at step {trainer.global_step}; first: "
                                 f"{diagnostics['first_error']}")
            trainer.counters["skipped_steps"] += 1
            record["skipped"] = True
        # the task score of θ₀'s completions where the step sampled some (one-sided), else of all
        scored = [pair for key, pairs in sampled.items() if key % 3 == 0 and c.optimizer != "zorank"
                  for pair in pairs] or [pair for pairs in sampled.values() for pair in pairs]
        record["task_score"] = parallel.means_of(self._scores(scored))[0]
        record |= info
        seconds, peak = parallel.maxima([time.perf_counter() - started, peak_memory_bytes(trainer.pair.device)])
        record |= {"seconds": seconds, "peak_memory_bytes": int(peak)}
        if parallel.active:
            record["processes"] = parallel.world_size
        trainer.global_step += 1
        return [record]

    def _scores(self, pairs) -> torch.Tensor:
        score = getattr(self.trainer.judge, "score", None)
        values = []
        for prompt, text in pairs if score is not None else []:
            try:
                values.append(float(score(prompt, text)))
            except Exception:  # noqa: BLE001 - a score is only a metric here
                values.append(math.nan)
        return torch.tensor(values, dtype=torch.float64)
