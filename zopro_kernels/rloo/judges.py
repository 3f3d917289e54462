"""Judges: callables ``(prompt, response_a, response_b) -> 0 | 1 | None``.

0 means the first response is better, 1 the second, ``None`` a tie (no preference: the loop drops such
a pair and counts it rather than turning it into an arbitrary label).

- ``ScoreJudge(score)``: programmatic, from any ``score(prompt, response) -> float``; equal scores tie.
- ``vader_judge()``: VADER's compound sentiment of the whole text (the sentiment task).
- ``LLMPairwiseJudge``: a local instruct model reads the pairwise template and the next-token logits of
  "0" and "1" decide; by default it asks with both orders of the two responses, which cancels a constant
  position bias exactly (``order="random"``: one query with a seeded coin flip; ``"fixed"``: one query).
- ``SimulatedHumanJudge(score, tau, seed)``: Bradley–Terry feedback from any score function,
  P(a ≻ b) = σ((s_a − s_b)/τ), one seeded draw per query (the preference-only modes ask several).

``compare_many`` asks a judge about many pairs, several queries each, in one call where the judge
has a ``judge_batch`` method (``ScoreJudge``, ``SimulatedHumanJudge``), pair by pair otherwise; a
judge whose ``deterministic`` attribute is true is asked once per pair, its verdict repeated.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import random
from dataclasses import dataclass

import torch

from .links import check_link, link_cdf

# The pairwise template of TRL's judges (``DEFAULT_PAIRWISE_SYSTEM_PROMPT``, after AlpacaEval's
# ranking prompt), the one published with online preference-optimisation recipes.
PAIRWISE_TEMPLATE = '''I require a leaderboard for various large language models. I'll provide you with prompts given to these models and their corresponding outputs. Your task is to assess these responses, and select the model that produces the best output from a human perspective.

## Instruction

{{
    "instruction": """{prompt}""",
}}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a unique model identifier.

{{
    {{
        "model_identifier": "0",
        "output": """{response0}"""
    }},
    {{
        "model_identifier": "1",
        "output": """{response1}"""
    }}
}}

## Task

Evaluate the models on the basis of the quality and relevance of their results, and select the model that generated the best result. Reply with the identifier of the best model. Our evaluation will only take into account the first character of your answer, so make sure it contains only one of the identifiers and nothing else (no quotation marks, no spaces, no new lines, ...).
'''


class JudgeError(RuntimeError):
    """A judge raised or returned something other than 0, 1 or None."""


def call_judge(judge, prompt: str, response_a: str, response_b: str) -> int | None:
    """The judge's verdict, checked: 0, 1 or None (a tie), else ``JudgeError`` saying what came back."""
    try:
        verdict = judge(prompt, response_a, response_b)
    except Exception as error:  # a user's judge may raise anything; the loop counts and skips
        raise JudgeError(f"judge raised {type(error).__name__}: {error}") from error
    if verdict is None:
        return None
    if isinstance(verdict, torch.Tensor):
        verdict = verdict.item() if verdict.numel() == 1 else tuple(verdict.tolist())
    if isinstance(verdict, bool) or verdict not in (0, 1) or isinstance(verdict, float) and math.isnan(verdict):
        raise JudgeError(f"judge returned {verdict!r}; a judge must return 0 (first better), 1 (second better) "
                         "or None (tie)")
    return int(verdict)


class ScoreJudge:
    """Prefers the response with the higher ``score(prompt, response)``; exactly equal scores are a tie (None)."""

    deterministic = True  # asked again, the same verdict: compare_many asks once per pair

    def __init__(self, score):
        self.score_fn = score

    def score(self, prompt: str, response: str) -> float:
        value = float(self.score_fn(prompt, response))
        if not math.isfinite(value):
            raise ValueError(f"score is {value} for response {response[:60]!r}")
        return value

    def __call__(self, prompt: str, response_a: str, response_b: str) -> int | None:
        score_a, score_b = self.score(prompt, response_a), self.score(prompt, response_b)
        if score_a == score_b:
            return None
        return 0 if score_a > score_b else 1

    def judge_batch(self, prompts, first, second, *, queries: int = 1, seed: int = 0) -> torch.Tensor:
        """[n, queries] verdict codes (0: first better, 1: second, 2: tie); each text scored once."""
        a, b = _scores(self.score, prompts, first, second)
        verdicts = torch.where(a > b, 0, torch.where(a < b, 1, 2))
        return verdicts[:, None].expand(len(prompts), queries).clone()


def _scores(score, prompts, first, second) -> tuple[torch.Tensor, torch.Tensor]:
    """score(prompt, text) of both responses of every pair (float64), each distinct (prompt, text) once."""
    cache = {}

    def value(prompt, text):
        if (prompt, text) not in cache:
            cache[(prompt, text)] = float(score(prompt, text))
        return cache[(prompt, text)]

    a = torch.tensor([value(p, t) for p, t in zip(prompts, first)], dtype=torch.float64)
    b = torch.tensor([value(p, t) for p, t in zip(prompts, second)], dtype=torch.float64)
    return a, b


