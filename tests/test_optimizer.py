import io
import math

import pytest
import torch

import zopro_kernels as zk
from zopro_kernels import ZOPrO

from .helpers import check_restored_after_cycles, guidance, random_tensors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(5, 3), (1,), (37,)]


def quadratic(params):
    return lambda: sum((p.double() - 0.5).square().sum() for p in params)


def make(target, dtype=torch.float32, **kwargs):
    backend, device = target
    params = random_tensors(SHAPES, dtype, device, seed=5)
    return params, ZOPrO(params, backend=backend, **kwargs)


# ---- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_weights_restored_bit_for_bit_after_many_cycles(target, dtype):
    backend, device = target
    cycles = 1000 if backend in ("torch", "cpu") or device == "cuda" else 25  # the interpreter is slow
    params, opt = make(target, DTYPES[dtype], lr=0.0, eps=1e-3, alpha=0.5)
    check_restored_after_cycles(params, opt, SHAPES, cycles)


def test_zero_learning_rate_keeps_weights_bit_for_bit(target):
    params, opt = make(target, torch.bfloat16, lr=0.0, eps=1e-3)
    initial = [p.clone() for p in params]
    for _ in range(20):
        opt.step(quadratic(params))
    assert all(torch.equal(p, q) for p, q in zip(params, initial))
    assert opt.nonfinite_steps == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_loss_skips_update_and_is_counted(target, bad):
    params, opt = make(target, lr=1e-2)
    calls = iter([1.0, bad, 2.0, 1.0])
    before = [p.clone() for p in params]
    opt.step(lambda: next(calls))
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    opt.step(lambda: next(calls))
    assert any(not torch.equal(p, q) for p, q in zip(params, before))
    assert opt.nonfinite_steps == 1
    assert opt.state_dict()["zopro"]["nonfinite_steps"] == 1


def test_in_place_mode_trains_and_its_drift_is_real():
    """master_weights=False: no master copy; 16-bit weights drift under ±εz (as documented)."""
    params = random_tensors(SHAPES, torch.bfloat16, "cpu", seed=5)
    initial = [p.clone() for p in params]
    opt = ZOPrO(params, lr=0.0, eps=3e-3, master_weights=False, backend="torch")
    for _ in range(50):
        opt.step(quadratic(params))
    drift = max((p.double() - q.double()).abs().max().item() for p, q in zip(params, initial))
    assert drift > 0

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    x = torch.randn(64, 6)
    y = x.sum(dim=1, keepdim=True)
    opt = ZOPrO(model.parameters(), lr=2e-2, eps=1e-3, master_weights=False, backend="torch")
    loss = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    start = loss().item()
    for _ in range(300):
        opt.step(loss)
    assert loss().item() < 0.1 * start


# ---- backends in lockstep -------------------------------------------------------------------
def test_backends_in_lockstep_with_float64_reference(kernel_target):
    """The fp32 kernels and the torch backend on float64 copies, stepped together."""
    backend, device = kernel_target
    fast = random_tensors(SHAPES, torch.float32, device, seed=5)
    ref = [p.detach().double().cpu() for p in fast]
    opts = [
        ZOPrO(ps, lr=1e-2, eps=1e-3, seed=3, alpha="linear", steps_per_iteration=10,
              granularity="global", backend=b)
        for ps, b in ((fast, backend), (ref, "torch"))
    ]
    for ps, opt in zip((fast, ref), opts):
        dpi, dr = guidance(SHAPES, "both", ps[0].device, ps[0].dtype)
        opt.set_guidance(policy_delta=dpi, reward_delta=dr)
    for _ in range(8):
        # Both see the same loss values (the reference's), so g is identical by construction.
        losses = []
        opts[1].step(lambda: losses.append(float(quadratic(ref)())) or losses[-1])
        replay = iter(losses)
        opts[0].step(lambda: next(replay))
    for p, q in zip(fast, ref):
        assert (p.double().cpu() - q).abs().max() < 1e-5


