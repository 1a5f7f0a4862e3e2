"""Disk and memory at full-parameter scale.

- Float32 storage of the X side's gradient-sized files (per-shard partial sums, the reduced X;
  ``entropy_probe.gradients.STORAGE_DTYPE``): every stage from the gradient passes to the summary,
  run by hand on the session's default run once with float32 and once with float64 storage,
  reports the same numbers to 1e-6 relative. (The U side, Y and v, stays float64: see
  ``entropy_probe.gradients``.)
- The X partial sums are ``temp()``: gone after the reduction, and the run stays complete.
- Gradient checkpointing of the decoder layers (``teacher_forcing.gradient_checkpointing``) gives the
  gradients of the plain passes.
"""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import RUN_CONFIG

from entropy_probe import gradients, passes, parameters, shards
from entropy_probe.config import load_config
from entropy_probe.stage_keys import stage_config_from
from entropy_probe.stages import report, statistics, teacher_force, update
from workflow_util import json_numbers


def run_stages(run, out):
    """Every stage from the gradient passes on, by hand (the stage functions the rules run), on
    ``run``'s rollouts and batch tables; outputs under ``out``. Returns summary.json's contents."""
    res, config = run / "results", load_config(run / RUN_CONFIG)
    policy = str(res / "policy")
    cfg = lambda stage: stage_config_from(config, stage)  # noqa: E731
    e_shards = sorted(str(p) for p in (res / "rollouts" / "E").glob("shard_*.safetensors"))
    u_shards = sorted(str(p) for p in (res / "rollouts" / "U").glob("shard_*.safetensors"))
    paths = {"X": [], "Y": []}
    for kind, rollouts, batch in (("X", e_shards, res / "estimates" / "e_stats.json"),
                                  ("Y", u_shards, res / "estimates" / "u_objective.safetensors")):
        stage = teacher_force.teacher_force_x if kind == "X" else teacher_force.teacher_force_y
        for i, rollout in enumerate(rollouts):
            paths[kind].append(str(out / f"tf_{kind}_{i}.safetensors"))
            stage(cfg(f"teacher_force_{kind.lower()}"), rollout=rollout, policy=policy, batch=str(batch),
                  gradient=paths[kind][-1])
        teacher_force.reduce_gradients(kind=kind, partials=paths[kind], reduced=str(out / f"{kind}.safetensors"))
    v = str(out / "v.safetensors")
    update.update_vector(cfg("update_vector"), policy=policy, Y=str(out / "Y.safetensors"), v=v)
    directional, snis = [], []
    for i, rollout in enumerate(e_shards):
        directional.append(str(out / f"directional_{i}.safetensors"))
        statistics.directional(cfg("directional"), rollout=rollout, policy=policy, v=v, sums=directional[-1])
        snis.append(str(out / f"snis_{i}.safetensors"))
        statistics.snis_shard(cfg("snis_shard"), rollout=rollout, policy=policy, v=v, weights=snis[-1])
    statistics.delta_h1(cfg("delta_h1"), X=str(out / "X.safetensors"), v=v, directional=directional,
                        report=str(out / "delta_h1.json"), table=str(out / "delta_h1.txt"))
    statistics.delta_h_snis(cfg("delta_h_snis"), weights=snis, report=str(out / "delta_h_snis.json"))
    update.u_jackknife(cfg("u_jackknife"), X=str(out / "X.safetensors"), policy=policy, Y=paths["Y"],
                       jackknife=str(out / "u_jackknife.json"))
    [prepared] = (res / "data").glob("*.json")
    with contextlib.chdir(run):  # the prepared set names its prompt file relative to the run directory
        statistics.exact_reference(cfg("exact_reference"), policy=policy, v=v, data_set=str(prepared),
                                   exact_values=str(out / "exact.json"))
    summary_cfg = cfg("summary")
    summary_cfg["update"]["variants"] = {}  # the variants' passes are not run here
    report.summary(summary_cfg, delta_h1=str(out / "delta_h1.json"), delta_h_snis=str(out / "delta_h_snis.json"),
                   directional=directional, snis=snis, summary_json=str(out / "summary.json"),
                   summary_table=str(out / "summary.txt"), summary_plot=str(out / "plot.png"),
                   landing=str(out / "landing.rst"), u_jackknife=str(out / "u_jackknife.json"),
                   u_objective=str(res / "estimates" / "u_objective.safetensors"), exact=str(out / "exact.json"))
    return json.loads((out / "summary.json").read_text()), out