def vader_score():
    """VADER compound sentiment (−1..1) of prompt + continuation, as ``score(prompt, response)``."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise ImportError("the sentiment judge needs VADER: pip install vaderSentiment==3.3.2") from error
    analyzer = SentimentIntensityAnalyzer()

    def compound(prompt: str, response: str) -> float:
        return analyzer.polarity_scores(f"{prompt} {response}".strip())["compound"]

    return compound


def vader_judge() -> ScoreJudge:
    """VADER compound sentiment (−1..1) of prompt + continuation: the review should read positively."""
    return ScoreJudge(vader_score())


def resolve_score(name: str):
    """A score function ``(prompt, response) -> float`` by name: ``vader`` or ``module:function``."""
    if name == "vader":
        return vader_score()
    if ":" in name:
        module, _, attribute = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"score function {name!r} could not be imported: {error}") from error
    raise ValueError(f"score {name!r} is not 'vader' or 'module:function'")


_MASK64 = (1 << 64) - 1


def _uniform_of(*parts) -> float:
    """A uniform number in [0, 1) that is a pure function of ``parts`` (stable across processes and runs)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class SimulatedHumanJudge:
    """A simulated human: Bradley–Terry feedback from a score function.

    P(a ≻ b) = F((s_a − s_b)/τ) with F the link (``"bt"``: the logistic σ, Bradley–Terry; ``"weibull"``:
    ``links.py``), and each query is one Bernoulli draw from it, so asking a pair M times gives
    M independent verdicts (never a tie). ``score`` is the score function itself (evaluations
    report it). Seeded and stateless, so a resumed run hears the same verdicts:

    - ``__call__(prompt, a, b)``: the draw is a pure function of (seed, prompt, a, b) — asked the same
      pair twice, the same verdict (a fixed annotator per pair);
    - ``judge_batch(prompts, first, second, queries=M, seed=s)``: M draws per pair from a generator
      seeded with (seed, s), the caller's seed per batch (the preference-only modes pass one per step).
    """

    deterministic = False

    def __init__(self, score, tau: float = 1.0, seed: int = 0, *, link: str = "bt", shape: float = 2.0):
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"the simulated human's temperature tau must be a finite number > 0, got {tau!r}")
        check_link(link, shape)
        self.score_fn, self.tau, self.seed, self.link, self.shape = score, float(tau), int(seed), link, float(shape)

    def score(self, prompt: str, response: str) -> float:
        value = float(self.score_fn(prompt, response))
        if not math.isfinite(value):
            raise ValueError(f"score is {value} for response {response[:60]!r}")
        return value

    def probability(self, prompt: str, response_a: str, response_b: str) -> float:
        """P(response_a ≻ response_b)."""
        difference = (self.score(prompt, response_a) - self.score(prompt, response_b)) / self.tau
        return float(link_cdf(torch.tensor(difference), self.link, self.shape))

    def __call__(self, prompt: str, response_a: str, response_b: str) -> int:
        first_wins = _uniform_of(self.seed, prompt, response_a, response_b) < self.probability(
            prompt, response_a, response_b)
        return 0 if first_wins else 1

    def judge_batch(self, prompts, first, second, *, queries: int = 1, seed: int = 0) -> torch.Tensor:
        """[n, queries] verdicts (0: first better, 1: second); each text scored once."""
        a, b = _scores(self.score, prompts, first, second)
        p = link_cdf((a - b) / self.tau, self.link, self.shape)
        mixed = (self.seed * 0x9E3779B97F4A7C15 + int(seed) * 0xBF58476D1CE4E5B9 + 1) & _MASK64
        generator = torch.Generator().manual_seed(mixed >> 1)
        draws = torch.rand((len(prompts), queries), generator=generator, dtype=torch.float64)
        return torch.where(draws < p[:, None], 0, 1)


FAILED, FIRST, SECOND, TIE = -1, 0, 1, 2


@dataclass
class Comparisons:
    """The judge's verdicts on n pairs, several queries each, as counts per pair (float64 [n]): queries
    won by the first response, by the second, tied, and answered (the rest failed); ``failures``
    queries failed in all, ``first_error`` the first failure's message."""

    first_wins: torch.Tensor
    second_wins: torch.Tensor
    ties: torch.Tensor
    answered: torch.Tensor
    failures: int = 0
    first_error: str | None = None

    @classmethod
    def from_verdicts(cls, verdicts, failures: int = 0, first_error: str | None = None) -> "Comparisons":
        """From [n, queries] codes: 0 (first better), 1 (second), 2 (tie), −1 (the query failed)."""
        verdicts = torch.as_tensor(verdicts)
        count = lambda code: (verdicts == code).sum(1).to(torch.float64)  # noqa: E731
        return cls(count(FIRST), count(SECOND), count(TIE), (verdicts != FAILED).sum(1).to(torch.float64),
                   failures, first_error)


