"""CPU micro-benchmarks of one RLOO update on a tiny random Llama (pytest-benchmark):

    python -m pytest benchmarks --benchmark-only

The same update code as bench_step.py (scoring excluded: J's forward passes and each method's
update), at a size where the optimizer's own work is visible next to the forwards.
"""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402
from step_models import policy_and_reward, random_llama  # noqa: E402

SETTINGS = bench_step.StepSettings(batch=4, k=2, prompt_len=16, new_tokens=8, micro_batch=8, backend="torch")


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pair = policy_and_reward(random_llama("tiny", device="cpu"), r=16, alpha=32)
    vocab = pair.model.get_base_model().config.vocab_size
    rollout = bench_step.random_rollout(bench_step.random_prompts(SETTINGS, vocab, "cpu"), SETTINGS, vocab)
    yield pair, bench_step.score(pair, rollout, SETTINGS)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", bench_step.METHODS)
def test_tiny_rloo_update(benchmark, tiny, method):
    pair, scored = tiny
    update = bench_step.Method(method, pair, SETTINGS)
    try:
        benchmark(update.update, scored)
    finally:
        update.close()
    assert all(torch.isfinite(p).all() for p in pair.policy_parameters.values())
