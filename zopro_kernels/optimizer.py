"""``ZOPrO``: zeroth-order preference optimisation as a ``torch.optim.Optimizer``.

Each ``step(closure)`` is two-sided SPSA along the ZOPrO direction z (eq. 2, ``direction.py``):

    θ₀ + εz → J₊ = closure();  θ₀ − εz → J₋ = closure()
    g = (J₊ − J₋) / 2ε;        θ₀ ← θ₀ − η (g z + λ θ₀)

Without guidance z is Gaussian noise and this is plain SPSA (MeZO).
"""

from __future__ import annotations

import math
import numbers

import torch

from .alpha import AlphaSchedule, alpha_at, needs_iteration_length, validate_alpha
from .backends import BACKENDS
from .direction import DIRECTION_NORMS, GRANULARITIES
from .distributed import Communicator, agreed_seed, default_process_group, layout_hash, local_piece
from .engine import ZOEngine
from .parameter_set import build_parameter_sets, describe, validate_parameter
from .philox import check_seed
from .seeds import step_seed


def dist_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


class StepCounter:
    """A count of steps kept on the device between reads: adding never syncs; reading folds it in."""

    def __init__(self, value: int = 0):
        self._host, self._device = int(value), None

    def add(self, flags: torch.Tensor):
        self._device = flags if self._device is None else self._device + flags

    @property
    def value(self) -> int:
        if self._device is not None:
            self._host += int(self._device)
            self._device = None
        return self._host


STATE_FORMAT = 1
CONSISTENCY_CHECK_EVERY = 100  # steps between host-side checks that processes agree (no sync otherwise)
_ARENAS = ("master", "policy_delta", "reward_delta", "snapshot")
# Settings a state dict was saved under that the loading optimizer must share.
_RESUME_SETTINGS = ("granularity", "master_weights", "direction_norm", "directions")
_RUN_KEYS = ("seed", "global_step", "iteration_step", "nonfinite_steps")  # the run position: required


