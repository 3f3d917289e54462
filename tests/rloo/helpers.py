"""A tiny random Llama and a word-level tokenizer built here (nothing comes from a hub)."""

from __future__ import annotations

import torch

WORDS = ("the film is a movie story plot actor scene good great fine bad awful dull and but very not "
         "so it was too long short funny sad fun boring 0 1").split()
_TEXT_WORDS = [w for w in WORDS if not w.isdigit()]  # "0"/"1" are the pairwise judge's verdicts
# 20 distinct prompts of 1–6 words (= tokens), so batches are left padded; distinct first words
PROMPTS = [" ".join(_TEXT_WORDS[(7 * i + j) % len(_TEXT_WORDS)] for j in range(1 + i % 6)) for i in range(20)]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def make_base(seed: int = 0, dtype=torch.float32, layers: int = 2, hidden_size: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=64,
                         num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    return model, tokenizer


def make_pair(seed: int = 0, dtype=torch.float32, r: int = 4, hidden_size: int = 48, **kwargs):
    from zopro_kernels.rloo.models import LoraSettings, PolicyAndReward

    model, tokenizer = make_base(seed, dtype, hidden_size=hidden_size)
    pair = PolicyAndReward(model, tokenizer, LoraSettings(r=r, alpha=2 * r), seed=seed, **kwargs)
    # peft initialises B = 0 (policy = reference); random B makes the adapters matter in tests
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameters in (pair.policy_parameters, pair.reward_parameters):
            for slot, p in parameters.items():
                if slot.endswith("lora_B"):
                    p.copy_(0.05 * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))
    return pair


def word_count_judge():
    from zopro_kernels.rloo.judges import ScoreJudge

    return ScoreJudge(lambda prompt, response: response.split().count("good") - response.split().count("bad"))


def tiny_config(output_dir, **overrides):
    from zopro_kernels.rloo.config import TrainConfig

    values = dict(model="unused", prompts="unused", output_dir=str(output_dir), num_generations=2,
                  max_completion_length=5, max_prompt_tokens=8, max_length=32, iterations=2, batch_prompts=2,
                  steps_per_iteration=2,
                  prompt_fraction=0.5, lora_r=4, lora_alpha=8, eval_prompts=2, progress=False, plot=False,
                  reward_epochs=1, reward_batch_size=4, lr=1e-2, spsa_lr=1e-4, eps=1e-3, adamw_lr=1e-2,
                  reward_lr=1e-2, logprob_chunk=3)
    values.update(overrides)
    return TrainConfig(**values)
