"""Every Python example in README.md runs, in order, in one namespace."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(blocks[0], namespace)  # quick start
    assert "step 0: loss" in capsys.readouterr().out
    assert namespace["closure"]().item() < 0.2  # started near 5.2
    exec(blocks[1], namespace)  # guided iterations
    losses = [float(v) for v in re.findall(r"iteration \d: loss ([0-9.]+)", capsys.readouterr().out)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert namespace["optimizer"].nonfinite_steps == 0
    for block in blocks[2:]:
        exec(block, namespace)
    optimizer = namespace["optimizer"]
    assert optimizer.global_step == 151
    assert (tmp_path / "checkpoint.pt").exists()
    policy = optimizer.state_dict()["state"][0]["policy_delta"]
    assert torch.isfinite(policy).all() and policy.abs().sum() > 0
