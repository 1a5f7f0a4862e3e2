"""The update vector v (DESIGN §2 "Y and v"): v must equal (θ_after − θ_before)/lr of a real torch
optimizer step from the same state and gradient g = −Y. Checked in float64 as
θ_before + lr·v ≈ θ_after (to 1e-12), with and without state, weight decay, clipping."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from entropy_probe import models, shards
from entropy_probe.config import load_config
from entropy_probe.input_files import NAMES_FILE, STATE_FILE, resolve_state_paths
from entropy_probe.optimizer_state import OptimizerStateError, load_adamw_state
from entropy_probe.stages import update as update_stage
from entropy_probe.update import (
    FRESH_HYPER,
    adamw_direction,
    clip_coefficient,
    sgd_direction,
    update_direction,
)

TOL = 1e-12
LR = 0.05  # large, so a wrong term moves θ_after by far more than float64 rounding
SHAPES = {"layer.weight": (5, 4), "layer.bias": (5,), "norm.weight": (4,), "head.weight": (3, 5)}
GROUPS = [["layer.weight", "head.weight"], ["layer.bias", "norm.weight"]]  # decay, no-decay


def _params(seed: int = 0) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for n, s in SHAPES.items()}


def _random_grads(names, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(SHAPES[n], generator=gen, dtype=torch.float64) for n in names}


def _adamw(params, wds=(0.1, 0.0), **kwargs) -> torch.optim.AdamW:
    groups = [{"params": [params[n] for n in names], "weight_decay": wd} for names, wd in zip(GROUPS, wds)]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.8, 0.95), eps=1e-6, **kwargs)


def _set_grads(params, grads) -> None:
    for name, p in params.items():
        p.grad = grads[name].clone() if name in grads else None


def _train(opt, params, steps: int = 5, skip: dict[str, set[int]] | None = None) -> None:
    """A few real steps with gradients of varying scale (a non-trivial m, s and step count);
    ``skip[name]`` = the steps where that parameter has no gradient."""
    for step in range(steps):
        names = [n for n in params if step not in (skip or {}).get(n, set())]
        _set_grads(params, _random_grads(names, seed=100 + step, scale=10.0 ** (step % 3 - 1)))
        opt.step()


def _save(opt, tmp_path, groups=GROUPS):
    state_path, names_path = tmp_path / STATE_FILE, tmp_path / NAMES_FILE
    torch.save(opt.state_dict(), state_path)
    names_path.write_text(json.dumps(groups))
    return state_path, names_path


def _real_step(opt, params, Y, max_grad_norm: float = 0.0):
    """θ_before and θ_after of ``opt.step()`` with gradient g = −Y (clipped as trainers do)."""
    before = {n: p.detach().clone() for n, p in params.items()}
    _set_grads(params, {n: -y for n, y in Y.items()})
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], max_grad_norm)
    opt.step()
    return before, {n: p.detach().clone() for n, p in params.items()}


def _assert_step(before, after, v, lr=LR, tol=TOL):
    assert set(v) == set(before)
    for name in before:
        assert v[name].dtype == torch.float64
        err = (before[name] + lr * v[name] - after[name]).abs().max().item()
        assert err <= tol, f"{name}: |θ_before + lr·v − θ_after| = {err:.3g}"


def _theta(params):
    return {n: p.detach().clone() for n, p in params.items()}


def _saved_state_v(tmp_path, params, opt, Y, max_grad_norm=0.0):
    state_path, names_path = _save(opt, tmp_path)
    loaded = load_adamw_state(state_path, names_path, _theta(params))
    return loaded, adamw_direction(Y, _theta(params), loaded.per_param, max_grad_norm)


@pytest.mark.parametrize("wds", [(0.0, 0.0), (0.1, 0.1), (0.1, 0.0), (0.3, 0.02)],
                         ids=["no_wd", "same_wd", "wd_and_no_wd_groups", "two_wds"])
def test_adamw_v_matches_torch_step_with_saved_state(tmp_path, wds):
    params = _params()
    opt = _adamw(params, wds)
    _train(opt, params, skip={"norm.weight": {1}})  # its step count (4) differs from the others (5)
    Y = _random_grads(SHAPES, seed=7)
    loaded, v = _saved_state_v(tmp_path, params, opt, Y)
    assert loaded.steps == [4.0, 5.0]
    assert [g["weight_decay"] for g in loaded.groups] == list(wds)
    before, after = _real_step(opt, params, Y)
    _assert_step(before, after, v)
    # the state matters: a fresh optimizer's v is far from it
    fresh = adamw_direction(Y, _theta(params), None)
    assert max((fresh[n] - v[n]).abs().max().item() for n in v) > 0.1


def test_adamw_v_with_clipping(tmp_path):
    params = _params()
    opt = _adamw(params)
    _train(opt, params)
    Y = _random_grads(SHAPES, seed=8)
    norm = float(torch.sqrt(sum((y ** 2).sum() for y in Y.values())))
    max_norm = 0.05 * norm
    assert clip_coefficient(Y, max_norm) == pytest.approx(max_norm / (norm + 1e-6), rel=1e-14)
    _, v = _saved_state_v(tmp_path, params, opt, Y, max_grad_norm=max_norm)
    _, v_unclipped = _saved_state_v(tmp_path, params, opt, Y)
    assert max((v_unclipped[n] - v[n]).abs().max().item() for n in v) > 0.01  # clipping changes v
    before, after = _real_step(opt, params, Y, max_grad_norm=max_norm)
    _assert_step(before, after, v)
    # a max norm above ‖g‖ leaves g as is (coefficient clamped at 1)
    assert clip_coefficient(Y, 2 * norm) == 1.0 and clip_coefficient(Y, 0) == 1.0


def test_adamw_fresh_first_step_uses_torch_defaults():
    params = _params()
    opt = torch.optim.AdamW(list(params.values()), lr=LR)  # torch's defaults
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == (FRESH_HYPER.betas, FRESH_HYPER.eps,
                                                                     FRESH_HYPER.weight_decay)
    Y = _random_grads(SHAPES, seed=9)
    v = update_direction("adamw", Y, _theta(params))
    before, after = _real_step(opt, params, Y)
    _assert_step(before, after, v)
    # the fresh first step is sign(Y) − wd·θ up to eps
    for n in v:
        expected = torch.sign(Y[n]) - FRESH_HYPER.weight_decay * before[n]
        assert (v[n] - expected).abs().max().item() < 1e-6


def test_adamw_fresh_with_clipping():
    params = _params()
    opt = torch.optim.AdamW(list(params.values()), lr=LR)
    Y = _random_grads(SHAPES, seed=10, scale=1e-3)
    v = update_direction("adamw", Y, _theta(params), max_grad_norm=1e-5)
    assert clip_coefficient(Y, 1e-5) < 0.01
    before, after = _real_step(opt, params, Y, max_grad_norm=1e-5)
    _assert_step(before, after, v)


def test_parameter_without_gradient_gets_zero(tmp_path):
    params = _params()
    opt = _adamw(params, (0.1, 0.1))
    _train(opt, params, skip={"head.weight": set(range(5))})  # head.weight never stepped: no saved state
    Y = _random_grads(["layer.weight", "norm.weight", "head.weight"], seed=11)  # layer.bias: no gradient
    loaded, v = _saved_state_v(tmp_path, params, opt, Y)
    assert loaded.num_unstepped == 1 and loaded.per_param["head.weight"].exp_avg is None
    assert torch.equal(v["layer.bias"], torch.zeros(SHAPES["layer.bias"], dtype=torch.float64))
    before, after = _real_step(opt, params, Y)
    assert torch.equal(before["layer.bias"], after["layer.bias"])  # torch skips it, weight decay too
    _assert_step(before, after, v)


def test_gradient_outside_the_optimizer_is_an_error(tmp_path):
    params = _params()
    opt = torch.optim.AdamW([{"params": [params[n] for n in GROUPS[0]]}], lr=LR)
    _train(opt, params)
    state_path, names_path = _save(opt, tmp_path, groups=[GROUPS[0]])
    loaded = load_adamw_state(state_path, names_path, _theta(params))
    with pytest.raises(ValueError, match="layer.bias"):
        adamw_direction(_random_grads(SHAPES, seed=1), _theta(params), loaded.per_param)


@pytest.mark.parametrize("flag", ["amsgrad", "maximize"])
def test_amsgrad_or_maximize_is_an_error(tmp_path, flag):
    params = _params()
    opt = _adamw(params, **{flag: True})
    _train(opt, params, steps=2)
    state_path, names_path = _save(opt, tmp_path)
    with pytest.raises(OptimizerStateError, match=rf"{re.escape(str(state_path))}.*{flag}"):
        load_adamw_state(state_path, names_path, _theta(params))


def test_adam_with_l2_weight_decay_is_an_error(tmp_path):
    params = _params()
    opt = torch.optim.Adam(list(params.values()), lr=LR, weight_decay=0.1)
    _train(opt, params, steps=2)
    state_path, names_path = _save(opt, tmp_path, groups=[sum(GROUPS, [])])
    with pytest.raises(OptimizerStateError, match="not AdamW"):
        load_adamw_state(state_path, names_path, _theta(params))


def test_different_group_learning_rates_are_an_error(tmp_path):
    params = _params()
    opt = _adamw(params)
    opt.param_groups[1]["lr"] = LR / 10
    _train(opt, params, steps=2)
    state_path, names_path = _save(opt, tmp_path)
    with pytest.raises(OptimizerStateError, match="learning rates"):
        load_adamw_state(state_path, names_path, _theta(params))


@pytest.fixture
def saved(tmp_path):
    params = _params()
    opt = _adamw(params)
    _train(opt, params, steps=3)
    state_path, names_path = _save(opt, tmp_path)
    return params, opt, state_path, names_path


def test_corrupt_state_file_is_an_error_naming_it(saved):
    params, _, state_path, names_path = saved
    state_path.write_bytes(os.urandom(512))
    with pytest.raises(OptimizerStateError, match=re.escape(str(state_path))):
        load_adamw_state(state_path, names_path, _theta(params))


def test_missing_state_file_is_an_error_naming_it(saved, tmp_path):
    params, _, _, names_path = saved
    missing = tmp_path / "nope.pt"
    with pytest.raises(OptimizerStateError, match=re.escape(str(missing))):
        load_adamw_state(missing, names_path, _theta(params))


def test_pickled_code_is_not_run(saved):
    """weights_only=True: a state file carrying an arbitrary object is refused, not unpickled."""
    params, _, state_path, names_path = saved
    torch.save({"state": {}, "param_groups": [], "evil": _Evil()}, state_path)
    with pytest.raises(OptimizerStateError, match=re.escape(str(state_path))):
        load_adamw_state(state_path, names_path, _theta(params))


class _Evil:
    pass


def test_names_file_missing_a_name_is_an_error_naming_it(saved):
    params, _, state_path, names_path = saved
    names = json.loads(names_path.read_text())
    names[1].pop()
    names_path.write_text(json.dumps(names))
    with pytest.raises(OptimizerStateError, match=re.escape(str(names_path))):
        load_adamw_state(state_path, names_path, _theta(params))


def test_flat_names_file_is_accepted_and_checked(saved):
    params, opt, state_path, names_path = saved
    names_path.write_text(json.dumps(sum(GROUPS, [])))
    loaded = load_adamw_state(state_path, names_path, _theta(params))
    assert loaded.per_param["layer.bias"].hyper.weight_decay == 0.0
    assert loaded.per_param["head.weight"].hyper.weight_decay == 0.1
    names_path.write_text(json.dumps(sum(GROUPS, [])[:-1]))
    with pytest.raises(OptimizerStateError, match=re.escape(str(names_path))):
        load_adamw_state(state_path, names_path, _theta(params))


def test_parameter_missing_from_the_model_is_an_error(saved):
    params, _, state_path, names_path = saved
    theta = _theta(params)
    del theta["norm.weight"]
    with pytest.raises(OptimizerStateError, match=rf"{re.escape(str(names_path))}.*norm\.weight"):
        load_adamw_state(state_path, names_path, theta)


def test_shape_mismatch_is_an_error_naming_the_parameter(saved):
    params, _, state_path, names_path = saved
    theta = _theta(params)
    theta["layer.weight"] = theta["layer.weight"].T.contiguous()
    with pytest.raises(OptimizerStateError, match=r"layer\.weight.*exp_avg.*shape"):
        load_adamw_state(state_path, names_path, theta)
    # swapped names of two same-group parameters of different shapes: caught as well
    names_path.write_text(json.dumps([GROUPS[0][::-1], GROUPS[1]]))
    with pytest.raises(OptimizerStateError, match="shape"):
        load_adamw_state(state_path, names_path, _theta(params))


def test_sgd_v_is_y_and_matches_a_torch_sgd_step():
    params = _params()
    Y = {n: y.float() for n, y in _random_grads(SHAPES, seed=12).items()}
    v = update_direction("sgd", Y)
    assert all(v[n].dtype == torch.float64 and torch.equal(v[n], Y[n].double()) for n in Y)
    Y64 = {n: y.double() for n, y in Y.items()}
    opt = torch.optim.SGD(list(params.values()), lr=LR)
    before, after = _real_step(opt, params, Y64, max_grad_norm=0.5)
    _assert_step(before, after, sgd_direction(Y64, max_grad_norm=0.5))
    with pytest.raises(ValueError, match="unknown optimizer"):
        update_direction("lion", Y)


def test_resolve_state_paths(tmp_path):
    assert resolve_state_paths({"optimizer": "sgd"}, "pol", True) is None
    assert resolve_state_paths({"optimizer": "adamw", "optimizer_state": ""}, "pol", True) is None
    assert resolve_state_paths({"optimizer": "adamw", "optimizer_state": "embedded"}, "pol", True) == (
        os.path.join("pol", STATE_FILE), os.path.join("pol", NAMES_FILE))
    assert resolve_state_paths({"optimizer": "adamw", "optimizer_state": "ck/opt.pt",
                                "optimizer_param_names": "n.json"}, "pol", False) == ("ck/opt.pt", "n.json")
    assert resolve_state_paths({"optimizer": "adamw", "optimizer_state": "ck/opt.pt"}, "pol", False)[1] == \
        os.path.join("ck", NAMES_FILE)
    with pytest.raises(ValueError, match="embedded"):
        resolve_state_paths({"optimizer": "adamw", "optimizer_state": "embedded"}, "pol", False)
    with pytest.raises(ValueError, match="only apply to adamw"):
        resolve_state_paths({"optimizer": "sgd", "optimizer_state": "x.pt"}, "pol", True)


# --- the embedded toy policy's own saved AdamW state, through the stage script -------------------

def _toy_y(policy_dir, names, seed=0):
    model = models.load_policy(policy_dir, "float32", "cpu")
    named = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    return {n: 1e-2 * torch.randn(named[n].shape, generator=gen, dtype=torch.float64) for n in names}


def _write_y(path, Y, policy_dir):
    shards.write_shard(path, Y, {"kind": "Y", "model_fingerprint": models.fingerprint(policy_dir),
                                 "param_filter": "", "loss_normalization": "seq_mean_token_mean"})


def _run_stage(cfg, y_path, policy_dir, out_path):
    """The update_vector stage as its rule runs it (entropy_probe.stages.update)."""
    update_stage.update_vector(cfg, policy=str(policy_dir), Y=str(y_path), v=str(out_path))
    return shards.read_shard(out_path, {"kind": "v"})


def test_embedded_toy_state_matches_a_real_adamw_step(toy_policy_dir, tmp_path):
    report = json.loads((toy_policy_dir / "training_report.json").read_text())
    group_names = json.loads((toy_policy_dir / NAMES_FILE).read_text())
    all_names = sum(group_names, [])
    with_grad = [n for n in all_names if ".layers.1." not in n]  # layer 1: no gradient (frozen)
    Y = _toy_y(toy_policy_dir, with_grad)
    y_path, out_path = tmp_path / "Y.safetensors", tmp_path / "v.safetensors"
    _write_y(y_path, Y, toy_policy_dir)
    cfg = load_config(None, {"update": {"optimizer": "adamw", "optimizer_state": "embedded", "max_grad_norm": 0.5}})
    v, meta = _run_stage(cfg, y_path, toy_policy_dir, out_path)

    assert set(v) == set(Y)
    assert meta["optimizer"] == "adamw" and meta["model_fingerprint"] == models.fingerprint(toy_policy_dir)
    assert meta["optimizer_step"] == meta["optimizer_step_min"] == report["steps"]
    assert meta["optimizer_state"] == str(toy_policy_dir / STATE_FILE)
    assert [g["weight_decay"] for g in meta["optimizer_param_groups"]] == [0.01, 0.0]
    assert meta["clip_coef"] < 1  # the clipping is exercised

    # the real step: the toy model in float64, its optimizer rebuilt from the names and the saved state
    model = models.load_policy(toy_policy_dir, "float64", "cpu")
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [named[n] for n in g]} for g in group_names], lr=1.0)
    opt.load_state_dict(torch.load(toy_policy_dir / STATE_FILE, weights_only=True))
    lr = opt.param_groups[0]["lr"]
    state = opt.state[named["model.embed_tokens.weight"]]
    assert int(state["step"]) == report["steps"] and state["exp_avg"].abs().sum() > 0
    before, after = _real_step(opt, named, Y, max_grad_norm=0.5)
    for name in all_names:
        if name in Y:
            err = (before[name] + lr * v[name] - after[name]).abs().max().item()
            assert err <= TOL, f"{name}: {err:.3g}"
        else:
            assert torch.equal(before[name], after[name])

    # the saved moments are what makes v: a fresh optimizer gives something else
    fresh = adamw_direction({n: y for n, y in Y.items()}, {n: named[n].detach() for n in Y}, None, 0.5)
    assert max((fresh[n] - v[n]).abs().max().item() for n in v) > 0.1


def test_stage_sgd_and_fresh_adamw(toy_policy_dir, tmp_path):
    Y = _toy_y(toy_policy_dir, ["model.norm.weight", "lm_head.weight"], seed=1)
    y_path = tmp_path / "Y.safetensors"
    _write_y(y_path, Y, toy_policy_dir)
    v, meta = _run_stage(load_config(), y_path, toy_policy_dir, tmp_path / "v_sgd.safetensors")
    assert meta["optimizer"] == "sgd" and all(torch.equal(v[n], Y[n]) for n in Y)
    cfg = load_config(None, {"update": {"optimizer": "adamw"}})
    v, meta = _run_stage(cfg, y_path, toy_policy_dir, tmp_path / "v_fresh.safetensors")
    assert meta["optimizer_state"] == "" and meta["optimizer_step"] == 0
    theta = dict(models.load_policy(toy_policy_dir, "float32", "cpu").named_parameters())
    for n in Y:
        expected = Y[n] / (Y[n].abs() + 1e-8) - 0.01 * theta[n].detach().double()  # the fresh first step
        assert (v[n] - expected).abs().max().item() < 1e-12


def test_stage_refuses_a_broken_configured_state(toy_policy_dir, tmp_path):
    """A configured state that fails to load stops the stage; no fresh-optimizer fallback, no v."""
    Y = _toy_y(toy_policy_dir, ["lm_head.weight"], seed=2)
    y_path, out_path = tmp_path / "Y.safetensors", tmp_path / "v.safetensors"
    _write_y(y_path, Y, toy_policy_dir)
    broken = tmp_path / "opt.pt"
    broken.write_bytes(os.urandom(300))
    (tmp_path / NAMES_FILE).write_text((toy_policy_dir / NAMES_FILE).read_text())
    cfg = load_config(None, {"update": {"optimizer": "adamw"}})
    cfg["update"]["optimizer_state"] = str(broken)  # past the config check (which refuses it: not a torch.save file)
    with pytest.raises(OptimizerStateError, match=re.escape(str(broken))):
        _run_stage(cfg, y_path, toy_policy_dir, out_path)
    assert not out_path.exists()