# ---- resume ---------------------------------------------------------------------------------
def _run(target, params, opt, steps):
    for k in range(steps):
        if k == 3:
            opt.mark_iteration()
        opt.step(quadratic(params))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_continues_bit_for_bit(target, dtype):
    dtype = DTYPES[dtype]
    kwargs = dict(lr=1e-2, eps=1e-3, seed=9, alpha="linear", steps_per_iteration=5)

    def fresh():
        params, opt = make(target, dtype, **kwargs)
        dpi, dr = guidance(SHAPES, "both", params[0].device)
        opt.set_guidance(reward_delta=dr)
        opt.mark_iteration()
        return params, opt

    params, opt = fresh()
    _run(target, params, opt, 6)
    buffer = io.BytesIO()
    torch.save({"model": [p.clone() for p in params], "optim": opt.state_dict()}, buffer)
    _run(target, params, opt, 6)
    uninterrupted = [p.clone() for p in params]

    buffer.seek(0)
    saved = torch.load(buffer)
    params2, opt2 = make(target, dtype, **{**kwargs, "seed": 123})  # seed comes from the state
    for p, q in zip(params2, saved["model"]):
        p.copy_(q)
    opt2.load_state_dict(saved["optim"])
    _run(target, params2, opt2, 6)
    assert all(torch.equal(p, q) for p, q in zip(params2, uninterrupted))