@pytest.mark.workflow
def test_float32_storage_changes_no_reported_number_beyond_1e_6(default_run, tmp_path, monkeypatch):
    assert gradients.STORAGE_DTYPE == torch.float32
    (tmp_path / "f32").mkdir()
    (tmp_path / "f64").mkdir()
    f32, out32 = run_stages(default_run, tmp_path / "f32")
    monkeypatch.setattr(gradients, "STORAGE_DTYPE", torch.float64)
    f64, out64 = run_stages(default_run, tmp_path / "f64")
    # the files are what the names say: X side float32 (half the bytes), U side float64 in both
    for name, kind in (("tf_X_0", "X"), ("X", "X"), ("tf_Y_0", "Y"), ("Y", "Y"), ("v", "v")):
        t32, _ = shards.read_shard(out32 / f"{name}.safetensors")
        t64, _ = shards.read_shard(out64 / f"{name}.safetensors")
        grads32, stats32 = gradients.unpack(t32)
        assert {t.dtype for t in grads32.values()} == {torch.float32 if kind == "X" else torch.float64}, name
        assert {t.dtype for t in gradients.unpack(t64)[0].values()} == {torch.float64}, name
        assert all(t.dtype == torch.float64 for t in stats32.values())  # per-sequence stats stay float64
    size = lambda out, name: (out / f"{name}.safetensors").stat().st_size  # noqa: E731
    assert size(out32, "X") < 0.6 * size(out64, "X")
    # every reported number, the summary's and its inputs'
    # the cost account (token counts, seconds) is not a number of the probe
    old = json_numbers({k: v for k, v in f64.items() if k not in ("config", "cost")})
    new = json_numbers({k: v for k, v in f32.items() if k not in ("config", "cost")})
    assert old.keys() == new.keys()
    # a relative difference (or one in SE units) measures rounding itself (of order 1e-7 in fp32):
    # held absolutely
    relative = {k for k in old if k.endswith(("_relative_difference", "_difference_in_se"))}
    assert relative
    for key in relative:
        assert abs(new[key] - old[key]) <= 1e-6, key
    worst = 0.0
    for key, value in old.items():
        if key not in relative:
            assert new[key] == pytest.approx(value, rel=1e-6, abs=0), key
            worst = max(worst, abs(new[key] - value) / abs(value) if value else 0.0)
    assert worst > 0  # the storage dtype did change something (the comparison is not vacuous)
    print(f"largest relative change of a reported number, float32 vs float64 X storage: {worst:.2e}")


@pytest.mark.workflow
def test_x_partial_sums_are_temporary(default_run):
    results = default_run / "results"
    assert not list((results / "teacher_force" / "X").glob("shard_*.safetensors"))  # deleted after the reduction
    assert len(list((results / "teacher_force" / "Y").glob("shard_*.safetensors"))) == 2  # the jackknife reads them
    assert (results / "gradients" / "X.safetensors").is_file() and (results / "summary.json").is_file()


