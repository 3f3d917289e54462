"""Randomly initialised Llama models for the step benchmarks, in bf16 or on a 4-bit NF4 base.

Time and memory do not depend on the weights' values, so the real Llama-3.2-1B and Llama-3.1-8B
dimensions are built from a ``LlamaConfig`` on the device, without a download. The RoPE frequency
settings (θ, the llama3 scaling) are left at their defaults: they change values, not cost.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_shapes import ARCHITECTURES  # noqa: E402

# name: attention heads, key/value heads, vocabulary, tied input/output embeddings
# (layers, hidden, intermediate and the key/value width come from lora_shapes.ARCHITECTURES)
HEADS_AND_VOCAB = {
    "llama-3.2-1b": (32, 8, 128256, True),
    "llama-3.1-8b": (32, 8, 128256, False),
    "tiny": (4, 2, 512, True),
}
BASES = ("bf16", "nf4")


def llama_config(arch: str, max_positions: int = 131072):
    from transformers import LlamaConfig

    if arch not in HEADS_AND_VOCAB:
        raise ValueError(f"arch {arch!r} is not one of {sorted(HEADS_AND_VOCAB)}")
    layers, hidden, intermediate, kv_dim = ARCHITECTURES[arch]
    heads, kv_heads, vocab, tied = HEADS_AND_VOCAB[arch]
    if kv_dim != kv_heads * hidden // heads:
        raise AssertionError(f"{arch}: key/value width {kv_dim} ≠ {kv_heads} heads × {hidden // heads}")
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=tied, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def quantize_linears_nf4(model, compute_dtype: torch.dtype, device):
    """Every ``nn.Linear`` but the output embedding becomes a bitsandbytes NF4 ``Linear4bit``, as
    ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4"))`` makes it (``Params4bit`` quantises when moved to the device)."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError("an NF4 base needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from error
    skip = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or module is skip:
            continue
        quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        quantized.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            quantized.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        model.set_submodule(name, quantized.to(device))
        del module
    model.is_loaded_in_4bit = True  # peft then wraps the layers with its bitsandbytes LoRA layer
    return model


def random_llama(arch: str, base: str = "bf16", *, device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """A randomly initialised Llama of ``arch`` on ``device`` (bf16, or NF4 linears with a bf16 rest)."""
    from transformers import AutoModelForCausalLM

    if base not in BASES:
        raise ValueError(f"base {base!r} is not one of {BASES}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(arch), dtype=dtype)
    if base == "nf4":
        model = quantize_linears_nf4(model, dtype, device)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return model.eval()


class TokenIdsOnly:
    """The tokenizer fields ``PolicyAndReward`` needs when inputs are token ids already."""

    pad_token_id, eos_token_id, padding_side = 0, 2, "left"
    pad_token = "<pad>"


def policy_and_reward(model, *, r: int = 64, alpha: int = 128, seed: int = 0):
    """The loop's model: two LoRA adapters (policy, reward) on every linear layer, and a value head."""
    from zopro_kernels.rloo.models import LoraSettings, PolicyAndReward

    return PolicyAndReward(model, TokenIdsOnly(), LoraSettings(r=r, alpha=alpha, target_modules="all-linear"),
                           seed=seed)
