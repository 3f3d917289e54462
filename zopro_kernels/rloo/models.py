"""One base model in memory with two peft LoRA adapters ("policy", "reward") and a value head.

``save_pretrained`` writes both adapters in peft's own format, each loadable on a fresh copy of
the base with ``PeftModel.from_pretrained(base, directory)``. The value head is not a peft module
(the reward adapter's LoRA tensors feed it, it is trained beside them): it is saved next to the
reward adapter as ``value_head.safetensors`` (``linear.weight``, ``linear.bias``; load it with
``ValueHead.from_pretrained``).

The reference policy is the base with adapters disabled: no second copy of the base exists.
Parameter names are keyed by *slot* — the adapted module and the LoRA matrix with the adapter
name removed (``model.layers.0.self_attn.q_proj.lora_A``) — so a policy tensor and the reward
tensor of the same layer share a key (ΔR is handed to ZOPrO through that key).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass

import torch

VALUE_HEAD_FILE = "value_head.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str = "auto") -> torch.device:
    """"auto": this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else the CPU."""
    if device != "auto":
        resolved = torch.device(device)
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
        return resolved
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_base_model(path: str, *, dtype="float32", load_in_4bit: bool = False, device: str = "auto"):
    """A causal LM and its tokenizer from a local HF directory (or a directory + GGUF, see assets),
    on ``device`` (see ``resolve_device``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist (a HF-format directory or a .gguf file)")
    torch_dtype = resolve_dtype(dtype)
    kwargs = {"dtype": torch_dtype}
    if load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ImportError("load_in_4bit needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from error
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
        )
    target = resolve_device(device)
    if load_in_4bit:
        kwargs["device_map"] = {"": str(target)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not load_in_4bit:
        model = model.to(target)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def prepare_tokenizer(tokenizer):
    """Left padding (generation appends on the right) and a pad token."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def slot_name(parameter_name: str, adapter: str) -> str | None:
    """``...q_proj.lora_A.policy.weight`` → ``...q_proj.lora_A`` (None if not a LoRA tensor of ``adapter``)."""
    marker = f".{adapter}."
    if ".lora_" not in parameter_name or marker not in parameter_name:
        return None
    stem, _, _ = parameter_name.partition(marker)
    prefix = "base_model.model."
    return stem[len(prefix):] if stem.startswith(prefix) else stem


class ValueHead(torch.nn.Module):
    """A scalar score from the last hidden state (kept in fp32, trained first order)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1))
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def save_pretrained(self, directory: str):
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(directory, VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, directory: str, device="cpu") -> "ValueHead":
        """The value head saved beside a reward adapter (``directory``: the adapter's directory)."""
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(directory, VALUE_HEAD_FILE), device=str(device))
        with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the caller's generator
            head = cls(tensors["linear.weight"].shape[1]).to(device)
        head.load_state_dict(tensors)
        return head


@dataclass
class LoraSettings:
    r: int = 64
    alpha: int = 128
    target_modules: object = "all-linear"
    dropout: float = 0.0


