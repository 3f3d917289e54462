"""Every Python example in README.md runs, in order, in one namespace."""

import re
from pathlib import Path

import pytest
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


DOCS = README.parent / "docs"
# every docs page with Python examples, and the test that runs them
DOC_EXAMPLE_TESTS = {"analysis.md": "test_docs_analysis_examples_run (here)",
                     "trainer.md": "tests/test_integrations.py",
                     "config.md": "tests/rloo/test_outputs.py::test_the_config_docs_example_loads_the_exported_policy"}


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_every_docs_page_with_examples_is_run_by_a_test():
    with_examples = {page.name for page in DOCS.glob("*.md") if python_blocks(page)}
    assert with_examples == set(DOC_EXAMPLE_TESTS), "add the page's examples to a test"


def test_docs_analysis_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in python_blocks(DOCS / "analysis.md"):
        exec(block, namespace)
    recorder = namespace["recorder"]
    assert (tmp_path / "runs" / "demo" / "trajectory" / "index.json").exists()
    assert recorder.total_bytes > 0


def shell_commands(text: str) -> list[str]:
    """The page's bash blocks, a command a line (continuation lines joined, comments dropped)."""
    lines = [line.split(" #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def docs_commands() -> list[str]:
    """Every shell command README.md and the docs pages show."""
    return [c for page in [README, *sorted(DOCS.glob("*.md"))] for c in shell_commands(page.read_text())]


def test_ci_runs_exactly_the_readme_install_and_test_commands():
    commands = shell_commands(README.read_text())
    install, test = commands[0], commands[1]
    assert install.startswith("pip install") and "pytest" in test
    ci = (README.parent / ".ci" / "run").read_text()
    ci_lines = [line.split("#")[0].strip().replace(" -q ", " ") for line in ci.splitlines()]
    quiet = lambda command: command.replace(" -q ", " ")  # noqa: E731 - CI may add pip's -q
    assert "python -m " + quiet(install) in ci_lines  # the same install, through the venv's python
    assert quiet(test) in ci_lines


class _Parsed(Exception):
    """Raised once a script's command line parsed: the script itself is not run."""


def benchmark_commands(commands: list[str]) -> list[list[str]]:
    """Each ``python benchmarks/<script>.py ARGS`` among ``commands`` as [script, *ARGS]."""
    import shlex

    found = []
    for line in commands:
        if "python benchmarks/" in line:
            script, *args = shlex.split(line[line.index("python benchmarks/") + len("python "):])
            found.append([Path(script).stem, *args])
    return found


def test_the_benchmark_commands_in_the_docs_parse(monkeypatch):
    """Every benchmark command README.md and docs/ show takes the flags and values it is shown with
    (the scripts' own parsers, stopped before they run anything)."""
    import argparse
    import importlib
    import sys

    commands = benchmark_commands(docs_commands())
    assert len(commands) >= 15 and {"bench_reward", "sweep", "bench_passes"} <= {c[0] for c in commands}
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.syspath_prepend(str(README.parent / "benchmarks"))
    for script, *args in commands:
        module = importlib.import_module(script)
        with pytest.raises(_Parsed):
            try:
                module.main(args)
            except SystemExit as exit:
                raise AssertionError(f"python benchmarks/{script}.py {' '.join(args)}: {exit}") from None
    assert "bench_reward" in sys.modules


def train_commands(commands: list[str]) -> list[list[str]]:
    """Each ``zopro-train ARGS`` among ``commands`` as ARGS. ``zopro-train ... --set K=V ...`` stands
    for the previous one with more overrides: its ``...`` are filled in so."""
    import shlex

    found = []
    for line in commands:
        if not line.startswith("zopro-train"):
            continue
        args = shlex.split(line)[1:]
        if args[:1] == ["..."]:
            previous = found[-1] if found else []
            assert previous.count("--set") == 1 and args[1:2] == ["--set"], line
            args = previous + [arg for arg in args[2:] if arg != "..."]
        found.append(args)
    return found


def test_the_train_commands_in_the_docs_make_valid_configs(monkeypatch):
    """Every ``zopro-train`` command README.md and docs/ show builds a valid config: its keys exist,
    its values check (the loop itself stopped before it loads anything)."""
    from zopro_kernels.rloo import cli

    commands = train_commands(docs_commands())
    assert len(commands) >= 8
    built = []
    monkeypatch.setattr(cli, "train", lambda config, **_: built.append(config))
    monkeypatch.chdir(README.parent)
    for args in commands:
        assert cli.main(args) == 0, f"zopro-train {' '.join(args)}"
    assert len(built) == len(commands)
    assert {c.optimizer for c in built} >= {"zopro", "mezo", "zpg", "zbcpg", "zorank"}
