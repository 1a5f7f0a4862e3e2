"""bf16 end to end: ``model.precision: bfloat16`` runs generation, the X and Y passes,
the directional pass and SNIS under bf16 autocast, with the measure on fp32 logits and float64
reductions.

- the old key ``generation.autocast_dtype`` is a rename error; the precision is provenance
  (rollout headers, summary.json);
- the X·v cross-check's bounds depend on the precision;
- the small test workflow (`.test/config/config.yaml`) in bf16 against the same run in fp32: every
  δH₁ and ΔH within the bound benchmarks/README.md states (in units of the fp32 SE,
  :data:`entropy_probe.precision.BF16_SHIFT_BOUNDS`), the cross-check within its bf16 bound.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from entropy_probe import first_order, logit_gradient, precision
from entropy_probe.config import ConfigError, load_config
from workflow_util import dry_run_jobs, run_snakemake


def test_the_old_autocast_key_is_a_rename_error():
    with pytest.raises(ConfigError, match=r"generation\.autocast_dtype: renamed to model\.precision"):
        load_config(None, {"generation": {"autocast_dtype": "bfloat16"}})
    assert load_config(None, {"model": {"precision": "bfloat16"}})["model"]["precision"] == "bfloat16"
    with pytest.raises(ConfigError, match=r"model\.precision"):
        load_config(None, {"model": {"precision": "float16"}})


def test_precision_names_and_bounds():
    assert precision.autocast_dtype("float32") is None and precision.autocast_dtype("bfloat16") == torch.bfloat16
    assert precision.name_of(None) == "float32" and precision.name_of(torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="model.precision"):
        precision.autocast_dtype("float16")
    b32, b16 = precision.crosscheck_bounds("float32"), precision.crosscheck_bounds("bfloat16")
    assert b32["warn"] < b32["fail"] and b16["warn"] < b16["fail"] and b32["fail"] < b16["fail"]
    assert b32["fail_se"] == 0 < b16["fail_se"]


def _report(discrepancy: float, prec: str, spread: float = 0.5):
    """first_order_report on hand-made inputs whose forward-mode X·v is (1 + discrepancy) × the
    reverse-mode one (Q = 0: X·v = mean P / mean T); ``spread`` sets the groups' spread (the SE)."""
    n = 8
    T = torch.full((n,), 10.0, dtype=torch.float64)
    P = torch.linspace(1 - spread, 1 + spread, n, dtype=torch.float64) * 10 * 2.0 * (1 + discrepancy)
    directional = [{"P": P, "Q": torch.zeros(n, dtype=torch.float64), "S": T.clone(), "T": T}]
    X, v = {"w": torch.tensor([2.0], dtype=torch.float64)}, {"w": torch.tensor([1.0], dtype=torch.float64)}
    return first_order.first_order_report(X, v, directional, 4, "token", [1e-3], precision=prec)


def test_the_cross_check_bound_depends_on_the_precision():
    fail32 = precision.crosscheck_bounds("float32")["fail"]
    b16 = precision.crosscheck_bounds("bfloat16")
    between = (fail32 + b16["fail"]) / 2
    report = _report(between, "bfloat16")
    assert report["precision"] == "bfloat16"
    assert report["X_dot_v_relative_difference"] == pytest.approx(between, rel=1e-9)
    with pytest.raises(RuntimeError, match="bound at float32"):
        _report(between, "float32")
    # beyond the relative bound: stops when the difference is also beyond fail_se standard errors
    beyond = 2 * b16["fail"]
    with pytest.raises(RuntimeError, match="bound at bfloat16"):
        _report(beyond, "bfloat16", spread=0.01)
    noisy = _report(beyond, "bfloat16", spread=50.0)  # X·v buried in its noise: a relative bound says nothing
    assert noisy["X_dot_v_difference_in_se"] < b16["fail_se"]