@pytest.mark.parametrize("kind", ["X", "Y"])
def test_gradient_checkpointing_gives_the_same_gradients(kind, monkeypatch):
    from test_chunked import sampled_rollout, small_qwen2

    model = small_qwen2(tied=False)
    rollout, pad = sampled_rollout(model, temperature=0.9, top_p=0.9, seed=11)
    params = parameters.select(model)
    common = dict(pad_token_id=pad, temperature=0.9, tf_batch_size=3, chunk_tokens=5)
    if kind == "X":
        run = lambda ckpt: passes.x_gradient(  # noqa: E731
            model, params, rollout, top_p=0.9, H_bar=1.0, normalization="token", baseline="loo",
            pathwise_term=True, gradient_checkpointing=ckpt, **common)[0]
    else:
        coefficients = torch.linspace(-1, 1, rollout["response_lens"].numel()).reshape(rollout["response_lens"].shape)
        run = lambda ckpt: passes.y_gradient(model, params, rollout, coefficients,  # noqa: E731
                                             gradient_checkpointing=ckpt, **common)
    calls = []
    mlp_forward = type(model.get_decoder().layers[0].mlp).forward  # (a forward hook does not see recomputations)
    monkeypatch.setattr(type(model.get_decoder().layers[0].mlp), "forward",
                        lambda self, x: calls.append(1) or mlp_forward(self, x))
    plain = run(False)
    plain_calls = len(calls)
    checkpointed = run(True)
    assert len(calls) - plain_calls == 2 * plain_calls  # each layer ran again in the backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-9)
    # the decoder layers are their own again afterwards
    assert all("forward" not in vars(layer) for layer in model.get_decoder().layers)


def _toy_shard(toy_model, ids, **kw):
    from entropy_probe import rewards, rollout
    from entropy_probe.toy import arithmetic_examples

    model, tokenizer = toy_model
    settings = dict(G=4, kind="E", shard_index=0, slots=range(len(ids)), seed=2, temperature=1.0, top_p=0.9,
                    max_new_tokens=3, rollout_batch_size=8, gen_batch_size=16, reward_fn=rewards.exact_match) | kw
    return rollout.rollout_shard(model, tokenizer, arithmetic_examples(19), ids, **settings)


def test_rollouts_generate_longest_prompts_first_and_keep_plan_order(toy_model, monkeypatch):
    """Each generate call gets prompts of similar length (sorted longest first: less left
    padding), and the shard comes back in plan order, the same as without sorting."""
    from entropy_probe import generate

    ids = [3, 250, 7, 399, 12, 40, 1, 388, 205, 9, 77, 120]  # "a+b=" of 4, 5 and 6 characters, mixed
    widths = []
    sample = generate.sample

    def recording(model, prompt_ids, prompt_mask, *args, **kwargs):
        widths.append(prompt_mask.sum(-1).tolist())
        return sample(model, prompt_ids, prompt_mask, *args, **kwargs)

    monkeypatch.setattr(generate, "sample", recording)
    shard = _toy_shard(toy_model, ids)
    lengths = [w for call in widths for w in call]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1
    assert shard["prompt_ids"].tolist() == ids  # plan order
    monkeypatch.setattr(generate, "sample", sample)
    one_by_one = [_toy_shard(toy_model, [i], slots=[slot]) for slot, i in enumerate(ids)]
    for b, alone in enumerate(one_by_one):
        assert int(shard["prompt_lens"][b]) == int(alone["prompt_lens"][0])
        T = alone["token_log_q"].shape[-1]
        assert torch.equal(shard["sequences"][b, :, -shard["token_log_q"].shape[-1]:][:, :T],
                           alone["sequences"][0, :, -T:])


def test_a_static_kv_cache_draws_the_same_responses(toy_model):
    ids = list(range(0, 400, 9))
    dynamic = _toy_shard(toy_model, ids, rollout_batch_size=64, gen_batch_size=256)
    static = _toy_shard(toy_model, ids, rollout_batch_size=64, gen_batch_size=256, kv_cache="static")
    assert torch.equal(static["sequences"], dynamic["sequences"])
    torch.testing.assert_close(static["token_log_q"], dynamic["token_log_q"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="generation.kv_cache"):
        _toy_shard(toy_model, ids[:2], kv_cache="paged")
