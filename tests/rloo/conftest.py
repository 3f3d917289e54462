import importlib.util

import pytest
import torch

# The loop needs the `loop` extra; without it these tests are not collected (and say so).
MISSING = [m for m in ("transformers", "peft", "tokenizers", "tqdm", "yaml") if importlib.util.find_spec(m) is None]
if MISSING:
    collect_ignore_glob = ["test_*.py"]
    print(f"tests/rloo skipped: missing {MISSING} (pip install '.[loop]')")


@pytest.fixture(autouse=True, scope="session")
def one_cpu_thread():
    """Tiny models: intra-op threads only add synchronisation (ruinous on a shared, loaded CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