class PolicyAndReward:
    """The peft model with the two adapters, the value head and the switches between them.

    ``shared_lora_init`` (default True) starts the reward adapter as an exact copy of the policy
    adapter (same random ``lora_A``, same zero ``lora_B``): ZOPrO compares the policy's noise with
    ΔR slot by slot, which is only meaningful when both adapters' B matrices act in the same A basis.
    False keeps two independent LoRA draws.
    """

    def __init__(self, model, tokenizer, lora: LoraSettings = LoraSettings(), *,
                 policy_adapter: str = "policy", reward_adapter: str = "reward", seed: int = 0,
                 shared_lora_init: bool = True):
        from peft import LoraConfig, PeftModel, get_peft_model

        if policy_adapter == reward_adapter:
            raise ValueError(f"the policy and reward adapters need different names, both are {policy_adapter!r}")
        for adapter in (policy_adapter, reward_adapter):
            if not adapter.isidentifier():
                raise ValueError(f"adapter name {adapter!r} must be a Python identifier (it becomes a module key)")
        if isinstance(model, PeftModel):
            clash = {policy_adapter, reward_adapter} & set(model.peft_config)
            if clash:
                raise ValueError(f"the model already has adapter(s) named {sorted(clash)}; choose other names")
        self.policy_adapter, self.reward_adapter = policy_adapter, reward_adapter
        self.tokenizer = prepare_tokenizer(tokenizer)
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                            lora_dropout=lora.dropout, bias="none")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        with torch.random.fork_rng():  # LoRA init draws from the global generator: make it the seed's
            torch.manual_seed(seed)
            if isinstance(model, PeftModel):
                model.add_adapter(policy_adapter, config)
            else:
                model = get_peft_model(model, config, adapter_name=policy_adapter)
            model.add_adapter(reward_adapter, config)
            hidden = model.get_base_model().config.hidden_size
            self.value_head = ValueHead(hidden).to(next(model.parameters()).device)
        self.model = model
        self.policy_parameters = self._adapter_parameters(policy_adapter)
        self.reward_parameters = self._adapter_parameters(reward_adapter)
        if self.policy_parameters.keys() != self.reward_parameters.keys():
            raise ValueError("policy and reward adapters adapt different modules; ΔR could not be mapped")
        if shared_lora_init:  # the reward adapter starts as the policy's copy: one A basis for both
            with torch.no_grad():
                for slot, parameter in self.reward_parameters.items():
                    parameter.copy_(self.policy_parameters[slot])
        self.use(policy_adapter)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _adapter_parameters(self, adapter: str) -> dict[str, torch.nn.Parameter]:
        found = {}
        for name, parameter in self.model.named_parameters():
            slot = slot_name(name, adapter)
            if slot is not None:
                found[slot] = parameter
        if not found:
            raise ValueError(f"adapter {adapter!r} has no LoRA tensors (check lora target_modules)")
        return found

    def use(self, adapter: str):
        """Make ``adapter`` the active one; both adapters' tensors stay trainable (peft turns one off)."""
        self.model.set_adapter(adapter)
        for parameter in list(self.policy_parameters.values()) + list(self.reward_parameters.values()):
            parameter.requires_grad_(True)

    @contextlib.contextmanager
    def adapter(self, adapter: str):
        previous = self.model.active_adapter
        self.use(adapter)
        try:
            yield
        finally:
            self.use(previous)

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the base with all adapters disabled."""
        with self.model.disable_adapter():
            yield

    def decoder(self):
        """The transformer body (hidden states, no vocabulary projection)."""
        base = self.model.get_base_model()
        return base.get_decoder() if hasattr(base, "get_decoder") else base.model

    def output_embeddings(self):
        return self.model.get_base_model().get_output_embeddings()

    def policy_tensors(self) -> dict[str, torch.Tensor]:
        return {slot: p.detach().clone() for slot, p in self.policy_parameters.items()}

    def reward_tensors(self) -> dict[str, torch.Tensor]:
        return {slot: p.detach().clone() for slot, p in self.reward_parameters.items()}

    def named_policy_parameters(self):
        """(slot, parameter) pairs in a fixed order, for ZOPrO (names let set_guidance take dicts)."""
        return list(self.policy_parameters.items())

    def save_pretrained(self, directory: str):
        """Both adapters in peft's format: ``directory/policy`` and ``directory/reward`` (with
        ``value_head.safetensors``), whatever the adapters' names; each loads as the "default"
        adapter of ``PeftModel.from_pretrained(base, directory/role)``. Not atomic by itself (the
        loop writes into a temporary directory, then renames it)."""
        os.makedirs(directory, exist_ok=True)
        for role, adapter in (("policy", self.policy_adapter), ("reward", self.reward_adapter)):
            scratch = os.path.join(directory, f".peft-{role}")
            shutil.rmtree(scratch, ignore_errors=True)
            self.model.save_pretrained(scratch, selected_adapters=[adapter])
            # peft puts an adapter other than "default" in a subdirectory named after it
            saved = scratch if adapter == "default" else os.path.join(scratch, adapter)
            target = os.path.join(directory, role)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(saved, target)
            card = os.path.join(scratch, "README.md")  # peft's model card, beside the subdirectory
            if os.path.exists(card):
                os.replace(card, os.path.join(target, "README.md"))
            shutil.rmtree(scratch, ignore_errors=True)
        self.value_head.save_pretrained(os.path.join(directory, "reward"))

    def load_adapter_tensors(self, role: str, tensors: dict[str, torch.Tensor]):
        target = self.policy_parameters if role == "policy" else self.reward_parameters
        missing = target.keys() - tensors.keys()
        if missing:
            raise KeyError(f"{role} checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for slot, parameter in target.items():
                parameter.copy_(tensors[slot])