class ZOPrO(torch.optim.Optimizer):
    """Zeroth-order optimizer with ZOPrO's guided perturbations.

    Args:
        params: tensors, param-group dicts, or ``model.named_parameters()`` (names let
            ``set_guidance`` take dicts keyed by parameter name).
        lr: learning rate η.  eps: perturbation size ε.  weight_decay: λ (decoupled from g).
        seed: base seed; step k uses ``step_seed(seed, k)``. ``None``: drawn on rank 0 and
            broadcast to every process of ``process_group``.
        alpha: "linear" (1−1e-3 → 0 over ``steps_per_iteration``), "exp", "constant",
            a float in [0, 1], or a callable ``step_in_iteration -> float``.
        steps_per_iteration: length of an iteration, for the "linear" and "exp" schedules. Default
            (None): the length of the last iteration, i.e. the steps between the last two
            ``mark_iteration`` calls; guidance before any such iteration then needs this argument.
        granularity: "tensor" (projection and ‖Δπ‖ rescale per tensor, as the authors'
            implementation and the paper's numbers) or "global" (over the whole vector, as eq. 2 is written).
        backend: "auto", "torch", "triton", "cuda" or "cpu" (compiled CPU passes; "auto" picks it for CPU tensors when built).
        master_weights: keep an fp32 master copy so ±εz restores weights bit for bit (default).
            ``False`` perturbs the model's tensors in place: less memory, but 16-bit weights drift.
        guidance_dtype: storage of Δπ and ΔR: fp32 (default) or bf16, which halves their memory
            and their share of every pass's traffic (the projection stays exact for the stored ΔR).
        direction_norm: the scale of a guided z. "policy_delta" (eq. 2 as published): ‖z‖ ≈ ‖Δπ‖,
            so guided updates scale with ‖Δπ‖² and the right lr changes from iteration to
            iteration. "noise": z is rescaled per unit to ‖z‖ ≈ √d, the norm of N(0, I) noise, so
            ε and lr mean the same with and without guidance and in every iteration.
        directions: q, the number of two-sided estimates per step (n-SPSA): the update is the mean
            of q estimates g_i z_i, each with its own seed (2q closure calls per step). q = 1 is
            the default and the plain method.
        max_projected_grad: a bound on |g| = |J₊ − J₋| / 2ε, the step's measured directional
            derivative (None: no bound, the default). Under ``direction_norm="noise"`` ‖z‖ ≈ √d, so
            it bounds every update's length to lr·max_projected_grad·√d: a trust region against
            the rare batch whose g is orders of magnitude above the usual ones. ``clipped_steps``
            counts the steps where it bound; the loop logs g per step to choose it from.
        process_group: the torch.distributed group of a data-parallel or sharded run (default:
            the world group when torch.distributed is initialised). Only scalars cross it per
            step (see ``distributed.py``); every process must call ``step``, ``set_guidance``,
            ``mark_iteration`` and ``load_state_dict`` together.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        eps: float = 1e-5,
        *,
        seed: int | None = 0,
        weight_decay: float = 0.0,
        alpha: AlphaSchedule = "linear",
        steps_per_iteration: int | None = None,
        granularity: str = "tensor",
        backend: str = "auto",
        master_weights: bool = True,
        guidance_dtype: torch.dtype = torch.float32,
        direction_norm: str = "policy_delta",
        directions: int = 1,
        max_projected_grad: float | None = None,
        process_group=None,
    ):
        if seed is not None:
            check_seed(seed)
        validate_alpha(alpha)
        if steps_per_iteration is not None and (
            isinstance(steps_per_iteration, bool)
            or not isinstance(steps_per_iteration, int)
            or steps_per_iteration < 1
        ):
            raise ValueError(f"steps_per_iteration must be a positive int, got {steps_per_iteration!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if guidance_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"guidance_dtype must be torch.float32 or torch.bfloat16, got {guidance_dtype}")
        if direction_norm not in DIRECTION_NORMS:
            raise ValueError(f"direction_norm must be one of {DIRECTION_NORMS}, got {direction_norm!r}")
        if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
            raise ValueError(f"directions must be a positive int, got {directions!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if max_projected_grad is not None and (isinstance(max_projected_grad, bool)
                                               or not isinstance(max_projected_grad, numbers.Real)
                                               or not max_projected_grad > 0 or math.isinf(max_projected_grad)):
            raise ValueError(f"max_projected_grad must be a finite number > 0 or None, got {max_projected_grad!r}")
        self._engine = None
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        self.process_group = default_process_group(process_group)
        self.seed = agreed_seed(seed, self.process_group)
        self.alpha = alpha
        self.steps_per_iteration = steps_per_iteration
        self.granularity = granularity
        self.backend = backend
        self.master_weights = bool(master_weights)
        self.guidance_dtype = guidance_dtype
        self.direction_norm = direction_norm
        self.directions = directions
        self.max_projected_grad = None if max_projected_grad is None else float(max_projected_grad)
        self._warned_still = False
        self.global_step = 0
        self.iteration_step = 0
        self._nonfinite = StepCounter()  # steps with a NaN/inf loss
        self._clipped = StepCounter()  # steps where max_projected_grad bound
        self._hyper_cache = None
        self._hyper_rows = None  # per set: each tensor's param-group index, on the set's device
        self._marked = False  # mark_iteration has recorded a snapshot
        self._last_iteration_length = None  # steps of the last iteration closed by mark_iteration
        self._checked_step = None  # global step of the last cross-process agreement check
        self.last_step: dict = {}

    # ---- torch.optim plumbing ---------------------------------------------------------------
    def add_param_group(self, param_group):
        if getattr(self, "_engine", None) is not None:
            raise RuntimeError("ZOPrO cannot take new parameter groups after its first use; "
                               "create it with all groups")
        for key, low, strict in (("lr", 0.0, False), ("eps", 0.0, True), ("weight_decay", 0.0, False)):
            value = param_group.get(key, self.defaults[key])
            if not isinstance(value, (int, float, torch.Tensor)) or not math.isfinite(float(value)) or (
                float(value) <= low if strict else float(value) < low
            ):
                bound = "> 0" if strict else ">= 0"
                raise ValueError(f"{key} must be a finite number {bound}, got {value!r}")
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("eps", 1e-5)
            group.setdefault("weight_decay", 0.0)

    def _flat_parameters(self):
        params, names = [], []
        for group in self.param_groups:
            group_names = group.get("param_names") or [None] * len(group["params"])
            params.extend(group["params"])
            names.extend(group_names)
        return params, names

    def _ensure_engine(self) -> ZOEngine:
        if self._engine is None:
            params, names = self._flat_parameters()
            trained = self._trained_positions(params, names)
            for i in trained:
                validate_parameter(params[i], names[i], i)
            self._check_distinct(params, names, trained)
            self._pieces = {i: local_piece(params[i]) for i in trained}
            for i, (local, *_rest) in self._pieces.items():
                validate_parameter(local, names[i], i)
            pieces = [self._pieces[i] for i in trained]
            group = self.process_group
            self._communicator = Communicator(group) if group is not None and dist_size(group) > 1 else None
            if self._communicator is not None:
                self._communicator.agree_on_layout(self.seed, self.global_step,
                                                   sum(n for _, n, _, _ in pieces), len(pieces),
                                                   layout_hash([params[i] for i in trained]))
            sets = build_parameter_sets([piece[:3] for piece in pieces], [names[i] for i in trained],
                                        self.master_weights, self.guidance_dtype, positions=trained)
            self._engine = ZOEngine(
                sets, self.backend, self.granularity, parameter_count=len(pieces),
                home=pieces[0][0].device, sharded=[piece[3] for piece in pieces],
                communicator=self._communicator, numels=[piece[1] for piece in pieces],
                direction_norm=self.direction_norm,
            )
            self._group_index = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        else:
            self._engine.check_unmoved()
        return self._engine

    def _trained_positions(self, params, names) -> list[int]:
        """Positions of the parameters ZOPrO trains. As with torch.optim, a parameter with
        ``requires_grad=False`` beside others that require it (a peft model's frozen base) is left
        alone: no pass, no master copy. When none requires grad (plain tensors: ZO needs no
        gradients), all are trained. Decided at first use; the noise's index layout is that of the
        trained parameters only, so passing the trained ones alone gives the same steps."""
        flags = [not isinstance(p, torch.Tensor) or p.requires_grad for p in params]
        if not any(flags):
            return list(range(len(params)))
        trained = [i for i, flag in enumerate(flags) if flag]
        frozen = len(params) - len(trained)
        if frozen:
            import warnings

            warnings.warn(f"ZOPrO: {frozen} of {len(params)} parameters have requires_grad=False and are "
                          "left alone (not perturbed, not updated, no master copy).", stacklevel=4)
        return trained

    def _layout(self) -> int:
        """The hash of the trained parameters' full shapes, dtypes and order (the processes agree on
        it; a state dict carries it)."""
        params, _ = self._flat_parameters()
        return layout_hash([params[i] for i in self._pieces])

    @staticmethod
    def _check_distinct(params, names, trained):
        """Each value is trained once: the same tensor twice, or two views of overlapping memory,
        would be perturbed twice per pass."""
        spans, seen = [], {}
        for i in trained:
            if id(params[i]) in seen:  # also an empty tensor given twice
                first = seen[id(params[i])]
                raise ValueError(f"{describe(names[first], first)} and {describe(names[i], i)} are the same tensor: "
                                 "pass each parameter once")
            seen[id(params[i])] = i
            local = local_piece(params[i])[0]
            if local.numel() == 0:
                continue
            start = local.untyped_storage().data_ptr() + local.storage_offset() * local.element_size()
            spans.append((start, start + local.numel() * local.element_size(), i))
        spans.sort()
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError(f"{describe(names[first], first)} and {describe(names[second], second)} share "
                                 "memory (the same tensor twice, or overlapping views): pass each parameter once")

    def _hyperparameters(self):
        """Per set: [T] float64 vectors of (lr, eps, weight_decay), rebuilt when a group changes
        (a scheduler: every step). Without a blocking transfer: the group values go into a fresh
        (pinned, with CUDA) host table, copied non-blocking and gathered on the device by each
        tensor's group index, which is made once."""
        key = tuple((float(g["lr"]), float(g["eps"]), float(g["weight_decay"])) for g in self.param_groups)
        if self._hyper_cache is None or self._hyper_cache[0] != key:
            for index, (lr, _, weight_decay) in enumerate(key):
                if lr * weight_decay > 1:  # θ(1 − ηλ) would flip the weights' sign, then blow up
                    raise ValueError(f"param group {index}: lr × weight_decay = {lr * weight_decay:g} is over 1 "
                                     f"(lr={lr:g}, weight_decay={weight_decay:g}); decoupled decay needs it ≤ 1")
            sets = self._engine.sets
            if self._hyper_rows is None:
                self._hyper_rows = [torch.tensor([self._group_index[i] for i in s.indices], device=s.device)
                                    for s in sets]
            pinned = torch.cuda.is_available() and any(s.device.type == "cuda" for s in sets)
            host = torch.empty((len(key), 3), dtype=torch.float64, pin_memory=pinned)
            for group, values in enumerate(key):
                for column, value in enumerate(values):
                    host[group, column] = value
            on_device, vectors = {}, []
            for s, rows in zip(sets, self._hyper_rows):
                if s.device not in on_device:
                    on_device[s.device] = host.to(s.device, non_blocking=True)
                vectors.append(on_device[s.device][rows].unbind(dim=1))
            self._hyper_cache = (key, vectors)
        return self._hyper_cache[1]

    # ---- the step --------------------------------------------------------------------------
    def current_alpha(self) -> float:
        """α for the next step (meaningful once Δπ is set; 0 while a decay's length is unknown,
        which is only before any Δπ can be)."""
        if needs_iteration_length(self.alpha) and self.iteration_length is None:
            return 0.0
        return alpha_at(self.alpha, self.iteration_step, self.iteration_length)

    @property
    def iteration_length(self) -> int | None:
        """The steps α decays over: ``steps_per_iteration``, or else the length of the last
        iteration (steps between the last two ``mark_iteration`` calls); None while unknown."""
        return self.steps_per_iteration if self.steps_per_iteration is not None else self._last_iteration_length

    @torch.no_grad()
    def step(self, closure=None):
        """One ZO step. ``closure`` re-evaluates the model and returns the loss (a scalar tensor or
        float); it is called twice per direction (``directions`` of them), at θ+εz and θ−εz, under
        ``torch.no_grad()``. Returns the mean of the losses. A non-finite loss skips that direction's
        update and leaves the weights as they were (bit for bit with master weights);
        ``nonfinite_steps`` counts steps where that happened."""
        if closure is None:
            raise RuntimeError(
                "ZOPrO.step needs a closure: step(lambda: loss_fn(model(x), y)). It is called at "
                "θ+εz and θ−εz and must return the loss."
            )
        engine = self._ensure_engine()
        alpha = self.current_alpha() if engine.has_policy else 0.0
        use_policy = engine.has_policy and alpha != 0.0
        hyper = self._hyperparameters()
        eps = [h[1] for h in hyper]
        ones = [torch.ones_like(e) for e in eps]
        q = self.directions
        # direction i of step k has its own seed; direction 0's is the one-direction seed
        seeds = [step_seed(self.seed, self.global_step, i) for i in range(q)]
        apply = lambda seed, coefs, scales, keeps, **kw: engine.apply_(  # noqa: E731
            seed, coefs, scales, keeps, use_policy=use_policy, **kw
        )

        estimates = []  # per direction: (coefficients, J₊, J₋)
        offset = None  # where the weights are: θ₀ + offset·z of (seed, coefs), None at θ₀
        try:
            for seed in seeds:
                coefs = engine.coefficients(seed, alpha)
                apply(seed, coefs, eps, ones, write_master=False)
                offset = (seed, coefs, eps)
                loss_plus = self._loss_value(closure(), "θ+εz")
                second = [-e for e in eps] if self.master_weights else [-2 * e for e in eps]
                apply(seed, coefs, second, ones, write_master=False)
                offset = (seed, coefs, [-e for e in eps])
                loss_minus = self._loss_value(closure(), "θ−εz").to(loss_plus.device)
                if q > 1 and not self.master_weights:  # back to θ₀ (in place) before the next direction
                    apply(seed, coefs, eps, ones, write_master=False)
                    offset = None
                estimates.append([coefs, *self._agreed_losses(engine, seed, loss_plus, loss_minus)])
        except BaseException:
            # a closure that raised (or returned a bad value, or an interrupt): the weights go back
            # to θ₀, exactly from the master copy, before the error propagates; the step did not happen
            if offset is not None:
                seed, coefs, at = offset
                back = [torch.zeros_like(e) for e in eps] if self.master_weights else [-e for e in at]
                apply(seed, coefs, back, ones, write_master=False)
            raise

        finites = [torch.isfinite(lp) & torch.isfinite(lm) for _, lp, lm in estimates]
        any_finite = finites[0] if q == 1 else torch.stack(finites).any()
        fused = q == 1 and not self.master_weights  # the update continues from θ₀ − εz
        limit = self.max_projected_grad
        clipped = None if limit is None else torch.zeros((), dtype=torch.bool, device=engine.home)
        for i, ((coefs, loss_plus, loss_minus), finite) in enumerate(zip(estimates, finites)):
            half_difference = torch.where(finite, (loss_plus - loss_minus) / 2, 0.0)
            scales, keeps = [], []
            for s, (lr, eps_t, wd) in zip(engine.sets, hyper):
                ok = finite.to(s.device)
                grad = half_difference.to(s.device) / eps_t  # g per tensor: (J₊ − J₋) / 2ε
                if limit is not None:  # the trust region: on the device, no host read
                    clipped = clipped | (grad.abs() > limit).any().to(engine.home)
                    grad = grad.clamp(-limit, limit)
                if q > 1:
                    grad = grad / q  # the mean of q estimates g_i z_i
                # weight decay once per step, with the first direction's pass
                keep = torch.where(any_finite.to(s.device), 1.0 - lr * wd, 1.0) if i == 0 else torch.ones_like(lr)
                if not fused:
                    scales.append(torch.where(ok, -lr * grad, 0.0))
                else:  # from θ₀ − εz: θ₀(1 − ηλ) − ηg z = keep·θ + (ε·keep − ηg) z
                    scales.append(torch.where(ok, eps_t * keep - lr * grad, eps_t))
                keeps.append(keep)
            last = i == q - 1
            next_seed = step_seed(self.seed, self.global_step + 1) if last and engine.wants_statistics() else None
            apply(seeds[i], coefs, scales, keeps, write_master=True, next_seed=next_seed)

        skipped = (~torch.stack(finites).all()).to(torch.int64)
        self._nonfinite.add(skipped)
        if clipped is not None:
            self._clipped.add(clipped.to(torch.int64))
        loss_plus = torch.stack([lp for _, lp, _ in estimates]).mean()
        loss_minus = torch.stack([lm for _, _, lm in estimates]).mean()
        finite_all = torch.isfinite(loss_plus) & torch.isfinite(loss_minus)
        self.last_step = {
            "seed": seeds[0],
            "alpha": alpha,
            "loss_plus": loss_plus,
            "loss_minus": loss_minus,
            "projected_grad": torch.where(finite_all, (loss_plus - loss_minus) / 2, 0.0)
            / float(self.param_groups[0]["eps"]),  # as measured, before max_projected_grad
            "clipped": False if clipped is None else clipped,
        }
        self.global_step += 1
        self.iteration_step += 1
        return (loss_plus + loss_minus) / 2

    def _agreed_losses(self, engine, seed, loss_plus, loss_minus):
        """Data parallel: J₊ and J₋ averaged over the processes (alone: as they are)."""
        if self._communicator is None:
            return loss_plus, loss_minus
        loss_plus, loss_minus, positions = self._communicator.mean_losses(loss_plus, loss_minus, seed, self.global_step)
        if self._checked_step is None or self.global_step - self._checked_step >= CONSISTENCY_CHECK_EVERY:
            self._communicator.check_agreement(positions)
            self._checked_step = self.global_step
        return loss_plus.to(engine.home), loss_minus.to(engine.home)

    def _loss_value(self, loss, where: str) -> torch.Tensor:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"the closure must return a scalar loss; got shape {tuple(loss.shape)} at {where}")
            return loss.detach().reshape(()).to(torch.float64)
        if isinstance(loss, numbers.Real) and not isinstance(loss, bool):  # int, float, numpy scalars
            # made where the step's arithmetic runs: a fill, not a host-to-device copy per step
            return torch.full((), float(loss), dtype=torch.float64, device=self._engine.home)
        raise TypeError(f"the closure must return a tensor or a float, got {type(loss).__name__} at {where}")

    @property
    def nonfinite_steps(self) -> int:
        """Steps whose loss was NaN/inf and whose update was skipped."""
        return self._nonfinite.value

    @property
    def clipped_steps(self) -> int:
        """Steps where ``max_projected_grad`` bound |g| (for some tensor or direction)."""
        return self._clipped.value

    @property
    def communicated_bytes(self) -> int:
        """Bytes this process has sent to the others (0 when running alone)."""
        communicator = getattr(self, "_communicator", None)
        return communicator.bytes_sent if communicator is not None else 0

    # ---- guidance --------------------------------------------------------------------------
    def set_guidance(self, policy_delta=None, reward_delta=None):
        """Set Δπ (the policy's last update) and/or ΔR (the reward model's last update).

        Each is a list aligned with the parameters (None entries: zero) or a dict keyed by
        parameter name (missing names: zero). An argument left as None is unchanged; use
        ``clear_guidance`` to drop guidance. Values are copied (master dtype)."""
        engine = self._ensure_engine()
        # both checked before either is stored: a bad argument changes nothing
        policy = self._align(policy_delta, "policy_delta") if policy_delta is not None else None
        reward = self._align(reward_delta, "reward_delta") if reward_delta is not None else None
        if policy is not None:
            self._require_iteration_length()
        if policy is not None:
            aligned = policy
            for s in engine.sets:
                self._store(s, "policy_delta", [aligned[i] for i in s.indices])
            engine.has_policy = True
            engine.guidance_changed(reward=False)
            self._warn_still_units()
        if reward is not None:
            aligned = reward
            for s in engine.sets:
                self._store(s, "reward_delta", [aligned[i] for i in s.indices])
            engine.has_reward = True
            engine.guidance_changed(reward=True)

    def clear_guidance(self):
        """Forget Δπ and ΔR: the next steps are plain SPSA."""
        engine = self._ensure_engine()
        for s in engine.sets:
            self._store(s, "policy_delta", [None] * len(s))
            self._store(s, "reward_delta", [None] * len(s))
        engine.has_policy = engine.has_reward = False
        engine.guidance_changed(reward=True)

    def mark_iteration(self):
        """End an iteration: Δπ ← θ − θ at the previous mark (the first call only records θ),
        and α restarts. Call it once before training and after each iteration."""
        engine = self._ensure_engine()
        forms_delta = self._marked
        if self.iteration_step > 0:
            self._last_iteration_length = self.iteration_step
        if forms_delta:
            self._require_iteration_length()
        for s in engine.sets:
            current = s.current_values()
            if forms_delta:
                s.policy_delta = (current - s.snapshot).to(s.guidance_arena_dtype)
                s.policy_sq = s.squared_norms(s.policy_delta)
            s.snapshot = current.clone()
        if forms_delta:
            engine.has_policy = True
            engine.guidance_changed(reward=False)
            self._warn_still_units()
        self._marked = True
        self.iteration_step = 0

    def _warn_still_units(self):
        """Say once that some tensors have Δπ = 0: their guided direction has no Δπ part (see
        ``direction.py``: still under "policy_delta", projected noise at the guided scale under "noise")."""
        still = self._engine.still_policy_units()
        if still and not self._warned_still:
            import warnings

            unit = f"{still} tensor(s)" if self.granularity == "tensor" else "the whole vector"
            effect = ("stays still in guided steps" if self.direction_norm == "policy_delta"
                      else "gets only the noise part of z, at the guided scale")
            warnings.warn(f"ZOPrO: Δπ is 0 for {unit}; that part {effect} (never raw noise at the guided "
                          "step size). Said once.", stacklevel=3)
            self._warned_still = True

    def sync_from_model(self):
        """Re-read the parameters after they were changed or moved outside the optimizer
        (e.g. ``model.load_state_dict``): the master copy is overwritten by the model's values."""
        engine = self._ensure_engine() if self._engine is None else self._engine
        for s in engine.sets:
            s.sync_from_model()

    def _require_iteration_length(self):
        if needs_iteration_length(self.alpha) and self.iteration_length is None:
            raise ValueError(
                f"alpha={self.alpha!r} decays over an iteration whose length is not known yet: pass "
                "steps_per_iteration=... to ZOPrO, or call mark_iteration() before and after an iteration "
                "of steps (the next one then decays over as many steps), or use alpha='constant', a float "
                "or a callable"
            )

    def _align(self, deltas, what: str) -> list:
        params, names = self._flat_parameters()
        if isinstance(deltas, dict):
            if any(n is None for n in names):
                raise ValueError(f"{what} is a dict, but the parameters have no names: "
                                 "create ZOPrO with model.named_parameters()")
            position = {n: i for i, n in enumerate(names)}
            unknown = [k for k in deltas if k not in position]
            if unknown:
                raise ValueError(f"{what} names unknown parameters: {unknown[:5]}")
            aligned = [None] * len(params)
            for k, v in deltas.items():
                aligned[position[k]] = v
        elif isinstance(deltas, (list, tuple)):
            if len(deltas) != len(params):
                raise ValueError(f"{what} has {len(deltas)} entries for {len(params)} parameters")
            aligned = list(deltas)
        else:
            raise TypeError(f"{what} must be a list or a dict of tensors, got {type(deltas).__name__}")
        for i, (p, d) in enumerate(zip(params, aligned)):
            if d is None:
                continue
            where = f"{what} for {describe(names[i], i)}"
            if i not in self._pieces:
                raise ValueError(f"{where} was given, but that parameter has requires_grad=False and is not "
                                 "trained by ZOPrO")
            if not isinstance(d, torch.Tensor):
                raise ValueError(f"{where} is a {type(d).__name__}, not a tensor")
            if d.shape != p.shape:
                raise ValueError(f"{where} has shape {tuple(d.shape)}, expected {tuple(p.shape)}")
            allowed = {p.dtype, torch.float32 if p.dtype != torch.float64 else torch.float64}
            if d.dtype not in allowed:
                raise ValueError(f"{where} has dtype {d.dtype}, expected one of {sorted(map(str, allowed))}")
            if d.device != p.device:
                raise ValueError(f"{where} is on {d.device}, the parameter on {p.device}")
            aligned[i] = self._local_values(i, d)
            if not bool(torch.isfinite(aligned[i]).all()):
                raise ValueError(f"{where} has NaN or infinite values")
        return aligned

    def _local_values(self, i: int, tensor: torch.Tensor) -> torch.Tensor:
        """This process's piece of a value given for parameter i (a DTensor, or the full tensor)."""
        local, full_numel, offset, sharded = self._pieces[i]
        if local_piece(tensor)[0] is not tensor:  # a DTensor: take its local shard
            return local_piece(tensor)[0]
        if sharded:
            return tensor.detach().reshape(-1)[offset : offset + local.numel()]
        return tensor

    @staticmethod
    def _store(s, key: str, tensors: list):
        norm_key = {"policy_delta": "policy_sq", "reward_delta": "reward_sq"}.get(key)
        dtype = s.guidance_arena_dtype if norm_key else None
        arena = None if all(t is None for t in tensors) else s.flatten(tensors, dtype)
        setattr(s, key, arena)
        if norm_key:
            setattr(s, norm_key, None if arena is None else s.squared_norms(arena))

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self):
        """torch.optim layout plus the master weights, guidance and snapshot per parameter
        (cloned) and, under "zopro", the run position: a resumed run continues bit for bit."""
        engine = self._ensure_engine()
        sd = super().state_dict()
        state = {}
        for s in engine.sets:
            for key in _ARENAS:
                arena = getattr(s, key)
                if arena is None:
                    continue
                for t, view in enumerate(s.views(arena)):
                    state.setdefault(s.indices[t], {})[key] = view.view_as(s.params[t]).clone()
        sd["state"] = state
        sd["zopro"] = {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "global_step": self.global_step,
            "iteration_step": self.iteration_step,
            "nonfinite_steps": self.nonfinite_steps,
            "clipped_steps": self.clipped_steps,
            "granularity": self.granularity,
            "master_weights": self.master_weights,
            "direction_norm": self.direction_norm,
            "directions": self.directions,
            "has_policy": engine.has_policy,
            "has_reward": engine.has_reward,
            "marked": self._marked,
            "iteration_length": self._last_iteration_length,
            "layout": self._layout(),
        }
        return sd

    def load_state_dict(self, state_dict):
        if not isinstance(state_dict, dict) or "zopro" not in state_dict:
            raise ValueError("not a ZOPrO state dict (no 'zopro' entry)")
        run = state_dict["zopro"]
        if not isinstance(run, dict) or run.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported ZOPrO state format {run.get('format') if isinstance(run, dict) else run!r}")
        missing = [key for key in ("param_groups", "state") if key not in state_dict]
        missing += [f"zopro.{key}" for key in _RUN_KEYS if key not in run]
        if missing:
            raise ValueError(f"the ZOPrO state dict is incomplete (truncated?): it lacks {', '.join(missing)}")
        for key in _RESUME_SETTINGS:  # a changed one would make the resumed run silently diverge
            if key in run and run[key] != getattr(self, key):
                raise ValueError(f"cannot load a ZOPrO state saved with {key}={run[key]!r} into an optimizer "
                                 f"with {key}={getattr(self, key)!r}: create it with {key}={run[key]!r}")
        engine = self._ensure_engine()
        if run.get("layout") is not None and run["layout"] != self._layout():
            raise ValueError("this ZOPrO state was saved for parameters of other shapes, dtypes or order "
                             "(another model, or other parameters frozen)")
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        state = state_dict.get("state", {})
        params, names = self._flat_parameters()
        for i, entry in state.items():
            if i not in self._pieces:
                raise ValueError(f"the state dict has optimizer state for {describe(names[i] if i < len(names) else None, i)}, "
                                 "which this optimizer does not train (requires_grad=False, or another parameter list)")
            for key, value in entry.items():
                local = self._pieces[i][0]  # a sharded run saves each process's shards
                if key in _ARENAS and tuple(value.shape) != tuple(local.shape):
                    raise ValueError(f"state {key!r} for {describe(names[i], i)} has shape "
                                     f"{tuple(value.shape)}, expected {tuple(local.shape)}")
        for s in engine.sets:
            for key in _ARENAS:
                saved = [state.get(i, {}).get(key) for i in s.indices]
                if key == "master":
                    if all(v is None for v in saved):
                        continue  # saved without master weights: keep ours (from the model)
                    values = [v.to(s.device) for v in saved]
                    if s.master is not None:
                        for view, v in zip(s.views(s.master), values):
                            view.copy_(v.reshape(-1))
                    for p, v in zip(s.params, values):  # the model's tensors follow the master
                        p.detach().copy_(v)
                    continue
                self._store(s, key, [None if v is None else v.to(s.device) for v in saved])
        engine.has_policy = run.get("has_policy", any(s.policy_delta is not None for s in engine.sets))
        engine.has_reward = run.get("has_reward", any(s.reward_delta is not None for s in engine.sets))
        engine.guidance_changed(reward=True)
        self._marked = run.get("marked", any(s.snapshot is not None for s in engine.sets))
        self._last_iteration_length = run.get("iteration_length")
        self._checked_step = None
        self.seed = run["seed"]
        self.global_step = run["global_step"]
        self.iteration_step = run["iteration_step"]
        self._nonfinite = StepCounter(run["nonfinite_steps"])
        self._clipped = StepCounter(run.get("clipped_steps", 0))  # absent from states saved before the bound existed
        self._hyper_cache = None