def test_bf16_rollouts_are_coupled_to_fp32_and_teacher_forcing_recomputes_them(toy_model):
    """The bf16 sampler draws mostly the responses the same noise draws in fp32 (coupled), and
    teacher forcing in bf16 recomputes its sampling-time log q and entropies to bf16 accuracy."""
    from entropy_probe import rewards, rollout, teacher_force, tf_layout
    from entropy_probe.toy import arithmetic_examples

    model, tokenizer = toy_model
    examples = arithmetic_examples(19)
    ids = list(range(0, 400, 7))
    kw = dict(G=4, kind="E", shard_index=0, slots=range(len(ids)), seed=5, temperature=1.0, top_p=1.0,
              max_new_tokens=3, rollout_batch_size=64, gen_batch_size=256, reward_fn=rewards.exact_match)
    fp32 = rollout.rollout_shard(model, tokenizer, examples, ids, **kw)
    bf16 = rollout.rollout_shard(model, tokenizer, examples, ids, autocast_dtype="bfloat16", **kw)
    same = (fp32["sequences"] == bf16["sequences"]).all(-1).float().mean()
    assert same >= 0.9
    assert not torch.equal(fp32["rb_entropies"], bf16["rb_entropies"])  # bf16 logits
    batch = tf_layout.from_rollout(bf16, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = teacher_force.score(teacher_force.ResponseLogits(model), batch, 1.0, 1.0,
                                     autocast_dtype=torch.bfloat16)
    B, G, T = bf16["token_log_q"].shape
    torch.testing.assert_close(scores.token_log_q, bf16["token_log_q"].reshape(B * G, T), atol=0.05, rtol=0.05)
    torch.testing.assert_close(scores.entropy, bf16["rb_entropies"].reshape(B * G, T), atol=0.05, rtol=0.05)


def test_a_token_outside_its_recomputed_nucleus_is_kept_only_when_asked():
    """bf16 passes keep a sampled token that falls just outside the nucleus they recompute
    (S ∪ {y}), with the closed-form logit gradient of that measure; fp32 passes refuse it."""
    from entropy_probe import measure

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 40, generator=g)).requires_grad_(True)
    mask = measure.nucleus_mask(logits, 0.8, 0.7)
    tokens = (~mask).float().argmax(-1)  # a token outside each row's nucleus
    assert not mask.gather(-1, tokens[:, None]).any()
    lq, h, inside = measure.score_tokens(logits, tokens, 0.8, 0.7)
    assert not inside.any() and torch.isinf(lq).all()
    lq, h, inside = measure.score_tokens(logits, tokens, 0.8, 0.7, keep_tokens=True)
    assert not inside.any() and torch.isfinite(lq).all()
    kept = mask.scatter(-1, tokens[:, None], True)
    expected = measure.log_q(logits, kept, 0.8)
    torch.testing.assert_close(lq, expected.gather(-1, tokens[:, None]).squeeze(-1))
    torch.testing.assert_close(h, measure.rb_entropy(expected, kept))
    c_h, c_q = torch.rand(6, generator=g), torch.randn(6, generator=g)
    (c_h * h + c_q * lq).sum().backward()
    scores, grad = logit_gradient.scores_with_logit_gradient(logits.detach(), tokens, 0.8, 0.7, coef_entropy=c_h,
                                                      coef_log_q=c_q, keep_tokens=True)
    assert not scores["in_nucleus"].any()
    torch.testing.assert_close(scores["token_log_q"], lq.detach())
    torch.testing.assert_close(grad, logits.grad, atol=1e-6, rtol=1e-5)




TARGETS = ("results/delta_h1.json", "results/delta_h_snis.json")


@pytest.fixture(scope="module")
def test_runs(test_config_run, tmp_path_factory):
    """The small test workflow in fp32 (the shared whole run), then a copy switched to bf16 (which
    reruns what depends on the precision: rollouts onwards) up to δH₁ and the SNIS ΔH (the numbers
    the bound is about). Returns ({δH₁ report, SNIS ΔH} per precision, the bf16 dry run's job counts)."""
    fp32 = test_config_run
    bf16 = tmp_path_factory.mktemp("precision") / "bf16"
    shutil.copytree(fp32, bf16, symlinks=True)
    config = yaml.safe_load((bf16 / "config.yaml").read_text())
    config.setdefault("model", {})["precision"] = "bfloat16"
    (bf16 / "config.yaml").write_text(yaml.safe_dump(config))
    jobs = dry_run_jobs(bf16, "config.yaml")
    run_snakemake(bf16, "config.yaml", "--cores", "2", *TARGETS, timeout=1800)
    load = lambda d: [json.loads((d / target).read_text()) for target in TARGETS]  # noqa: E731
    return load(fp32), load(bf16), jobs


@pytest.mark.workflow
def test_a_precision_change_reruns_from_the_rollouts(test_runs):
    _, _, jobs = test_runs
    assert jobs["rollout"] == 4 and jobs["teacher_force_x"] == 2 and jobs["snis_shard"] == 2
    assert jobs["fresh_rollout"] == 6 and jobs["attribution"] == 1  # every model pass, in the new precision
    assert "build_policy" not in jobs and "plan" not in jobs and "prepare_data" not in jobs


@pytest.mark.workflow
def test_bf16_workflow_is_within_the_stated_bound_of_fp32(test_runs):
    (first32, snis32), (first16, snis16), _ = test_runs
    assert first32["precision"] == snis32["precision"] == "float32"
    assert first16["precision"] == snis16["precision"] == "bfloat16"
    described = precision.describe("bfloat16")
    assert described["measure"].startswith("float32") and described["reductions"] == "float64"
    # the cross-check ran at the bf16 bound and passed it
    assert first16["X_dot_v_relative_difference"] < precision.crosscheck_bounds("bfloat16")["fail"]
    assert first32["X_dot_v_relative_difference"] < precision.crosscheck_bounds("float32")["warn"]
    bounds = precision.BF16_SHIFT_BOUNDS
    moved = False
    for a, b in zip(first32["delta_h1"], first16["delta_h1"], strict=True):
        assert a["eta"] == b["eta"]
        shift = abs(b["delta_h1"] - a["delta_h1"]) / a["se"]
        assert shift < bounds["delta_h1"], (a["eta"], shift)
        moved |= b["delta_h1"] != a["delta_h1"]
    for a, b in zip(snis32["rows"], snis16["rows"], strict=True):
        assert a["eta"] == b["eta"]
        if a["eta"] >= bounds["delta_h_min_eta"]:
            shift_h = abs(b["delta_h"] - a["delta_h"]) / a["se"]
            assert shift_h < bounds["delta_h"], (a["eta"], shift_h)
    assert moved  # bf16 did run: the numbers are not fp32's
