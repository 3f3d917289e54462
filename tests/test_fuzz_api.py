"""Bad input, searched rather than listed (hypothesis): every call ends in a clear error naming what
is wrong, or in a counted skip, and the weights are bit-identical to before the failing call.

    python -m pytest -q tests/test_fuzz_api.py --hypothesis-show-statistics
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from zopro_kernels import ZOPrO  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OTHER_DTYPES = (torch.int64, torch.int8, torch.bool, torch.complex64)
CLEAR = (ValueError, TypeError)


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def unchanged(tensors, before) -> bool:
    return all(torch.equal(t, b) for t, b in zip(tensors, before))


def quadratic(params):
    return lambda: sum((p.double() - 0.5).square().sum() for p in params if p.is_floating_point())


# ---- parameter lists --------------------------------------------------------------------------
parameter_spec = st.fixed_dictionaries({
    "shape": st.lists(st.integers(0, 4), min_size=1, max_size=3),
    "dtype": st.sampled_from(FLOATS + OTHER_DTYPES),
    "trained": st.booleans(),
    "transposed": st.booleans(),
    "repeat_of": st.none() | st.integers(0, 5),
})


def build_parameters(specs):
    params = []
    for spec in specs:
        if spec["repeat_of"] is not None and spec["repeat_of"] < len(params):
            params.append(params[spec["repeat_of"]])  # the same tensor again
            continue
        t = torch.randn(spec["shape"]).to(spec["dtype"]) if spec["dtype"] != torch.bool else torch.zeros(
            spec["shape"], dtype=torch.bool)
        if spec["transposed"] and t.dim() >= 2 and t.shape[0] > 1 and t.shape[1] > 1:
            t = t.transpose(0, 1)
        if spec["trained"] and t.is_floating_point():
            t.requires_grad_(True)
        params.append(t)
    return params


@SETTINGS
@given(st.lists(parameter_spec, min_size=0, max_size=6))
def test_parameter_lists(specs):
    params = build_parameters(specs)
    before = snapshot(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            opt = ZOPrO(params, lr=1e-3, eps=1e-3, backend="torch")
            with torch.no_grad():
                opt.step(quadratic(params))
        except CLEAR as error:
            message = str(error)
            assert any(word in message for word in ("empty parameter list", "dtype", "contiguous", "share memory", "same tensor",
                                                    "parameter #")), message
            assert unchanged(params, before)
            return
    any_trained = any(p.requires_grad for p in params)
    for p, b in zip(params, before):
        if any_trained and not p.requires_grad:
            assert torch.equal(p, b)  # frozen: left alone
    trained = [p for p in params if p.requires_grad or not any_trained]
    assert all(p.is_floating_point() and p.is_contiguous() for p in trained)
    assert len({id(p) for p in trained}) == len(trained)


# ---- guidance ---------------------------------------------------------------------------------
SHAPES = [(3, 2), (5,)]
delta = st.one_of(
    st.none(),
    st.sampled_from(["ok", "zeros", "nan", "inf", "wrong_shape", "int", "fp64", "numpy", "list", "scalar"]),
)


def make_delta(kind, shape):
    return {
        None: None,
        "ok": torch.randn(shape),
        "zeros": torch.zeros(shape),
        "nan": torch.full(shape, math.nan),
        "inf": torch.full(shape, math.inf),
        "wrong_shape": torch.randn(7),
        "int": torch.ones(shape, dtype=torch.int64),
        "fp64": torch.randn(shape, dtype=torch.float64),
        "numpy": np.zeros(shape),
        "list": [0.0] * int(np.prod(shape)),
        "scalar": 1.0,
    }[kind]


@SETTINGS
@given(st.lists(delta, min_size=2, max_size=2), st.lists(delta, min_size=2, max_size=2),
       st.booleans(), st.booleans(), st.sampled_from(["tensor", "global"]))
def test_guidance(policy_kinds, reward_kinds, as_dict, drop_one, granularity):
    params = [torch.randn(s) for s in SHAPES]
    names = ["a", "b"]
    opt = ZOPrO(list(zip(names, params)), lr=1e-3, eps=1e-3, backend="torch", alpha=0.5, granularity=granularity)
    with torch.no_grad():
        opt.step(quadratic(params))
    before, state_before = snapshot(params), opt.state_dict()

    def pack(kinds):
        values = [make_delta(k, s) for k, s in zip(kinds, SHAPES)]
        if as_dict:
            packed = {n: v for n, v in zip(names, values) if v is not None}
            if drop_one:
                packed.pop("a", None)
            return packed
        return values[:1] if drop_one else values

    try:
        opt.set_guidance(policy_delta=pack(policy_kinds), reward_delta=pack(reward_kinds))
    except CLEAR as error:
        message = str(error)
        assert any(word in message for word in ("policy_delta", "reward_delta")), message
        assert unchanged(params, before)
        after = opt.state_dict()
        assert after["zopro"] == state_before["zopro"]
        return
    with torch.no_grad():
        opt.step(quadratic(params))
    assert all(torch.isfinite(p).all() for p in params)  # accepted guidance never makes NaN


# ---- closures ---------------------------------------------------------------------------------
returned = st.sampled_from(["tensor", "float", "int", "numpy_float32", "numpy_0d", "vector", "nan", "inf",
                            "string", "none", "raise", "bool"])


def value_of(kind, params):
    loss = quadratic(params)()
    if kind == "raise":
        raise RuntimeError("the closure failed")
    return {
        "tensor": loss,
        "float": float(loss),
        "int": int(float(loss) * 1000),
        "numpy_float32": np.float32(float(loss)),
        "numpy_0d": np.array(float(loss)),
        "vector": torch.stack([loss, loss]),
        "nan": math.nan,
        "inf": torch.tensor(math.inf),
        "string": "1.0",
        "none": None,
        "bool": True,
    }[kind]


@SETTINGS
@given(returned, returned, st.booleans(), st.integers(1, 2))
def test_closures(first, second, master_weights, directions):
    params = [torch.randn(4, 3), torch.randn(6)]
    opt = ZOPrO(params, lr=1e-3, eps=1e-3, backend="torch", master_weights=master_weights, directions=directions)
    before = snapshot(params)
    calls = []

    def closure():
        calls.append(1)
        return value_of(first if len(calls) == 1 else second, params)

    try:
        with torch.no_grad():
            opt.step(closure)
    except (ValueError, TypeError, RuntimeError) as error:
        message = str(error)
        assert "closure" in message, message
        if master_weights:
            assert unchanged(params, before)  # back to θ₀ exactly before the error propagates
        else:  # in place: θ₀ ± εz ∓ εz, within float rounding of θ₀
            assert all(torch.allclose(p, b, atol=1e-5) for p, b in zip(params, before))
        assert opt.global_step == 0
        return
    kinds = {first, second}
    if kinds & {"nan", "inf"}:
        assert opt.nonfinite_steps == 1  # a counted skip
        if master_weights and directions == 1:
            assert unchanged(params, before)
    else:
        assert opt.nonfinite_steps == 0 and opt.global_step == 1


# ---- hyperparameters --------------------------------------------------------------------------
number = st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e300, 1e-300, 1e-3, "1e-3", None, True])


@SETTINGS
@given(number, number, number)
def test_hyperparameters(lr, eps, weight_decay):
    params = [torch.randn(5)]
    before = snapshot(params)
    try:
        opt = ZOPrO(params, lr=lr, eps=eps, weight_decay=weight_decay, backend="torch")
    except CLEAR as error:
        assert any(key in str(error) for key in ("lr", "eps", "weight_decay")), str(error)
        return
    for value, low in ((lr, 0.0), (weight_decay, 0.0)):
        assert isinstance(value, (int, float)) and math.isfinite(value) and value >= low
    assert math.isfinite(eps) and eps > 0
    try:
        with torch.no_grad():
            opt.step(quadratic(params))
    except ValueError as error:  # checked when the step reads the groups (a scheduler may change them)
        assert "lr × weight_decay" in str(error) and lr * weight_decay > 1
        assert unchanged(params, before)
        return
    # a huge eps overflows θ ± εz: then it is a counted skip with the weights as they were
    if opt.nonfinite_steps:
        assert unchanged(params, before)
    else:
        assert all(torch.isfinite(p).all() for p in params) or lr >= 1e300


# ---- state dicts ------------------------------------------------------------------------------
@SETTINGS
@given(st.sets(st.sampled_from(["param_groups", "state", "zopro", "zopro.seed", "zopro.global_step",
                                "zopro.format", "zopro.granularity", "state.master"])),
       st.sampled_from(["same", "other_shape", "more_tensors", "fewer_tensors"]))
def test_state_dicts(dropped, model):
    source_params = [torch.randn(4, 3), torch.randn(6)]
    source = ZOPrO(source_params, lr=1e-3, eps=1e-3, backend="torch")
    with torch.no_grad():
        source.step(quadratic(source_params))
    state = source.state_dict()
    for key in dropped:
        if key.startswith("zopro."):
            state.get("zopro", {}).pop(key.split(".", 1)[1], None)
        elif key == "state.master":
            for entry in state.get("state", {}).values():
                entry.pop("master", None)
        else:
            state.pop(key, None)
    shapes = {"same": [(4, 3), (6,)], "other_shape": [(3, 4), (6,)], "more_tensors": [(4, 3), (6,), (2,)],
              "fewer_tensors": [(4, 3)]}[model]
    params = [torch.randn(s) for s in shapes]
    target = ZOPrO(params, lr=1e-3, eps=1e-3, backend="torch")
    with torch.no_grad():
        target.step(quadratic(params))
    before, run_before = snapshot(params), target.state_dict()["zopro"]
    try:
        target.load_state_dict(state)
    except CLEAR as error:
        assert str(error)
        assert unchanged(params, before) and target.state_dict()["zopro"] == run_before
        return
    # loaded: only a complete state of the same layout (a state without masters keeps the model's)
    assert model == "same" and not (dropped - {"state.master", "zopro.granularity"})
    assert target.global_step == source.global_step
