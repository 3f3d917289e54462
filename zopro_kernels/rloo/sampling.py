"""k completions per prompt from the current policy (KV-cached ``generate``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """Prompts and their k sampled completions, as one left-padded token batch.

    Row ``i*k + j`` is completion j of prompt i. ``input_ids`` = [prompt (``prompt_length``,
    left padded) | completion (right padded)].
    """

    prompts: list[str]
    completions: list[str]
    k: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_length: int

    def select_prompts(self, keep: list[int]) -> "Rollout":
        rows = torch.tensor([i * self.k + j for i in keep for j in range(self.k)], dtype=torch.long)
        return Rollout(
            prompts=[self.prompts[i] for i in keep],
            completions=[self.completions[r] for r in rows.tolist()],
            k=self.k,
            input_ids=self.input_ids[rows.to(self.input_ids.device)],
            attention_mask=self.attention_mask[rows.to(self.input_ids.device)],
            completion_mask=self.completion_mask[rows.to(self.input_ids.device)],
            prompt_length=self.prompt_length,
        )


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int, device) -> dict:
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
    lengths = encoded["attention_mask"].sum(-1)
    too_long = [(p, int(n)) for p, n in zip(prompts, lengths) if n > max_prompt_tokens]
    if too_long:
        prompt, n = too_long[0]
        raise ValueError(f"prompt of {n} tokens is over the limit of {max_prompt_tokens}: {prompt[:80]!r}")
    return {key: value.to(device) for key, value in encoded.items() if key in ("input_ids", "attention_mask")}


def completion_mask_until_eos(completion_ids: torch.Tensor, eos_token_id) -> torch.Tensor:
    """1 for tokens up to and including the first end-of-sequence, 0 after (generation padding)."""
    eos_ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for eos in eos_ids:
        if eos is not None:
            is_eos |= completion_ids == eos
    # tokens strictly after the first eos are padding
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return (eos_before == 0).long()


@torch.no_grad()
def sample_completions(pair, prompts: list[str], *, k: int, max_new_tokens: int, max_prompt_tokens: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Rollout:
    """k samples per prompt from the active adapter, reproducible from ``seed``."""
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    tokenizer, model = pair.tokenizer, pair.model
    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens, pair.device)
    input_ids = encoded["input_ids"].repeat_interleave(k, dim=0)
    attention_mask = encoded["attention_mask"].repeat_interleave(k, dim=0)
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[pair.device] if pair.device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos, use_cache=True,
        )
    model.train(was_training)
    prompt_length = input_ids.shape[1]
    completion_ids = output[:, prompt_length:]
    completion_mask = completion_mask_until_eos(completion_ids, eos)
    completion_ids = torch.where(completion_mask.bool(), completion_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(
        prompts=list(prompts), completions=texts, k=k,
        input_ids=torch.cat([input_ids, completion_ids], dim=1),
        attention_mask=torch.cat([attention_mask, completion_mask], dim=1),
        completion_mask=completion_mask, prompt_length=prompt_length,
    )