def test_load_state_dict_rejects_foreign_state(target):
    params, opt = make(target)
    with pytest.raises(ValueError, match="not a ZOPrO state dict"):
        opt.load_state_dict(torch.optim.SGD(params, lr=1).state_dict())
    sd = opt.state_dict()
    sd["state"][0]["master"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    # without per-tensor state (no master copy) the layout hash still tells another model apart
    backend, device = target
    other = [torch.zeros(3, 5, device=device)] + params[1:]  # (5, 3) → (3, 5): the same numel
    sd = ZOPrO(params, backend=backend, master_weights=False).state_dict()
    with pytest.raises(ValueError, match="other shapes"):
        ZOPrO(other, backend=backend, master_weights=False).load_state_dict(sd)
    with pytest.raises(ValueError, match="incomplete"):
        opt.load_state_dict({"zopro": opt.state_dict()["zopro"]})


@pytest.mark.parametrize("key,saved,loading", [
    ("granularity", "tensor", "global"),
    ("master_weights", True, False),
    ("direction_norm", "policy_delta", "noise"),
    ("directions", 1, 2),
])
def test_load_state_dict_refuses_settings_that_would_diverge(key, saved, loading):
    params = [torch.randn(6, dtype=torch.float64)]
    source = ZOPrO(params, backend="torch", **{key: saved})
    source.step(quadratic(params))
    state = source.state_dict()
    other = ZOPrO([params[0].clone()], backend="torch", **{key: loading})
    before = other.state_dict()
    with pytest.raises(ValueError, match=f"{key}={saved!r}"):
        other.load_state_dict(state)
    assert other.global_step == 0 and other.state_dict()["zopro"] == before["zopro"]  # nothing loaded
    ZOPrO([params[0].clone()], backend="torch", **{key: saved}).load_state_dict(state)  # the same settings load


# ---- torch.optim conventions ----------------------------------------------------------------
def test_param_groups_and_lr_scheduler(target):
    backend, device = target
    a, b = random_tensors([(4, 4), (9,)], torch.float32, device, seed=1)
    opt = ZOPrO([{"params": [a]}, {"params": [b], "lr": 0.0, "weight_decay": 0.5}], lr=1e-2,
                backend=backend)
    b0 = b.clone()
    opt.step(quadratic([a, b]))
    assert torch.equal(b, b0)  # lr 0 group: no update, no decay
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    a0 = a.clone()
    opt.step(quadratic([a, b]))
    sched.step()
    a1 = a.clone()
    assert not torch.equal(a1, a0)
    opt.step(quadratic([a, b]))  # lr now 0 for every group
    assert torch.equal(a, a1)


def test_weight_decay_is_applied_when_g_is_zero():
    p = torch.ones(10, dtype=torch.float64)
    opt = ZOPrO([p], lr=0.1, weight_decay=0.5, backend="torch")
    opt.step(lambda: 1.0)  # J₊ = J₋: g = 0, only decay
    assert torch.allclose(p, torch.full((10,), 1 - 0.1 * 0.5, dtype=torch.float64))


def test_named_parameters_and_dict_guidance():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = ZOPrO(model.named_parameters(), backend="torch", alpha=0.9)
    delta = {"0.weight": torch.ones(4, 3)}
    opt.set_guidance(policy_delta=delta, reward_delta={"1.bias": torch.ones(2)})
    sd = opt.state_dict()
    names = sd["param_groups"][0]["param_names"]
    assert torch.equal(sd["state"][names.index("0.weight")]["policy_delta"], torch.ones(4, 3))
    assert torch.equal(sd["state"][names.index("1.weight")]["policy_delta"], torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown parameters"):
        opt.set_guidance(policy_delta={"2.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(3, 4\)"):
        opt.set_guidance(policy_delta={"0.weight": torch.ones(3, 4)})
    with pytest.raises(ValueError, match="'0.bias' has dtype torch.int64"):
        opt.set_guidance(reward_delta={"0.bias": torch.ones(4, dtype=torch.int64)})
    with pytest.raises(ValueError, match="NaN"):
        opt.set_guidance(reward_delta={"0.bias": torch.full((4,), float("nan"))})
    with pytest.raises(ValueError, match="4 parameters"):
        opt.set_guidance(policy_delta=[None])


def test_dict_guidance_needs_names():
    opt = ZOPrO([torch.zeros(3)], backend="torch", alpha=0.5)
    with pytest.raises(ValueError, match="named_parameters"):
        opt.set_guidance(policy_delta={"w": torch.zeros(3)})


def test_mark_iteration_forms_policy_delta_and_restarts_alpha():
    p = torch.zeros(50, dtype=torch.float64)
    opt = ZOPrO([p], lr=1e-2, backend="torch", alpha="linear", steps_per_iteration=4)
    opt.mark_iteration()
    start = p.clone()
    for _ in range(3):
        opt.step(quadratic([p]))
    assert opt.iteration_step == 3
    opt.mark_iteration()
    assert opt.iteration_step == 0
    assert opt.current_alpha() == pytest.approx(1 - 1e-3)
    assert torch.equal(opt.state_dict()["state"][0]["policy_delta"], p - start)


def test_alpha_schedules():
    from zopro_kernels.alpha import alpha_at

    assert alpha_at("linear", 0, 10) == pytest.approx(0.999)
    assert alpha_at("linear", 5, 10) == pytest.approx(0.4995)
    assert alpha_at("linear", 12, 10) == 0.0
    assert alpha_at("exp", 10, 10) == pytest.approx(0.999e-3)
    assert alpha_at("constant", 7, None) == pytest.approx(0.999)
    assert alpha_at(0.25, 7, None) == 0.25
    assert alpha_at(lambda k: 1 / (k + 1), 3, None) == 0.25
    with pytest.raises(ValueError):
        alpha_at(lambda k: 2.0, 0, None)


def test_linear_alpha_with_policy_delta_needs_iteration_length():
    opt = ZOPrO([torch.zeros(3)], backend="torch")
    with pytest.raises(ValueError, match="steps_per_iteration"):  # no iteration yet: no length to use
        opt.set_guidance(policy_delta=[torch.ones(3)])
    opt.set_guidance(reward_delta=[torch.ones(3)])  # ΔR alone needs no α


def run_iterations(opt, params, lengths):
    alphas = []
    opt.mark_iteration()
    for length in lengths:
        for _ in range(length):
            alphas.append(opt.current_alpha())
            opt.step(quadratic(params))
        opt.mark_iteration()
    return alphas


def test_default_alpha_decays_over_the_last_iteration():
    # No steps_per_iteration: iteration t decays over iteration t−1's length (4, then 6 steps).
    default = [torch.zeros(20, dtype=torch.float64)]
    given = [torch.zeros(20, dtype=torch.float64)]
    opt = ZOPrO(default, lr=1e-2, eps=1e-3, backend="torch")
    assert opt.iteration_length is None
    alphas = run_iterations(opt, default, [4, 6, 3])
    assert opt.iteration_length == 3
    assert alphas[:4] == [0.0] * 4  # iteration 0: no Δπ and no length yet, α is not used
    assert alphas[4:10] == pytest.approx([0.999 * max(0.0, 1 - k / 4) for k in range(6)])  # over iteration 0's 4
    assert alphas[10:] == pytest.approx([0.999 * (1 - k / 6) for k in range(3)])  # over iteration 1's 6
    # the same as telling it the length: the lengths agree in iteration 1 (4 steps)
    opt_given = ZOPrO(given, lr=1e-2, eps=1e-3, backend="torch", steps_per_iteration=4)
    run_iterations(opt_given, given, [4, 4])
    check = [torch.zeros(20, dtype=torch.float64)]
    run_iterations(ZOPrO(check, lr=1e-2, eps=1e-3, backend="torch"), check, [4, 4])
    assert torch.equal(check[0], given[0])


def test_default_iteration_length_survives_a_resume():
    params = [torch.zeros(20, dtype=torch.float64)]
    opt = ZOPrO(params, lr=1e-2, eps=1e-3, backend="torch")
    run_iterations(opt, params, [5])
    opt.step(quadratic(params))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    copy = [params[0].clone()]
    resumed = ZOPrO(copy, lr=1e-2, eps=1e-3, backend="torch")
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.iteration_length == 5 and resumed.current_alpha() == opt.current_alpha()
    for o, ps in ((opt, params), (resumed, copy)):
        for _ in range(3):
            o.step(quadratic(ps))
    assert torch.equal(params[0], copy[0])


# ---- frozen parameters (torch.optim leaves requires_grad=False alone) ---------------------------
def frozen_and_trained(seed=1):
    tensors = random_tensors([(4, 3), (6,), (5, 2), (7,)], torch.float32, "cpu", seed=seed)
    for t, trained in zip(tensors, (True, False, True, False)):
        t.requires_grad_(trained)
    return tensors


def test_frozen_parameters_are_left_alone_and_the_rest_trains_as_if_alone():
    mixed = frozen_and_trained()
    alone = [t.detach().clone().requires_grad_() for t in mixed if t.requires_grad]
    frozen_before = [t.detach().clone() for t in mixed if not t.requires_grad]
    loss = lambda ps: lambda: sum((p.double() - 0.5).square().sum() for p in ps if p.requires_grad)  # noqa: E731
    with pytest.warns(UserWarning, match="2 of 4 parameters have requires_grad=False"):
        opt = ZOPrO(mixed, lr=1e-2, eps=1e-3, backend="torch", seed=4)
        opt.mark_iteration()
    opt_alone = ZOPrO(alone, lr=1e-2, eps=1e-3, backend="torch", seed=4)
    opt_alone.mark_iteration()
    with torch.no_grad():
        for o, ps in ((opt, mixed), (opt_alone, alone)):
            for _ in range(5):
                o.step(loss(ps))
            o.mark_iteration()  # Δπ formed for the trained tensors only
            o.step(loss(ps))
    trained = [t for t in mixed if t.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(trained, alone))  # same noise layout, same steps
    assert not torch.equal(trained[0], random_tensors([(4, 3)], torch.float32, "cpu", seed=1)[0])
    assert all(torch.equal(a, b) for a, b in zip([t for t in mixed if not t.requires_grad], frozen_before))
    state = opt.state_dict()["state"]
    assert sorted(state) == [0, 2]  # torch.optim's numbering: positions in the parameter list
    assert all(torch.equal(state[i]["master"], mixed[i].detach()) for i in (0, 2))


def test_frozen_parameters_take_no_guidance_and_state_stays_aligned():
    mixed = frozen_and_trained()
    with pytest.warns(UserWarning):
        opt = ZOPrO(mixed, lr=1e-2, eps=1e-3, backend="torch", alpha=0.5)
        with pytest.raises(ValueError, match="requires_grad=False"):
            opt.set_guidance(policy_delta=[None, torch.ones(6), None, None])
    opt.set_guidance(policy_delta=[torch.ones(4, 3), None, torch.ones(5, 2), None])
    state = opt.state_dict()
    assert torch.equal(state["state"][2]["policy_delta"], torch.ones(5, 2))
    with pytest.warns(UserWarning):
        again = ZOPrO(frozen_and_trained(), lr=1e-2, eps=1e-3, backend="torch", alpha=0.5)
        again.load_state_dict(state)
    assert torch.equal(again.state_dict()["state"][2]["policy_delta"], torch.ones(5, 2))
    all_trained = [t.detach().clone().requires_grad_() for t in mixed]
    with pytest.raises(ValueError, match="other parameters frozen|does not train"):
        ZOPrO(all_trained[:1] + [t.detach() for t in all_trained[1:]], lr=1e-2, backend="torch",
              alpha=0.5).load_state_dict(state)


def test_plain_tensors_without_requires_grad_all_train():
    # Zeroth order needs no gradients: tensors none of which require grad are all trained, silently.
    import warnings

    params = [torch.zeros(3), torch.zeros(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = ZOPrO(params, lr=1e-2, backend="torch")
        opt.step(quadratic(params))
    assert all(bool((p != 0).all()) for p in params)


def test_peft_model_parameters_train_the_adapters_only():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.arange(8).reshape(1, 8)
    with pytest.warns(UserWarning, match="requires_grad=False"):
        opt = ZOPrO(model.parameters(), lr=1e-3, eps=1e-3, backend="torch")
        with torch.no_grad():
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == lora and len(lora) == 4


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(granularity="layer"), ValueError, "granularity"),
        (dict(backend="jax"), ValueError, "backend"),
        (dict(alpha="cosine"), ValueError, "alpha"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(steps_per_iteration=0), ValueError, "steps_per_iteration"),
        (dict(seed=-3), ValueError, "seed"),
        (dict(max_projected_grad=0.0), ValueError, "max_projected_grad"),
        (dict(max_projected_grad=float("inf")), ValueError, "max_projected_grad"),
        (dict(max_projected_grad=True), ValueError, "max_projected_grad"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ZOPrO([torch.zeros(3)], **kwargs)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="#1 has dtype torch.int64"):
        ZOPrO([torch.zeros(3), torch.zeros(3, dtype=torch.int64)]).step(lambda: 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        ZOPrO([torch.zeros(3, 4).t()]).step(lambda: 0.0)


def test_closure_errors():
    p = torch.zeros(3)
    opt = ZOPrO([p], backend="torch")
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: torch.zeros(2))
    with pytest.raises(TypeError, match="tensor or a float"):
        opt.step(lambda: "1.0")


def test_backend_errors_say_why():
    with pytest.raises(RuntimeError, match="runs CUDA tensors only"):
        ZOPrO([torch.zeros(3)], backend="cuda").step(lambda: 0.0)
    with pytest.raises(RuntimeError, match="float64"):
        ZOPrO([torch.zeros(3, dtype=torch.float64)], backend="triton").step(lambda: 0.0)
    assert "torch" in zk.available_backends("cpu")


def test_reallocated_parameter_is_detected_and_resynced():
    model = torch.nn.Linear(3, 2)
    opt = ZOPrO(model.named_parameters(), lr=1e-2, backend="torch")
    loss = lambda: model(torch.ones(1, 3)).square().sum()  # noqa: E731
    opt.step(loss)
    model.weight.data = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="'weight' was reallocated"):
        opt.step(loss)
    opt.sync_from_model()
    opt.step(loss)
    assert opt.state_dict()["state"][0]["master"].abs().max() < 0.1  # started from the new zeros


def test_add_param_group_after_first_step_is_refused():
    opt = ZOPrO([torch.zeros(3)], backend="torch")
    opt.step(lambda: 0.0)
    with pytest.raises(RuntimeError, match="parameter groups"):
        opt.add_param_group({"params": [torch.zeros(2)]})


def test_step_returns_mean_loss_and_records_the_step():
    opt = ZOPrO([torch.zeros(3)], eps=0.5, backend="torch")
    values = iter([3.0, 1.0])
    loss = opt.step(lambda: next(values))
    assert float(loss) == 2.0
    assert float(opt.last_step["projected_grad"]) == pytest.approx((3.0 - 1.0) / (2 * 0.5))


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
def test_max_projected_grad_takes_the_step_of_the_bound(guided):
    """A bound |g| ≤ c: a step that measured g = ±50 moves θ exactly as a step that measured ±c;
    one under the bound moves exactly as without it; the binding steps are counted and saved."""

    def run(values, **kwargs):
        torch.manual_seed(3)
        params = [torch.randn(7, 5, dtype=torch.float64), torch.randn(11, dtype=torch.float64)]
        opt = ZOPrO(params, lr=1e-2, eps=0.5, backend="torch", steps_per_iteration=4, **kwargs)
        if guided:
            opt.set_guidance(policy_delta=[torch.randn_like(p) for p in params],
                             reward_delta=[torch.randn_like(p) for p in params])
        calls = iter(values)
        for _ in range(len(values) // 2):
            opt.step(lambda: next(calls))  # eps 0.5: g = J₊ − J₋ exactly
        return params, opt

    bounded, opt = run([50.0, 0.0, -50.0, 0.0, 1.5, 0.0], max_projected_grad=2.0)
    reference, _ = run([2.0, 0.0, -2.0, 0.0, 1.5, 0.0])
    assert all(torch.equal(a, b) for a, b in zip(bounded, reference))
    unbounded, _ = run([50.0, 0.0, -50.0, 0.0, 1.5, 0.0])
    assert not any(torch.equal(a, b) for a, b in zip(bounded, unbounded))
    assert opt.clipped_steps == 2
    assert float(opt.last_step["projected_grad"]) == 1.5 and not bool(opt.last_step["clipped"])
    state = opt.state_dict()
    assert state["zopro"]["clipped_steps"] == 2
    again = ZOPrO([torch.zeros(7, 5, dtype=torch.float64), torch.zeros(11, dtype=torch.float64)], backend="torch",
                  max_projected_grad=2.0)
    again.load_state_dict(state)
    assert again.clipped_steps == 2


def test_micro_batch_accumulation_in_the_closure_equals_full_batch():
    """Averaging J over micro-batches inside the closure = averaging g over them (g is linear in J)."""
    torch.manual_seed(1)
    x, y = torch.randn(64, 5), torch.randn(64, 1)
    results = []
    for micro in (1, 4):
        model = torch.nn.Linear(5, 1).double()
        torch.nn.init.constant_(model.weight, 0.1)
        torch.nn.init.zeros_(model.bias)
        opt = ZOPrO(model.parameters(), lr=1e-2, eps=1e-4, backend="torch")

        def closure():
            parts = [torch.nn.functional.mse_loss(model(xb.double()), yb.double())
                     for xb, yb in zip(x.chunk(micro), y.chunk(micro))]
            return sum(parts) / micro

        for _ in range(5):
            opt.step(closure)
        results.append(model.weight.detach().clone())
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-9)


# ---- learning -------------------------------------------------------------------------------
def test_trains_a_small_network_in_a_plain_loop(target):
    backend, device = target
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
    x = torch.randn(256, 8, device=device)
    y = x[:, :1] * 2 - x[:, 1:2]
    opt = ZOPrO(model.parameters(), lr=1e-2, eps=1e-3, backend=backend)
    loss = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    start = loss().item()
    steps = 300 if backend == "torch" else 40  # the interpreter is slow; 40 steps halve the loss
    for _ in range(steps):
        opt.step(loss)
    assert loss().item() < (0.1 if backend == "torch" else 0.5) * start


def _zo_iteration(guided: bool, seed: int):
    """The example python/guided_vs_unguided.py: a shared first-order iteration 0, then 50 ZO steps
    guided by the Δπ it made (formed by mark_iteration) or unguided, at equal forward passes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "python" / "guided_vs_unguided.py"
    spec = importlib.util.spec_from_file_location("guided_vs_unguided", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.zo_iteration_losses(guided, steps=50, seed=seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_guided_zopro_beats_unguided_spsa(seed):
    (start, guided), (start_unguided, unguided) = _zo_iteration(True, seed), _zo_iteration(False, seed)
    assert start == start_unguided  # the same iteration-0 point
    assert guided[-1] < 0.5 * start  # measured: 12.4 → 2.9 guided, → 11.4 unguided (cond 10)
    assert guided[-1] < 0.5 * unguided[-1]
