"""Judges: callables ``(prompt, response_a, response_b) -> 0 | 1`` (the index of the better one).

- ``ScoreJudge(score)``: programmatic, from any ``score(prompt, response) -> float``.
- ``vader_judge()``: VADER's compound sentiment of the whole text (the sentiment task).
- ``LLMPairwiseJudge``: a local instruct model reads the pairwise template and answers "0"/"1".
"""

from __future__ import annotations

import math

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
    """A judge raised or returned something other than 0 or 1."""


def call_judge(judge, prompt: str, response_a: str, response_b: str) -> int:
    """The judge's verdict, checked: 0 or 1, else ``JudgeError`` saying what came back."""
    try:
        verdict = judge(prompt, response_a, response_b)
    except Exception as error:  # a user's judge may raise anything; the loop counts and skips
        raise JudgeError(f"judge raised {type(error).__name__}: {error}") from error
    if isinstance(verdict, torch.Tensor) and verdict.numel() == 1:
        verdict = verdict.item()
    if isinstance(verdict, bool) or verdict not in (0, 1) or isinstance(verdict, float) and math.isnan(verdict):
        raise JudgeError(f"judge returned {verdict!r}; a judge must return 0 (first better) or 1 (second better)")
    return int(verdict)


class ScoreJudge:
    """Prefers the response with the higher ``score(prompt, response)``; ties go to the first."""

    def __init__(self, score):
        self.score_fn = score

    def score(self, prompt: str, response: str) -> float:
        value = float(self.score_fn(prompt, response))
        if not math.isfinite(value):
            raise ValueError(f"score is {value} for response {response[:60]!r}")
        return value

    def __call__(self, prompt: str, response_a: str, response_b: str) -> int:
        return 0 if self.score(prompt, response_a) >= self.score(prompt, response_b) else 1


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
    """A local causal LM as judge: the pairwise template, then compare the next-token logits of "0" and "1"."""

    def __init__(self, model, tokenizer, template: str = PAIRWISE_TEMPLATE, use_chat_template: bool | None = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.use_chat_template = (getattr(tokenizer, "chat_template", None) is not None
                                  if use_chat_template is None else use_chat_template)
        self.choice_ids = [self._single_token(text) for text in ("0", "1")]

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
    def __call__(self, prompt: str, response_a: str, response_b: str) -> int:
        ids = self.prompt_ids(prompt, response_a, response_b).to(next(self.model.parameters()).device)
        logits = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1]
        return int(logits[self.choice_ids[1]] > logits[self.choice_ids[0]])
