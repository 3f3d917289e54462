"""``zopro_kernels.integrations.ZOTrainer``: the Hugging Face Trainer with ZOPrO steps.

A tiny Llama (2 layers, hidden 32, vocab 64) with a LoRA adapter (r=4 on q_proj, v_proj), built
here (no downloads), on synthetic causal-LM data. Every Trainer runs on the CPU in about a second.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

from torch.utils.data import Dataset  # noqa: E402

from zopro_kernels import ZOPrO  # noqa: E402
from zopro_kernels.integrations import ZOTrainer, ZOTrainingArguments  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # from peft

DOCS = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"
LENGTH = 16
PAD = 0


class Pattern(Dataset):
    """A repeated 8-token pattern (next token = a fixed function of the current one), shifted by the
    example's index. ``valid[i]``: the first tokens of example i that are real; the rest is padding
    (attention_mask 0, labels -100)."""

    def __init__(self, n=32, valid=None):
        self.items = []
        for i in range(n):
            ids = torch.tensor([(3 * j + i) % 8 + 1 for j in range(LENGTH)])
            keep = LENGTH if valid is None else valid[i]
            mask = (torch.arange(LENGTH) < keep).long()
            self.items.append(dict(input_ids=torch.where(mask.bool(), ids, PAD), attention_mask=mask,
                                   labels=torch.where(mask.bool(), ids, -100)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny_model(seed=0, lora_seed=None):
    """The base from ``seed``; the LoRA init from ``lora_seed`` (default: continues ``seed``'s stream)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    base = transformers.LlamaForCausalLM(config)
    if lora_seed is not None:
        torch.manual_seed(lora_seed)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def zo_args(out, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2, zo_eps=1e-3,
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                  disable_tqdm=True, seed=0, dataloader_num_workers=0)
    kwargs.update(overrides)
    return ZOTrainingArguments(**kwargs)


def snapshot(model, trainable=True):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


def step_losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def step_lrs(trainer):
    return [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]


class Snapshots(transformers.TrainerCallback):
    """The trainable tensors after each optimizer step."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = snapshot(model)


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class Recording(ZOTrainer):
    """Records every ``compute_loss`` call during training: θ, the micro-batch, the mode, the lr."""

    calls: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.is_in_train:
            self.calls.append(dict(
                params=snapshot(self.model), inputs={k: v.clone() for k, v in inputs.items()},
                grad_enabled=torch.is_grad_enabled(), training=model.training,
                lr=self.optimizer.param_groups[0]["lr"], num_items=num_items_in_batch,
            ))
        return loss


def test_import_is_lazy():
    """``import zopro_kernels`` (and the integrations package) does not import transformers."""
    code = ("import sys, zopro_kernels, zopro_kernels.integrations as i; "
            "assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules; "
            "assert 'ZOTrainer' in dir(i); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_arguments_build_the_optimizer(tmp_path):
    """ZOTrainingArguments parse from the command line and are checked; the optimizer gets lr,
    weight decay and seed from the standard arguments and ε from zo_eps, with the defaults for a
    plain TrainingArguments; optimizer_cls_and_kwargs overrides them."""
    parser = transformers.HfArgumentParser(ZOTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--zo_eps", "1e-4", "--zo_alpha", "0.5", "--zo_directions", "2",
         "--zo_master_weights", "false", "--use_cpu", "--report_to", "none"])
    assert (args.zo_eps, args.zo_alpha, args.zo_directions, args.zo_master_weights) == (1e-4, "0.5", 2, False)
    with pytest.raises(ValueError, match="zo_eps"):
        zo_args(tmp_path, zo_eps=0.0)
    with pytest.raises(ValueError, match="zo_backend"):
        zo_args(tmp_path, zo_backend="gpu")

    model = tiny_model()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    plain = transformers.TrainingArguments(output_dir=str(tmp_path), learning_rate=0.02, weight_decay=0.1, seed=5,
                                           use_cpu=True, report_to="none")
    optimizer = ZOTrainer(model=model, args=plain, train_dataset=Pattern()).create_optimizer()
    (group,) = optimizer.param_groups  # LoRA matrices are all in Trainer's weight-decay group
    assert (group["lr"], group["eps"], group["weight_decay"]) == (0.02, 1e-3, 0.1)
    assert sorted(group["param_names"]) == trainable
    assert optimizer.seed == 5 and optimizer.directions == 1 and optimizer.master_weights

    trainer = ZOTrainer(model=model, args=args, train_dataset=Pattern(),
                        optimizer_cls_and_kwargs=(ZOPrO, {"eps": 1e-2}))
    trainer.create_optimizer()
    zo = trainer.zo_optimizer
    assert zo.param_groups[0]["eps"] == 1e-2 and zo.directions == 2 and not zo.master_weights and zo.alpha == 0.5


def test_zo_training_lowers_the_loss_and_changes_only_the_adapter(tmp_path):
    """(a) the loss falls over 40 ZO steps; (b) only the LoRA tensors change, the base is
    bit-identical, and the optimizer holds the trainable tensors only, by name; (c) no parameter
    has a .grad; evaluate() works, alone and during training; the logs have loss and learning_rate
    every step and no grad_norm (max_grad_norm is on, and ignored)."""
    model = tiny_model()
    frozen, start = snapshot(model, trainable=False), snapshot(model)
    assert all("lora_" in n for n in start) and len(start) == 8
    args = zo_args(tmp_path, max_steps=40, max_grad_norm=1.0, eval_strategy="steps", eval_steps=20)
    trainer = ZOTrainer(model=model, args=args, train_dataset=Pattern(), eval_dataset=Pattern(8))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]

    losses = list(step_losses(trainer).values())
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05, (first, last)  # about 4.19 -> 4.06 (0.11-0.15 over seeds 0-4)
    assert after < before - 0.05, (before, after)
    evaluated = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert sorted(evaluated) == [20, 40] and evaluated[40] == after  # during training, and after (same θ)
    assert trainer.zo_optimizer.global_step == 40 and trainer.state.global_step == 40
    assert trainer.zo_optimizer.nonfinite_steps == 0

    for name, value in snapshot(model, trainable=False).items():
        assert torch.equal(value, frozen[name]), name
    for name, value in snapshot(model).items():
        assert not torch.equal(value, start[name]), f"{name} did not train"
    assert all(p.grad is None for p in model.parameters())
    optimizer = trainer.zo_optimizer  # built from the trainable parameters only, by name
    assert sorted(n for g in optimizer.param_groups for n in g["param_names"]) == sorted(start)
    name = next(iter(start))
    optimizer.set_guidance(reward_delta={name: torch.ones_like(start[name])})  # guidance dicts by model name
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("learning_rate" in h and "grad_norm" not in h for h in logs)


@pytest.mark.parametrize("reduction", ["token_mean", "batch_mean"])
def test_gradient_accumulation_J_is_the_mean_over_the_micro_batches(tmp_path, reduction):
    """(d) G=2 micro-batches of b=2: one ZO step per 2 micro-batches; at θ+εz and at θ−εz the
    closure evaluates both micro-batches at one θ, and J (ZOPrO's J₊, J₋) is, by hand:

    - token_mean (Trainer passes num_items_in_batch, as for a causal LM): the model's loss on the
      2b sequences as ONE batch, i.e. G=2 on b gives the J of G=1 on 2b (to float rounding);
    - batch_mean (a model without loss kwargs): the mean of the two micro-batch losses.

    The micro-batches have 2x15 and 2x3 labelled tokens, so the two reductions differ (checked).
    The loss logged for the step is (J₊ + J₋)/2."""
    model = tiny_model()
    args = zo_args(tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                   train_sampling_strategy="sequential")
    trainer = Recording(model=model, args=args, train_dataset=Pattern(8, valid=[16, 16, 4, 4] * 2))
    trainer.calls = []
    if reduction == "batch_mean":
        trainer.model_accepts_loss_kwargs = False
    else:
        assert trainer.model_accepts_loss_kwargs
    trainer.train()

    optimizer = trainer.zo_optimizer
    assert optimizer.global_step == 2 and trainer.state.global_step == 2
    calls = trainer.calls
    assert len(calls) == 2 * 2 * 2  # steps x (θ+εz, θ−εz) x micro-batches
    assert all(not c["grad_enabled"] and not c["training"] for c in calls)
    assert all(p.grad is None for p in model.parameters())
    plus, minus = calls[4:6], calls[6:8]  # the last step
    for side in (plus, minus):
        assert all(torch.equal(side[0]["params"][n], side[1]["params"][n]) for n in side[0]["params"])
        assert not torch.equal(side[0]["inputs"]["input_ids"], side[1]["inputs"]["input_ids"])
    assert not all(torch.equal(plus[0]["params"][n], minus[0]["params"][n]) for n in plus[0]["params"])
    for a, b in zip(plus, minus):
        assert all(torch.equal(a["inputs"][k], b["inputs"][k]) for k in a["inputs"])
    if reduction == "token_mean":
        assert all(int(c["num_items"]) == 2 * 15 + 2 * 3 for c in calls)

    def by_hand(side):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(side[0]["params"][name])
            model.eval()
            one = {k: torch.cat([side[0]["inputs"][k], side[1]["inputs"][k]]) for k in side[0]["inputs"]}
            token_mean = float(model(**one).loss)
            batch_mean = sum(float(model(**mb["inputs"]).loss) for mb in side) / 2
        assert abs(token_mean - batch_mean) > 1e-3  # 200x the tolerance below: the test tells them apart
        return token_mean if reduction == "token_mean" else batch_mean

    j_plus, j_minus = float(optimizer.last_step["loss_plus"]), float(optimizer.last_step["loss_minus"])
    assert j_plus == pytest.approx(by_hand(plus), rel=1e-6)
    assert j_minus == pytest.approx(by_hand(minus), rel=1e-6)
    assert step_losses(trainer)[2] == pytest.approx((j_plus + j_minus) / 2, rel=1e-6)


def test_resume_continues_bit_for_bit(tmp_path):
    """(e) 6 steps straight == 3 steps, checkpoint, then a NEW model (other LoRA init) and trainer
    resumed for the last 3. G=2, shuffled data over an epoch boundary (20 examples = 5 steps per
    epoch), linear lr decay and weight decay: the final adapter and every logged loss are equal."""
    def run(out, lora_seed=None, **kw):
        model = tiny_model(lora_seed=lora_seed)
        args = zo_args(out, max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                       lr_scheduler_type="linear", weight_decay=0.1, **kw.pop("args", {}))
        trainer = ZOTrainer(model=model, args=args, train_dataset=Pattern(20), **kw)
        return model, trainer

    model_a, straight = run(tmp_path / "a")
    straight.train()

    _, first_half = run(tmp_path / "b", args=dict(save_strategy="steps", save_steps=3), callbacks=[StopAt(3)])
    first_half.train()
    checkpoint = tmp_path / "b" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["zopro"]["global_step"] == 3  # ZOPrO's own state, through Trainer's optimizer.pt

    model_c, resumed = run(tmp_path / "c", lora_seed=123)
    assert not all(torch.equal(v, snapshot(model_a)[n]) for n, v in snapshot(model_c).items())
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.zo_optimizer.global_step == 6 and resumed.state.global_step == 6
    final_a, final_c = snapshot(model_a), snapshot(model_c)
    assert not all(torch.equal(final_a[n], v) for n, v in snapshot(tiny_model()).items())  # it trained
    for name in final_a:
        assert torch.equal(final_a[name], final_c[name]), name
    assert step_losses(straight) == step_losses(resumed)
    assert sorted(step_losses(resumed)) == [1, 2, 3, 4, 5, 6]
    assert step_lrs(straight) == step_lrs(resumed)


@pytest.mark.parametrize("how", ["in_place", "reallocated"])
def test_weights_changed_between_train_calls_are_adopted(tmp_path, how):
    """Weights put into the model between two train() calls (as load_best_model_at_end or a manual
    reload does: in place, or as new tensors) are where the next ZO step starts, not the
    optimizer's stale master copy."""
    model = tiny_model()
    trainer = Recording(model=model, args=zo_args(tmp_path, max_steps=2), train_dataset=Pattern())
    trainer.calls = []
    trainer.train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                if how == "in_place":
                    p.add_(1.0)
                else:
                    p.data = p.data + 1.0  # new storage
    loaded = snapshot(model)
    trainer.calls = []
    trainer.train()
    first = trainer.calls[0]["params"]  # θ+εz of the second run's first step
    assert max(float((first[n] - loaded[n]).abs().max()) for n in loaded) < 0.1  # ε|z| ~ 1e-3 x N(0, 1)
    assert trainer.zo_optimizer.global_step == 4


def test_trainer_scheduler_sets_zopro_lr(tmp_path):
    """(f) Trainer's linear schedule with one warmup step: the lr logged each step is the schedule's,
    it is the lr in ZOPrO's param group while the step runs, and ZOPrO uses it: the warmup step
    (lr 0) leaves the adapter bit-identical, the next one moves it."""
    model = tiny_model()
    start, snaps = snapshot(model), Snapshots()
    args = zo_args(tmp_path, max_steps=4, lr_scheduler_type="linear", warmup_steps=1)
    trainer = Recording(model=model, args=args, train_dataset=Pattern(), callbacks=[snaps])
    trainer.calls = []
    trainer.train()

    lr, total = args.learning_rate, 4
    schedule = [0.0] + [lr * (total - k) / (total - 1) for k in range(1, total)]
    assert step_lrs(trainer) == pytest.approx(schedule, rel=1e-12, abs=1e-15)
    seen = [c["lr"] for c in trainer.calls[::2]]  # the group's lr during each step (J₊ and J₋ calls)
    assert seen == pytest.approx(schedule, rel=1e-12, abs=1e-15)
    assert all(torch.equal(snaps.after[1][n], start[n]) for n in start)
    assert not all(torch.equal(snaps.after[2][n], start[n]) for n in start)


def test_user_supplied_optimizer_and_scheduler_are_used(tmp_path):
    """(g) optimizers=(ZOPrO, LambdaLR) is used as given: its lr (not args.learning_rate), its
    scheduler (lr 0 from the third step: the adapter stops moving), its step count. A closure-less
    step() outside the loop still raises; a non-ZOPrO optimizer is refused."""
    model = tiny_model()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = ZOPrO(trainable, lr=5e-2, eps=1e-3, seed=7)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 if k < 2 else 0.0)
    snaps, start = Snapshots(), snapshot(model)
    args = zo_args(tmp_path, max_steps=4, learning_rate=1.0)
    trainer = ZOTrainer(model=model, args=args, train_dataset=Pattern(), optimizers=(optimizer, scheduler),
                        callbacks=[snaps])
    trainer.train()

    assert trainer.zo_optimizer is optimizer and trainer.lr_scheduler is scheduler
    assert optimizer.global_step == 4
    assert step_lrs(trainer) == [5e-2, 5e-2, 0.0, 0.0]
    assert not all(torch.equal(snaps.after[1][n], start[n]) for n in start)
    assert not all(torch.equal(snaps.after[2][n], snaps.after[1][n]) for n in start)
    for step in (3, 4):
        assert all(torch.equal(snaps.after[step][n], snaps.after[2][n]) for n in start)
    with pytest.raises(RuntimeError, match="closure"):
        optimizer.step()

    sgd = torch.optim.SGD([p for _, p in trainable], lr=0.1)
    other = ZOTrainer(model=model, args=args, train_dataset=Pattern(), optimizers=(sgd, None))
    with pytest.raises(TypeError, match="ZOPrO"):
        other.train()


def test_docs_trainer_examples_run(tmp_path, monkeypatch, capsys):
    """Every ```python block of docs/trainer.md runs, in order, in one namespace."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(blocks[0], namespace)  # the example: 40 steps, checkpoints at 20 and 40
    before, after = map(float, re.search(r"eval loss ([0-9.]+) -> ([0-9.]+)", capsys.readouterr().out).groups())
    assert after < before - 0.05
    assert (tmp_path / "zo-out" / "checkpoint-20" / "optimizer.pt").exists()
    exec(blocks[1], namespace)  # resume in the same trainer: asserts the same weights at step 40
    exec(blocks[2], namespace)  # a user-supplied optimizer and scheduler
    assert namespace["optimizer"].global_step == 40
