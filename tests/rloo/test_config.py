"""TrainConfig's keys: TRL's names, the old names as aliases, report_to, and docs/config.md."""

import dataclasses
import glob
import os
import re
import warnings

import pytest

from zopro_kernels.rloo import configdoc
from zopro_kernels.rloo.cli import parse_overrides
from zopro_kernels.rloo.config import RENAMED, TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(REPO, "docs", "config.md")


def test_trl_names_are_canonical_and_the_old_ones_are_aliases_with_one_warning():
    assert RENAMED == {"k": "num_generations", "max_new_tokens": "max_completion_length",
                       "eval_samples": "num_generations_eval"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RENAMED.values()) <= fields and not set(RENAMED) & fields
    with pytest.warns(FutureWarning) as caught:
        config = TrainConfig.from_dict({"k": 3, "max_new_tokens": 7, "eval_samples": 2, "beta": 0.1})
    assert len([w for w in caught if "config key" in str(w.message)]) == 1
    message = str(caught[0].message)
    assert all(f"'{old}' is now '{new}'" in message for old, new in RENAMED.items())
    assert (config.num_generations, config.max_completion_length, config.num_generations_eval) == (3, 7, 2)
    assert "k" not in config.to_dict() and config.to_dict()["num_generations"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert TrainConfig.from_dict({"num_generations": 3}).num_generations == 3  # the new name: silent
    with pytest.raises(ValueError, match="both the old and the new name: 'k' and 'num_generations'"):
        TrainConfig.from_dict({"k": 3, "num_generations": 3})


def test_yaml_and_overrides_take_the_old_names(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("k: 6\nmax_new_tokens: 9\n")
    with pytest.warns(FutureWarning, match="'k' is now 'num_generations'"):
        config = TrainConfig.from_yaml(str(path))
    assert (config.num_generations, config.max_completion_length) == (6, 9)
    # --set with an old name overrides the new key of a config's to_dict() (not a clash)
    with pytest.warns(FutureWarning, match="'max_new_tokens' is now 'max_completion_length'"):
        overrides = parse_overrides(["max_new_tokens=11", "clip=0.1"])
    merged = TrainConfig.from_dict(config.to_dict() | overrides)
    assert merged.max_completion_length == 11 and merged.clip == 0.1 and merged.num_generations == 6


def test_trl_names_we_do_not_use_say_which_key_to_use():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['epsilon'\]; TRL's 'epsilon' is clip"):
        TrainConfig.from_dict({"epsilon": 0.2})
    with pytest.raises(ValueError, match="TRL's 'max_prompt_length' is max_prompt_tokens"):
        TrainConfig.from_dict({"max_prompt_length": 32})


def test_num_generations_eval_none_means_num_generations_and_checks():
    assert TrainConfig(num_generations=6, num_generations_eval=None).eval_generations == 6
    assert TrainConfig(num_generations=6).eval_generations == 4
    with pytest.raises(ValueError, match="num_generations must be ≥ 2"):
        TrainConfig(num_generations=1)
    with pytest.raises(ValueError, match="max_prompt_tokens \\+ max_completion_length = 1100"):
        TrainConfig(max_prompt_tokens=100, max_completion_length=1000)


def test_report_to_takes_trainingarguments_forms():
    assert TrainConfig().report_to == [] and TrainConfig(report_to="none").report_to == []
    assert TrainConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert TrainConfig(report_to=["tensorboard"]).to_dict()["report_to"] == ["tensorboard"]
    assert TrainConfig(report_to="all").report_to in ([], ["tensorboard"])
    with pytest.raises(ValueError, match=r"report_to \['wandb'\] not supported"):
        TrainConfig(report_to=["wandb"])


def test_every_shipped_yaml_uses_the_current_names():
    paths = glob.glob(os.path.join(REPO, "examples", "*.yaml")) + glob.glob(os.path.join(REPO, "benchmarks", "*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="config key", category=FutureWarning)
            TrainConfig.from_yaml(path)


def test_docs_config_md_documents_every_key_and_is_current():
    with open(DOCS, encoding="utf-8") as handle:
        document = handle.read()
    # exactly the dataclass's keys, each once, in the table
    rows = re.findall(r"^\| `([a-z_0-9]+)` \|", document.split(configdoc.BEGIN)[1], flags=re.M)
    assert rows == [f.name for f in dataclasses.fields(TrainConfig)]
    # and the table is the one configdoc writes now (types, defaults, TRL names): regenerate with
    # python -m zopro_kernels.rloo.configdoc docs/config.md
    assert configdoc.render(document) == document
    for old, new in RENAMED.items():
        (row,) = [line for line in document.splitlines() if line.startswith(f"| `{new}` |")]
        assert row.endswith(f"renamed from `{old}` |")
    for kept in ("clip", "adamw_lr", "max_prompt_tokens"):  # TRL has the concept: the table says why not its name
        (row,) = [line for line in document.splitlines() if line.startswith(f"| `{kept}` |")]
        assert "ours only: TRL" in row


def test_configdoc_refuses_an_undocumented_key(monkeypatch):
    monkeypatch.delitem(configdoc.KEYS, "clip")
    with pytest.raises(ValueError, match=r"undocumented \['clip'\]"):
        configdoc.table()


def test_configdoc_leaves_the_file_whole_when_it_fails(monkeypatch, tmp_path):
    document = tmp_path / "config.md"
    document.write_text(f"intro\n{configdoc.BEGIN}\nold table\n{configdoc.END}\n", encoding="utf-8")
    before = document.read_text(encoding="utf-8")
    monkeypatch.delitem(configdoc.KEYS, "clip")
    with pytest.raises(ValueError, match="undocumented"):
        configdoc.main([str(document)])
    assert document.read_text(encoding="utf-8") == before
