"""Judges: callables ``(prompt, response_a, response_b) -> 0 | 1 | None``.

0 means the first response is better, 1 the second, ``None`` a tie (no preference: the loop drops such
a pair and counts it rather than turning it into an arbitrary label).

- ``ScoreJudge(score)``: programmatic, from any ``score(prompt, response) -> float``; equal scores tie.
- ``vader_judge()``: VADER's compound sentiment of the whole text (the sentiment task).
- ``LLMPairwiseJudge``: a local instruct model reads the pairwise template and the next-token logits of
  "0" and "1" decide; by default it asks with both orders of the two responses, which cancels a constant
  position bias exactly (``order="random"``: one query with a seeded coin flip; ``"fixed"``: one query).
"""

from __future__ import annotations

import math
import random

import torch

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


def vader_judge() -> ScoreJudge:
    """VADER compound sentiment (−1..1) of prompt + continuation: the review should read positively."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise ImportError("the sentiment judge needs VADER: pip install vaderSentiment==3.3.2") from error
    analyzer = SentimentIntensityAnalyzer()

    def compound(prompt: str, response: str) -> float:
        return analyzer.polarity_scores(f"{prompt} {response}".strip())["compound"]

    return ScoreJudge(compound)


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
