"""``ZOTrainer``: a Hugging Face ``transformers.Trainer`` whose optimizer step is a ZOPrO step.

An existing fine-tuning script switches to zeroth order by replacing ``Trainer`` with
``ZOTrainer`` (and, to set ε and the other ZO settings, ``TrainingArguments`` with
``ZOTrainingArguments``). See docs/trainer.md.

How it plugs into Trainer's loop (transformers 5.x, ``Trainer._run_epoch``): the loop calls
``training_step`` once per micro-batch, with ``accelerator.sync_gradients`` set on the last
micro-batch of each optimizer step, and then calls ``optimizer.step()`` without a closure.
``ZOTrainer.training_step`` keeps the micro-batches of the step; on the last one it runs
``ZOPrO.step(closure)``, the closure evaluating all of them at θ+εz and at θ−εz, and returns
(J₊ + J₋)/2 for logging (the earlier micro-batches return 0, so the loop's per-step sum is the
step's loss). The loop's own closure-less ``optimizer.step()`` that follows is then a no-op
(``_install_step_gate``); the loop's scheduler step, logging, evaluation and checkpointing run
unchanged.
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass, field, fields

import torch
from transformers import Trainer, TrainingArguments

from ..alpha import validate_alpha
from ..backends import BACKENDS
from ..direction import DIRECTION_NORMS, GRANULARITIES
from ..optimizer import ZOPrO

__all__ = ["ZOTrainer", "ZOTrainingArguments"]


@dataclass
class ZOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus ZOPrO's settings (``zo_*``).

    The standard arguments keep their meaning: ``learning_rate`` is ZOPrO's η, ``weight_decay`` its
    λ (on the parameters Trainer decays; not on biases and norms), ``seed`` its base seed, and
    ``gradient_accumulation_steps`` the number of micro-batches averaged into each J. Arguments that
    act on gradients (``max_grad_norm``, optimizer choice ``optim``/``optim_args``, Adam's betas)
    have no effect. A plain ``TrainingArguments`` also works with ``ZOTrainer``: the ``zo_*``
    settings then take the defaults below.
    """

    zo_eps: float = field(default=1e-3, metadata={"help": "ε, the perturbation size (MeZO's default 1e-3)."})
    zo_directions: int = field(
        default=1, metadata={"help": "q, two-sided estimates per step (n-SPSA): 2q forward passes per micro-batch."}
    )
    zo_direction_norm: str = field(
        default="policy_delta",
        metadata={"help": f"Scale of a guided z, one of {DIRECTION_NORMS}; unguided steps are the same under both."},
    )
    zo_granularity: str = field(
        default="tensor", metadata={"help": f"Projection and rescale per tensor or globally, one of {GRANULARITIES}."}
    )
    zo_backend: str = field(default="auto", metadata={"help": f"ZOPrO backend, one of {BACKENDS}."})
    zo_master_weights: bool = field(
        default=True, metadata={"help": "Keep an fp32 master copy, so ±εz restores the weights bit for bit."}
    )
    zo_alpha: str = field(
        default="linear",
        metadata={"help": "Guidance weight α: 'linear', 'exp', 'constant' or a number in [0, 1] such as '0.5' "
                          "(matters only once guidance is set)."},
    )
    zo_steps_per_iteration: int | None = field(
        default=None, metadata={"help": "Iteration length for the 'linear'/'exp' α schedules (guided runs only; "
                                        "default: ZOPrO's, the length of the last iteration)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.zo_eps, (int, float)) and math.isfinite(self.zo_eps) and self.zo_eps > 0):
            raise ValueError(f"zo_eps must be a finite number > 0, got {self.zo_eps!r}")
        if isinstance(self.zo_directions, bool) or not isinstance(self.zo_directions, int) or self.zo_directions < 1:
            raise ValueError(f"zo_directions must be a positive int, got {self.zo_directions!r}")
        for name, allowed in (("zo_direction_norm", DIRECTION_NORMS), ("zo_granularity", GRANULARITIES),
                              ("zo_backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        validate_alpha(_parse_alpha(self.zo_alpha))


_ZO_DEFAULTS = {f.name: f.default for f in fields(ZOTrainingArguments) if f.name.startswith("zo_")}
_STEPPED = "_zotrainer_stepped"  # set on the ZOPrO after a ZO step, consumed by the loop's step() call
_GATED = "_zotrainer_gate"


def _parse_alpha(value):
    """α from the command line: a schedule name or a number ("0.5")."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _install_step_gate(optimizer: ZOPrO) -> None:
    """Make the loop's closure-less ``optimizer.step()`` after a ZO step a no-op.

    Only that one call is swallowed (a flag set by ``training_step``); any other call goes to
    ``ZOPrO.step`` as before, so a stray ``step()`` without a closure still raises. The gate is a
    bound method, so a torch LR scheduler created on the optimizer later can still wrap it."""
    if optimizer.__dict__.get(_GATED, False):
        return
    inner = optimizer.step

    def step(self, closure=None):
        if closure is None and self.__dict__.pop(_STEPPED, False):
            return None
        return inner(closure)

    if getattr(inner, "_wrapped_by_lr_sched", False):  # keep a scheduler's "step() was wrapped" mark
        step._wrapped_by_lr_sched = True
    optimizer.step = types.MethodType(step, optimizer)
    optimizer.__dict__[_GATED] = True


class ZOTrainer(Trainer):
    """``transformers.Trainer`` with a zeroth-order (ZOPrO / MeZO-style SPSA) optimizer step.

    Use it as ``Trainer``: ``ZOTrainer(model=..., args=..., train_dataset=..., ...)``. Design:

    - **Optimizer.** Unless ``optimizers=(optimizer, scheduler)`` is given, ``create_optimizer``
      builds ``ZOPrO`` over the model's trainable parameters (``requires_grad``), by name, in
      Trainer's two groups: ``args.weight_decay`` for the parameters Trainer decays, 0 for biases
      and norms. ``lr=args.learning_rate``, ``seed=args.seed``; the ZO settings (ε, q, backend, ...)
      come from the ``zo_*`` fields of ``ZOTrainingArguments`` (defaults when ``args`` is a plain
      ``TrainingArguments``). ``optimizer_cls_and_kwargs=(ZOPrOSubclass, kwargs)`` overrides the
      class and any of those keyword arguments. A supplied optimizer must be a ``ZOPrO`` (possibly
      wrapped); its LR scheduler, or the one Trainer creates from ``lr_scheduler_type``, sets
      ``param_groups[i]["lr"]``, which ZOPrO reads at every step. ``zo_optimizer`` is the ZOPrO
      (e.g. for ``set_guidance`` from a callback).
    - **Step.** No backward pass, no ``.grad``: each optimizer step evaluates ``compute_loss`` on
      its micro-batches at θ+εz and at θ−εz, with the model in eval mode (dropout off, so both
      sides see the same function) under ``torch.no_grad()`` (ZOPrO's), and updates θ from
      (J₊ − J₋)/2ε. The loss logged for the step is (J₊ + J₋)/2.
    - **Gradient accumulation.** With ``gradient_accumulation_steps = G`` there is one ZOPrO step
      per G micro-batches: J is the sum of the micro-batch losses scaled as Trainer scales them for
      its backward pass, i.e. exactly the loss a first-order Trainer would backpropagate for that
      step. When Trainer passes ``num_items_in_batch`` (causal LMs in transformers 5.x) that is the
      token mean over all G micro-batches, the same J as one micro-batch G times larger; otherwise it
      is the mean of the G micro-batch losses. Each of the 2q evaluations runs all G micro-batches.
    - **Checkpoints.** ZOPrO's ``state_dict`` (master weights, run position, guidance) goes into
      Trainer's ``optimizer.pt``; on ``train(resume_from_checkpoint=...)`` Trainer loads the model
      weights, builds the optimizer (``create_optimizer`` re-reads the model into ZOPrO's master
      copy with ``sync_from_model``), then loads ``optimizer.pt``, which restores the master and
      writes it into the model, and the scheduler, data position and RNG states: the resumed run
      continues bit for bit. ``create_optimizer`` re-syncs at every ``train()`` call, so weights
      loaded into the model between calls (e.g. ``load_best_model_at_end``) are adopted.
    - **Not supported.** fp16 mixed precision (its GradScaler needs gradients; bf16 and fp32 work),
      DeepSpeed (it owns the optimizer step). ``max_grad_norm`` is ignored (there is no gradient to
      clip) and no ``grad_norm`` is logged. FSDP, context/sequence parallelism and multi-process
      runs are untested.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise ValueError("ZOTrainer cannot use fp16 mixed precision: its GradScaler needs gradients, and a "
                             "zeroth-order step has none. Use bf16=True or full precision.")
        if self.is_deepspeed_enabled:
            raise ValueError("ZOTrainer does not support DeepSpeed: DeepSpeed's engine owns the optimizer step.")
        self._zo_micro_batches: list = []

    # ---- settings ------------------------------------------------------------------------------
    def _zo_setting(self, name: str):
        return getattr(self.args, name, _ZO_DEFAULTS[name])

    def _zo_optimizer_kwargs(self) -> dict:
        return dict(
            lr=self.args.learning_rate,
            eps=self._zo_setting("zo_eps"),
            seed=self.args.seed,
            weight_decay=self.args.weight_decay,
            alpha=_parse_alpha(self._zo_setting("zo_alpha")),
            steps_per_iteration=self._zo_setting("zo_steps_per_iteration"),
            granularity=self._zo_setting("zo_granularity"),
            backend=self._zo_setting("zo_backend"),
            master_weights=self._zo_setting("zo_master_weights"),
            direction_norm=self._zo_setting("zo_direction_norm"),
            directions=self._zo_setting("zo_directions"),
        )

    def _zo_parameter_groups(self, model) -> list[dict]:
        """Trainer's decay / no-decay split of the trainable parameters, with their names."""
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("ZOTrainer: the model has no trainable parameters (requires_grad=True)")
        groups = [
            {"params": [(n, p) for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    # ---- optimizer -------------------------------------------------------------------------------
    @property
    def zo_optimizer(self) -> ZOPrO:
        """The ZOPrO under ``self.optimizer`` (which accelerate wraps)."""
        optimizer, seen = self.optimizer, set()
        while not isinstance(optimizer, ZOPrO):
            inner = getattr(optimizer, "optimizer", None)
            if inner is None or id(optimizer) in seen:
                raise TypeError(f"ZOTrainer steps with a zopro_kernels.ZOPrO optimizer, got "
                                f"{type(self.optimizer).__name__}; pass optimizers=(ZOPrO(...), scheduler) or none")
            seen.add(id(optimizer))
            optimizer = inner
        return optimizer

    def create_optimizer(self, model=None):
        """Build ZOPrO (see the class docstring) unless one was supplied; then adopt the model's
        current weights as ZOPrO's master copy and make the loop's closure-less step a no-op."""
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            cls, extra = ZOPrO, {}
            if self.optimizer_cls_and_kwargs is not None:
                cls, extra = self.optimizer_cls_and_kwargs
                if not (isinstance(cls, type) and issubclass(cls, ZOPrO)):
                    raise TypeError(f"ZOTrainer: optimizer_cls_and_kwargs must name ZOPrO or a subclass, got {cls!r}")
            self.optimizer = cls(self._zo_parameter_groups(opt_model), **{**self._zo_optimizer_kwargs(), **extra})
        optimizer = self.zo_optimizer
        # The model is the truth when training starts: a resume has just loaded its weights (ZOPrO's
        # state, loaded after this, then restores the master and rewrites the model), and weights
        # loaded between train() calls must not be overwritten by a stale master copy.
        optimizer.sync_from_model()
        _install_step_gate(optimizer)
        return self.optimizer

    # ---- the step --------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        self._zo_micro_batches = []
        return super().train(*args, **kwargs)

    def _zo_loss_is_scaled(self, num_items_in_batch) -> bool:
        """Trainer's rule (``Trainer.training_step``): is compute_loss's value already normalised
        over the whole accumulated batch, or a per-micro-batch mean to divide by G?"""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Keep the micro-batch; on the last micro-batch of an optimizer step, run the ZOPrO step
        over all of them. Returns (J₊ + J₋)/2 then, and 0 for the earlier micro-batches."""
        self._zo_micro_batches.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:  # Trainer will not step the optimizer after this one
            return torch.zeros((), device=self.args.device)
        batches, self._zo_micro_batches = self._zo_micro_batches, []
        optimizer = self.zo_optimizer
        scaled = self._zo_loss_is_scaled(num_items_in_batch)
        accumulation = getattr(self, "current_gradient_accumulation_steps", None) or len(batches)

        def closure():
            total = None
            for batch in batches:
                with self.compute_loss_context_manager():
                    # a shallow copy: compute_loss may pop "labels", and each batch is evaluated 2q times
                    loss = self.compute_loss(model, copy.copy(batch), num_items_in_batch=num_items_in_batch)
                if self.args.n_gpu > 1:
                    loss = loss.mean()  # DataParallel: one loss per device
                loss = loss.detach().to(torch.float64)
                if not scaled:
                    loss = loss / accumulation
                total = loss if total is None else total + loss
            return total

        model.eval()  # dropout off: J₊ and J₋ must come from the same function
        try:
            optimizer.__dict__.pop(_STEPPED, None)
            loss = optimizer.step(closure)
        finally:
            model.train()
        optimizer.__dict__[_STEPPED] = True
        return loss.detach().to(device=self.args.device, dtype=torch.float32)

    # ---- no gradients ----------------------------------------------------------------------------
    def _clip_grad_norm(self, model):
        return None  # nothing to clip: max_grad_norm has no effect

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # no gradient, so no grad_norm in the logs

    def floating_point_ops(self, inputs) -> int:
        """Trainer counts 6·N·tokens (forward and backward); a ZO step runs 2q forwards of 2·N·tokens."""
        flos = super().floating_point_ops(inputs)
        directions = self._zo_setting("zo_directions") if self.optimizer is None else self.zo_optimizer.directions
        return int(flos * 2 * directions / 3)
