"""Judge verdicts: ties are None, and the LLM judge's position bias is cancelled (order="both")."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.rloo.helpers import make_base, make_tokenizer
from zopro_kernels.rloo.judges import JudgeError, LLMPairwiseJudge, ScoreJudge, call_judge

# With the word-level tokenizer "SEP" is <unk>: the fake model splits its input there into
# [prompt, response shown as "0", response shown as "1", []].
TEMPLATE = "{prompt} SEP {response0} SEP {response1} SEP"


class FakeJudgeModel(torch.nn.Module):
    """Next-token logits: logit("k") = count of "good" in the response shown as k, plus ``bias`` on "0"."""

    def __init__(self, tokenizer, bias: float):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # .parameters() gives the device
        self.tokenizer, self.bias = tokenizer, bias
        self.vocab = tokenizer.get_vocab()
        self.shown = []  # (response shown as "0", response shown as "1") per call

    def forward(self, input_ids, logits_to_keep=1):
        assert input_ids.shape[0] == 1 and logits_to_keep == 1
        ids = input_ids[0].tolist()
        segments = [[]]
        for token in ids:
            if token == self.vocab["<unk>"]:
                segments.append([])
            else:
                segments[-1].append(token)
        assert len(segments) == 4, "prompt and responses must use only words of the tokenizer's vocabulary"
        _, shown0, shown1, _ = segments
        self.shown.append((self.tokenizer.decode(shown0), self.tokenizer.decode(shown1)))
        logits = torch.zeros(1, 1, len(self.vocab))
        logits[0, 0, self.vocab["0"]] = shown0.count(self.vocab["good"]) + self.bias
        logits[0, 0, self.vocab["1"]] = shown1.count(self.vocab["good"])
        return SimpleNamespace(logits=logits)


def fake_judge(bias: float, **kwargs):
    tokenizer = make_tokenizer()
    model = FakeJudgeModel(tokenizer, bias)
    return LLMPairwiseJudge(model, tokenizer, template=TEMPLATE, use_chat_template=False, **kwargs), model


PAIRS = [("good good film", "good film"), ("bad film", "good film"), ("good plot", "dull plot"),
         ("the film", "good good good film")]


def better(a: str, b: str) -> int:
    return int(b.split().count("good") > a.split().count("good"))


def test_score_judge_ties_are_none():
    judge = ScoreJudge(lambda p, r: r.split().count("good"))
    assert judge("the film is", "good", "bad") == 0 and judge("the film is", "bad", "good") == 1
    assert judge("the film is", "fine", "dull") is None and judge("the film is", "", "") is None
    assert judge.score("p", "good good") == 2.0
    assert call_judge(judge, "p", "neutral", "") is None


def test_call_judge_passes_ties_and_rejects_other_values():
    assert call_judge(lambda p, a, b: None, "p", "a", "b") is None
    assert call_judge(lambda p, a, b: 0, "p", "a", "b") == 0
    assert call_judge(lambda p, a, b: torch.tensor(1), "p", "a", "b") == 1
    for verdict in (True, False, 2, -1, float("nan"), "0", "1", 0.5, torch.tensor(True), torch.tensor(float("nan")),
                    [0], torch.tensor([0, 1])):
        with pytest.raises(JudgeError, match="must return 0"):
            call_judge(lambda p, a, b, v=verdict: v, "p", "a", "b")


def test_order_is_validated():
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="order is 'swap'.*'both', 'random', 'fixed'"):
        LLMPairwiseJudge(FakeJudgeModel(tokenizer, 0.0), tokenizer, template=TEMPLATE, order="swap")


def test_fixed_order_shows_the_position_bias():
    judge, model = fake_judge(bias=100.0, order="fixed")
    for a, b in PAIRS:
        assert judge("the film is", a, b) == 0 and judge("the film is", b, a) == 0
    assert model.shown[:2] == [PAIRS[0], PAIRS[0][::-1]]  # one query per verdict, a shown first
    assert len(model.shown) == 2 * len(PAIRS)
    assert judge("the film is", "good film", "good film") == 0  # the bias decides identical responses


def test_both_orders_cancel_the_position_bias():
    judge, model = fake_judge(bias=100.0)
    assert judge.order == "both"
    for a, b in PAIRS:
        assert judge("the film is", a, b) == better(a, b)
        assert judge("the film is", b, a) == 1 - better(a, b)
        margin = judge.margin("the film is", a, b)
        expected = 2.0 * (b.split().count("good") - a.split().count("good"))
        assert margin == expected and judge.margin("the film is", b, a) == -expected
    assert model.shown[:2] == [PAIRS[0], PAIRS[0][::-1]]  # two queries per verdict, both orders
    assert judge("the film is", "good film", "good film") is None
    assert judge("the film is", "good plot", "good film") is None  # equally good: an exact tie
    assert call_judge(judge, "the film is", "dull", "bad") is None


def test_random_order_is_seeded_and_maps_back():
    # a heavily biased model always answers "0": the verdict reveals which response was shown first
    runs = {}
    for seed in (0, 0, 1):
        judge, model = fake_judge(bias=100.0, order="random", seed=seed)
        verdicts = [judge("the film is", "good film", "bad film") for _ in range(64)]
        assert len(model.shown) == 64  # one query per verdict
        assert all(model.shown[i] == (("good film", "bad film") if v == 0 else ("bad film", "good film"))
                   for i, v in enumerate(verdicts))
        runs.setdefault(seed, []).append(verdicts)
    assert runs[0][0] == runs[0][1]  # reproducible
    assert runs[0][0] != runs[1][0]  # the seed matters
    assert 16 < sum(runs[0][0]) < 48  # both orders are shown

    # without a bias the answer is mapped back to the order given, whichever order was shown
    judge, model = fake_judge(bias=0.0, order="random", seed=3)
    for _ in range(10):
        for a, b in PAIRS:
            assert judge("the film is", a, b) == better(a, b) and judge("the film is", b, a) == 1 - better(a, b)
    assert len({shown for shown in model.shown if set(shown) == set(PAIRS[0])}) == 2


def test_tiny_llama_judge_is_mirrored_under_both_orders():
    model, tokenizer = make_base(seed=3)
    judge = LLMPairwiseJudge(model, tokenizer, use_chat_template=False)
    fixed = LLMPairwiseJudge(model, tokenizer, use_chat_template=False, order="fixed")
    assert judge.order == "both"
    # the word-level tokenizer glues a response's first and last words to the template's quotes
    # (<unk>), so the words that matter sit in the middle
    pairs = [("the good film", "the bad film"), ("it was very good so", "it was not good so"),
             ("a fun plot and", "a dull plot and"), ("the great actor", "the awful actor"),
             ("it was a great good film", "it was boring")]
    decided, fixed_mirrored = 0, 0
    for a, b in pairs:
        forward, backward = judge("the film is", a, b), judge("the film is", b, a)
        assert forward in (0, 1, None) and backward in (0, 1, None)
        assert (forward is None) == (backward is None)
        if forward is not None:
            decided += 1
            assert forward == 1 - backward
        assert judge.margin("the film is", a, b) == -judge.margin("the film is", b, a)
        fixed_mirrored += fixed("the film is", a, b) == 1 - fixed("the film is", b, a)
    assert decided > 0  # not vacuous: the responses reach the model as different tokens
    assert fixed_mirrored < len(pairs)  # the random model's position bias breaks the symmetry of one query
    assert judge("the film is", "the good film", "the good film") is None
    assert call_judge(judge, "the film is", "the good film", "the bad film") in (0, 1)