def compare_many(judge, prompts, first, second, *, queries: int = 1, seed: int = 0) -> Comparisons:
    """``queries`` verdicts on each pair (prompts[i], first[i], second[i]).

    One ``judge.judge_batch(prompts, first, second, queries=, seed=)`` call where the judge has one
    (it returns [n, queries] codes 0/1/2); if it raises, or the judge has none, pair by pair
    through ``call_judge`` (failures counted, never raised), once per pair for a judge whose
    ``deterministic`` attribute is true (its verdict repeated), else ``queries`` times.
    """
    n = len(prompts)
    if not (len(first) == len(second) == n):
        raise ValueError(f"compare_many: {n} prompts, {len(first)} first and {len(second)} second responses")
    batch = getattr(judge, "judge_batch", None)
    if batch is not None and n:
        try:
            verdicts = torch.as_tensor(batch(list(prompts), list(first), list(second), queries=queries, seed=seed))
            if verdicts.shape == (n, queries) and bool(((verdicts >= 0) & (verdicts <= 2)).all()):
                return Comparisons.from_verdicts(verdicts)
        except Exception:  # noqa: BLE001 - the pair-by-pair path below counts what fails
            pass
    asks = 1 if getattr(judge, "deterministic", False) else queries
    verdicts = torch.full((n, queries), FAILED, dtype=torch.int64)
    failures, first_error = 0, None
    for i, (prompt, a, b) in enumerate(zip(prompts, first, second)):
        for q in range(asks):
            try:
                verdict = call_judge(judge, prompt, a, b)
            except JudgeError as error:
                failures += queries if asks == 1 else 1
                first_error = first_error or str(error)
                continue
            code = TIE if verdict is None else verdict
            if asks == 1:
                verdicts[i, :] = code
            else:
                verdicts[i, q] = code
    return Comparisons.from_verdicts(verdicts, failures, first_error)


class LLMPairwiseJudge:
    """A local causal LM as judge: the pairwise template, then compare the next-token logits of "0" and "1".

    ``order`` says how the two responses are shown, against the model's position bias:

    - ``"both"`` (default): asked with (a, b) and with (b, a); the margin for b is
      (logit "1" − logit "0") of the first plus (logit "0" − logit "1") of the swapped query, so a
      constant preference for either position cancels exactly; two forward passes per verdict.
    - ``"random"``: one query; a coin flip from ``random.Random(seed)`` decides whether b is shown
      first, and the answer is mapped back to the order given.
    - ``"fixed"``: one query, a shown first (the position bias goes straight into the labels).

    The verdict is 1 if the margin is positive, 0 if negative and None (a tie) if exactly zero.
    """

    ORDERS = ("both", "random", "fixed")

    @property
    def deterministic(self) -> bool:
        """The same pair gets the same verdict (``both``, ``fixed``): compare_many asks it once."""
        return self.order != "random"

    def __init__(self, model, tokenizer, template: str = PAIRWISE_TEMPLATE, use_chat_template: bool | None = None,
                 order: str = "both", seed: int = 0):
        if order not in self.ORDERS:
            raise ValueError(f"order is {order!r}; it must be one of {', '.join(map(repr, self.ORDERS))}")
        self.model, self.tokenizer, self.template, self.order = model, tokenizer, template, order
        self.use_chat_template = (getattr(tokenizer, "chat_template", None) is not None
                                  if use_chat_template is None else use_chat_template)
        self.choice_ids = [self._single_token(text) for text in ("0", "1")]
        self._rng = random.Random(seed)

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the judge's tokenizer splits {text!r} into {len(ids)} tokens; it must be one")
        return ids[0]

    def prompt_ids(self, prompt: str, response_a: str, response_b: str) -> torch.Tensor:
        text = self.template.format(prompt=prompt, response0=response_a, response1=response_b)
        if self.use_chat_template:
            encoded = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                         add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)
            return encoded["input_ids"]
        return self.tokenizer(text, return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def shown_margin(self, prompt: str, first: str, second: str) -> float:
        """logit("1") − logit("0") with ``first`` shown as model "0" and ``second`` as "1" (one forward)."""
        ids = self.prompt_ids(prompt, first, second).to(next(self.model.parameters()).device)
        logits = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1]
        return float(logits[self.choice_ids[1]]) - float(logits[self.choice_ids[0]])

    def margin(self, prompt: str, response_a: str, response_b: str) -> float:
        """The margin in favour of ``response_b`` under this judge's ``order`` (positive: b is better)."""
        if self.order == "both":
            return self.shown_margin(prompt, response_a, response_b) - self.shown_margin(prompt, response_b,
                                                                                        response_a)
        if self.order == "random" and self._rng.random() < 0.5:
            return -self.shown_margin(prompt, response_b, response_a)
        return self.shown_margin(prompt, response_a, response_b)

    def __call__(self, prompt: str, response_a: str, response_b: str) -> int | None:
        margin = self.margin(prompt, response_a, response_b)
        if math.isnan(margin):
            raise ValueError("the judge model's logits of '0' and '1' are not finite")
        return None if margin == 0 else int(margin > 0)
