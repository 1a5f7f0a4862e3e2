"""The sampler's own entropy change ΔH_sampler(η) by coupled fresh rollouts (DESIGN §2b), held
against exact enumeration with θ + ηv's own nucleus (entropy_probe/exact.py).

One E batch per sampling setting (prompts uniform over a handful, with replacement); every slot
redrawn at θ + ηu with the same noise along a fixed random direction u, for several η, including
η where the nucleus changes; the paired estimate must match the exact own-nucleus ΔH(η) within
4 SE, for τ ∈ {1, 0.7}, top_p ∈ {1, 0.8} and both normalizations, and the SNIS estimate with
top_p = 1. Its SE is calibrated over independent E batches, and the coupling's saving is checked
against draws with independent noise.
"""
from __future__ import annotations

import pytest
import torch

from toy_batches import G, MAX_NEW_TOKENS, PROMPTS, direction, sample_batch

from entropy_probe import exact, fresh, fresh_pass, report, shards, snis, snis_pass

SETTINGS = [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (0.7, 0.8)]
ETAS = [1e-3, 3e-3, 1e-2, 3e-2]  # along direction(): responses change from a few to most


def redraw(model, tokenizer, batch, u, eta, temperature, top_p, seed=0, num_prompts=None):
    n = batch["prompt_ids"].numel() if num_prompts is None else num_prompts
    return fresh_pass.fresh_rollout_shard(model, tokenizer, batch, u, eta, slots=range(n), seed=seed,
                                     temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS,
                                     gen_batch_size=4096)[0]


def reduce(tensors, normalization="token", entropy="sampler"):
    return fresh.delta_h_sampler(**fresh.per_response(tensors, entropy), G=G, normalization=normalization)


def exact_delta(model, tokenizer, u, eta, temperature, top_p, normalization="token", nucleus="own",
                entropy="sampler"):
    kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS, normalization=normalization,
              direction=u, nucleus=nucleus, entropy=entropy)
    prompts = [p["prompt"] for p in PROMPTS]
    return (exact.exact_entropy_at(model, tokenizer, prompts, eta=eta, **kw)
            - exact.exact_entropy_at(model, tokenizer, prompts, eta=0.0, **kw))


def test_eta_zero_redraws_the_e_batch_and_never_writes_the_model(toy_model):
    model, tokenizer = toy_model
    batch = sample_batch(model, tokenizer, 1.0, 0.8, num_prompts=32)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    same = redraw(model, tokenizer, batch, direction(model), 0.0, 1.0, 0.8)
    moved = redraw(model, tokenizer, batch, direction(model), 0.03, 1.0, 0.8)
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]), k  # parameters applied functionally, never in place
    assert not same["changed"].any()
    T = batch["token_log_q"].shape[-1]
    assert torch.equal(same["response_tokens"][..., :T], batch["sequences"][:, :, -T:])
    torch.testing.assert_close(same["rb_entropies"][..., :T], batch["rb_entropies"], atol=1e-5, rtol=0)
    zero = reduce(same)
    assert abs(zero["delta_h"]) < 1e-6 and zero["changed_responses"] == 0
    assert moved["changed"].any() and reduce(moved)["changed_responses"] == int(moved["changed"].sum())
    # the per-response changed flags are what they say
    for b, g in moved["changed"].nonzero().tolist()[:5]:
        n_old, n_new = int(batch["response_lens"][b, g]), int(moved["response_lens"][b, g])
        old, new = batch["sequences"][b, g, -T:][:n_old], moved["response_tokens"][b, g, :n_new]
        assert n_old != n_new or not torch.equal(old, new)


def test_parameters_applied_functionally_reach_generate_and_adapters(toy_model):
    """parameters.call_at runs model.generate (not only forward) at θ': with a LoRA adapter
    (PEFT names, the base frozen) the redraw equals sampling from a copy whose adapter weights were
    moved in place; the model itself is untouched."""
    import copy

    peft = pytest.importorskip("peft")
    from entropy_probe import generate, parameters
    from entropy_probe.noise import STREAM_E, NoiseKey

    model, tokenizer = toy_model
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                       target_modules=["q_proj", "v_proj"]))
    lora.eval()
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in lora.named_parameters()
         if p.requires_grad}
    assert v and all("lora_" in k for k in v)
    encoded = tokenizer(["3+5=", "12+7=", "9+9=", "0+0="] * 4, padding=True, return_tensors="pt")
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, slots=range(16), noise_key=NoiseKey(0, STREAM_E))
    point = parameters.shifted(lora, v, 0.3)
    before = {k: p.detach().clone() for k, p in lora.named_parameters()}
    drawn = parameters.call_at(lora, point, lambda: generate.sample(lora, encoded["input_ids"],
                                                                    encoded["attention_mask"], G, **kw))
    assert all(torch.equal(p, before[k]) for k, p in lora.named_parameters())
    moved = copy.deepcopy(lora)
    with torch.no_grad():
        for k, p in moved.named_parameters():
            if k in point:
                p.copy_(point[k])
    reference = generate.sample(moved, encoded["input_ids"], encoded["attention_mask"], G, **kw)
    assert torch.equal(drawn.response_tokens, reference.response_tokens)
    torch.testing.assert_close(drawn.entropies, reference.entropies, atol=1e-6, rtol=0)
    unmoved = generate.sample(lora, encoded["input_ids"], encoded["attention_mask"], G, **kw)
    assert not torch.equal(drawn.response_tokens, unmoved.response_tokens)


@pytest.fixture(scope="module")
def fresh_runs(toy_model):
    """Per setting: the E batch (1024 sequences) and its redraws at every η of ETAS."""
    model, tokenizer = toy_model
    u = direction(model)
    out = {}
    for temperature, top_p in SETTINGS:
        batch = sample_batch(model, tokenizer, temperature, top_p)
        out[(temperature, top_p)] = (batch, {eta: redraw(model, tokenizer, batch, u, eta, temperature, top_p)
                                             for eta in ETAS})
    return out


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_sampler_delta_h_matches_exact_own_nucleus(toy_model, fresh_runs, temperature, top_p):
    model, tokenizer = toy_model
    u = direction(model)
    batch, redraws = fresh_runs[(temperature, top_p)]
    nucleus_changes = []
    for eta in ETAS:
        for normalization in ("token", "sequence"):
            row = reduce(redraws[eta], normalization)
            truth = exact_delta(model, tokenizer, u, eta, temperature, top_p, normalization)
            assert row["se"] > 0
            assert abs(row["delta_h"] - truth) < 4 * row["se"], (eta, normalization, row["delta_h"], truth, row["se"])
        if top_p < 1.0:
            frozen = exact_delta(model, tokenizer, u, eta, temperature, top_p, nucleus="base")
            own = exact_delta(model, tokenizer, u, eta, temperature, top_p)
            nucleus_changes.append(abs(own - frozen) > 4 * reduce(redraws[eta])["se"])
    if top_p < 1.0:  # the test has power where it matters: the sampler's change is not SNIS's there
        assert any(nucleus_changes), nucleus_changes
    else:  # top_p = 1: the same quantity as SNIS (one nucleus), from the same E batch
        out = snis_pass.snis_pass(model, u, batch, ETAS, pad_token_id=tokenizer.pad_token_id, temperature=temperature,
                             top_p=top_p, tf_batch_size=1024)
        compared = 0
        for j, eta in enumerate(ETAS):
            row = reduce(redraws[eta])
            sn = snis.delta_h(out["log_w"][j], out["S_shifted"][j], out["S"], out["T"], out["own_nucleus_differs"][j],
                              G, "token")
            # where the weights keep half the batch: lower, SNIS's SE understates its error more and more
            # (benchmarks/README.md, "SNIS calibration"; the fresh rollouts carry no weights)
            if sn["ess_fraction"] >= 0.5:
                compared += 1
                assert abs(row["delta_h"] - sn["delta_h"]) < 3 * (row["se"] ** 2 + sn["se"] ** 2) ** 0.5, (eta, row, sn)
            assert exact_delta(model, tokenizer, u, eta, temperature, top_p) == exact_delta(
                model, tokenizer, u, eta, temperature, top_p, nucleus="base")
        assert compared >= 2, compared


def test_sampler_se_is_calibrated(toy_model):
    """Over independent E batches (other seeds: other prompts and other noise), the spread of
    ΔĤ_sampler matches the mean reported SE within 25%, at an η where about a tenth of the
    responses change."""
    model, tokenizer = toy_model
    u = direction(model, seed=11)
    temperature, top_p, eta = 1.0, 0.9, 3e-3
    estimates, ses, changed = [], [], []
    for seed in range(80):
        batch = sample_batch(model, tokenizer, temperature, top_p, num_prompts=48, seed=200 + seed)
        row = reduce(redraw(model, tokenizer, batch, u, eta, temperature, top_p, seed=200 + seed))
        estimates.append(row["delta_h"])
        ses.append(row["se"])
        changed.append(row["changed_share"])
    spread = torch.tensor(estimates, dtype=torch.float64).std().item()
    mean_se = sum(ses) / len(ses)
    assert 0.05 < sum(changed) / len(changed) < 0.5, changed
    assert 0.75 < spread / mean_se < 1.25, (spread, mean_se)


def test_coupling_saving_is_estimated_from_the_coupled_data(toy_model, fresh_runs):
    """The SE the estimator would have with independent noise, estimated from the coupled draws
    alone (fresh.independent_noise_se), matches the SE of the same estimator run with independent
    noise (another noise seed, same prompt slots) within 25%; and the coupling pays where few
    responses change."""
    model, tokenizer = toy_model
    u = direction(model)
    batch, redraws = fresh_runs[(1.0, 1.0)]
    for eta in ETAS[:2]:
        coupled = reduce(redraws[eta])
        independent = reduce(redraw(model, tokenizer, batch, u, eta, 1.0, 1.0, seed=99))
        assert independent["changed_share"] > 4 * coupled["changed_share"]  # other noise: many more differ
        assert coupled["se_independent_noise"] == pytest.approx(independent["se"], rel=0.25), (coupled, independent)
    assert reduce(redraws[ETAS[0]])["coupling_se_factor"] > 2


def test_reduction_needs_every_shard_of_every_eta(toy_model, tmp_path):
    """The delta_h_sampler stage reduces the whole E batch at every η of estimator.fresh_etas: a
    missing shard or η is an error naming it."""
    from entropy_probe.stages.fresh import delta_h_sampler

    model, tokenizer = toy_model
    batch = sample_batch(model, tokenizer, 1.0, 1.0, num_prompts=8)
    tensors = redraw(model, tokenizer, batch, direction(model), 1e-3, 1.0, 1.0)

    def shard(num_shards: int) -> str:
        path = tmp_path / f"fresh_{num_shards}.safetensors"
        shards.write_shard(path, tensors, {"kind": "fresh", "model_fingerprint": "f", "eta": 1e-3, "shard_index": 0,
                                           "num_shards": num_shards})
        return str(path)

    cfg = {"estimator": {"fresh_etas": [1e-3], "normalization": "token", "entropy": "sampler"},
           "batch_config": {"G": G}}
    out = tmp_path / "delta_h_sampler.json"
    with pytest.raises(shards.ShardError, match=r"not one complete set of shards \(indices \[0\] of \[2\]\)"):
        delta_h_sampler(cfg, redrawn=[shard(2)], report=str(out))
    with pytest.raises(shards.ShardError, match=r"hold η \[0.001\], expected \[0.001, 0.01\]"):
        delta_h_sampler({**cfg, "estimator": cfg["estimator"] | {"fresh_etas": [1e-3, 1e-2]}}, redrawn=[shard(1)],
                        report=str(out))
    delta_h_sampler(cfg, redrawn=[shard(1)], report=str(out))
    assert shards.read_json(out)["rows"][0]["delta_h"] == reduce(tensors)["delta_h"]


def test_low_ess_rows_are_flagged_and_point_to_the_sampler():
    """SNIS rows with ESS/N below snis.MIN_ESS_FRACTION carry ess_low, the table marks them and
    says where to look; a healthy row is not marked."""
    n, G_ = 64, 4
    healthy = snis.delta_h(torch.zeros(n), torch.ones(n), torch.ones(n), torch.full((n,), 2.0),
                           torch.zeros(n, dtype=torch.bool), G_, "token")
    lw = torch.zeros(n)
    lw[:3] = 8.0  # three sequences carry almost all the weight
    collapsed = snis.delta_h(lw, torch.linspace(0, 1, n), torch.ones(n), torch.full((n,), 2.0),
                             torch.zeros(n, dtype=torch.bool), G_, "token")
    assert not healthy["ess_low"] and collapsed["ess_low"]
    assert collapsed["ess_fraction"] < snis.MIN_ESS_FRACTION <= healthy["ess_fraction"]
    first = {"delta_h1": [{"eta": 1e-3, "delta_h1": 0.1, "se": 0.01}, {"eta": 1e-2, "delta_h1": 1.0, "se": 0.1}],
             "X_dot_v": 100.0, "X_dot_v_se": 10.0}
    measured = {"rows": [{"eta": 1e-3, **healthy}, {"eta": 1e-2, **collapsed}]}
    sampler = {"rows": [{"eta": 1e-2, "delta_h": 0.5, "se": 0.1, "changed_responses": 7, "changed_share": 0.1,
                         "coupling_se_factor": 3.0}]}
    rows = report.combine(first, measured, None, sampler=sampler)
    table = report.format_table(rows, "nats/token", min_ess_fraction=snis.MIN_ESS_FRACTION).splitlines()
    marked = [line for line in table if line.lstrip().startswith(("0.001", "0.01"))]
    assert "!" not in marked[0] and "!" in marked[1]
    assert any(line.startswith("! ESS/N below") and "ΔH sampler" in line for line in table)
    assert not any(c in "\n".join(table) for c in "<>&'")  # shown verbatim in the report's HTML


def test_sampler_rows_on_few_nucleus_events_are_flagged(tmp_path):
    """With top_p < 1, a sampler row whose E batch holds fewer than fresh.MIN_NUCLEUS_EVENTS
    sequences with a moved nucleus is marked ? in the table (with what would measure it) and
    hollow in the plot; at top_p = 1 (no boundary part) never."""
    few, enough = fresh.MIN_NUCLEUS_EVENTS - 1, fresh.MIN_NUCLEUS_EVENTS
    assert fresh.events_low(few, 0.95) and not fresh.events_low(enough, 0.95) and not fresh.events_low(0, 1.0)
    first = {"delta_h1": [{"eta": 1e-3, "delta_h1": 0.1, "se": 0.01}, {"eta": 1e-2, "delta_h1": 1.0, "se": 0.1}],
             "X_dot_v": 100.0, "X_dot_v_se": 10.0}
    decomposition = {"frozen": 0.4, "frozen_se": 0.1, "boundary": 0.1, "boundary_se": 0.05}
    sampler = {"rows": [{"eta": eta, "delta_h": 0.5, "se": 0.1, "changed_responses": 7, "changed_share": 0.1,
                         "coupling_se_factor": 3.0, "decomposition": decomposition, "nucleus_events": events,
                         "events_low": fresh.events_low(events, 0.95)}
                        for eta, events in ((1e-3, few), (1e-2, enough))]}
    rows = report.combine(first, None, None, sampler=sampler)
    table = report.format_table(rows, "nats/token").splitlines()
    marked = [line for line in table if line.lstrip().startswith(("0.001", "0.01"))]
    assert "0.5?" in marked[0] and "?" not in marked[1]
    assert any(line.startswith("? ΔH sampler rests on fewer than") and "E_total_sequences" in line for line in table)
    assert not any(c in "\n".join(table) for c in "<>&'")
    labels = report.plot(rows, tmp_path / "plot.png", "nats/token")
    assert "sampler on few nucleus events: SE not to be trusted" in labels


def test_the_decomposition_pairs_the_prompt_groups():
    from entropy_probe import normalization as norm

    gen = torch.Generator().manual_seed(0)
    psi_frozen = torch.randn(64, generator=gen, dtype=torch.float64)
    psi_sampler = psi_frozen + 0.1 * torch.randn(64, generator=gen, dtype=torch.float64)  # mostly shared noise
    parts = fresh.decompose((0.3, psi_sampler), (0.25, psi_frozen))
    assert parts["frozen"] + parts["boundary"] == 0.3
    assert parts["boundary_se"] == pytest.approx(norm.standard_error(psi_sampler - psi_frozen))
    assert parts["boundary_se"] < 0.2 * parts["frozen_se"]  # paired: the shared noise cancels
    with pytest.raises(ValueError, match="pairs prompt groups"):
        fresh.decompose((0.3, psi_sampler), (0.25, psi_frozen[:-1]))


@pytest.mark.workflow
def test_the_sampler_change_is_the_frozen_change_plus_the_boundary_part(default_run):
    """On the default run: the frozen part is the SNIS column's ΔH itself (same function of the
    same SNIS shards), frozen + boundary is the sampler column, and the report carries it."""
    import json

    results = default_run / "results"
    sampler = {r["eta"]: r for r in json.loads((results / "delta_h_sampler.json").read_text())["rows"]}
    snis = {r["eta"]: r for r in json.loads((results / "delta_h_snis.json").read_text())["rows"]}
    exact = {r["eta"]: r for r in json.loads((results / "estimates" / "exact.json").read_text())["delta_h"]}
    summary = {r["eta"]: r for r in json.loads((results / "summary.json").read_text())["rows"]}
    assert sampler and set(sampler) <= set(snis)
    for eta, row in sampler.items():
        parts = row["decomposition"]
        assert parts["frozen"] == pytest.approx(snis[eta]["delta_h"], rel=1e-12, abs=1e-15)
        assert parts["frozen_se"] == pytest.approx(snis[eta]["se"], rel=1e-9)
        assert parts["frozen"] + parts["boundary"] == pytest.approx(row["delta_h"], rel=1e-12, abs=1e-15)
        assert summary[eta]["delta_h_boundary"] == parts["boundary"]
        assert summary[eta]["delta_h_boundary_se"] == parts["boundary_se"] > 0
        true_boundary = exact[eta]["exact_delta_h_sampler"] - exact[eta]["exact_delta_h"]
        print(f"η {eta:g}: boundary {parts['boundary']:.3g} ± {parts['boundary_se']:.2g}, exact {true_boundary:.3g}; "
              f"changed {row['changed_responses']}")
    # the flag: rows on fewer nucleus events than the calibrated threshold are marked in the table
    table = (results / "summary.txt").read_text().splitlines()
    assert any(line.lstrip().startswith("eta") and "boundary" in line for line in table)
    for eta, row in sampler.items():
        assert row["events_low"] == (row["nucleus_events"] < fresh.MIN_NUCLEUS_EVENTS)  # top_p 0.95
        [line] = [line for line in table if line.split() and line.split()[0] == format(eta, ".4g")]
        assert ("?" in line) == row["events_low"], (line, row["nucleus_events"])
        assert summary[eta]["events_low"] == row["events_low"]


def test_unflagged_sampler_rows_cover_the_exact_own_nucleus_change(toy_model, toy_policy_dir):
    """A small replay of benchmarks/sampler_flag_calibration.py (which set fresh.MIN_NUCLEUS_EVENTS):
    independent E batches of 1024 responses on the embedded policy, top_p 0.95 and 0.8, τ 1 and
    0.7, along the exact expected GRPO gradient; every row the flag leaves unflagged has its
    sampler ΔH within 4 SE of the exact own-nucleus ΔH, and the flag does fire at the small η."""
    import json

    from entropy_probe import exact_terms, rewards, rollout

    model, tokenizer = toy_model
    examples = [json.loads(line) for line in (toy_policy_dir / "prompts.jsonl").read_text().splitlines()]
    prompts, golds = [e["prompt"] for e in examples], [e["answer"] for e in examples]
    etas = [1e-6, 1e-5, 1e-4, 1e-3]
    unflagged, flagged = [], 0
    for temperature, top_p in ((1.0, 0.95), (1.0, 0.8), (0.7, 0.95), (0.7, 0.8)):
        kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS)
        v = exact_terms.exact_grpo_gradient(model, tokenizer, prompts, golds, G=G, **kw)
        H0 = exact.exact_entropy_at(model, tokenizer, prompts, direction=v, eta=0.0, nucleus="own", **kw)
        truth = {eta: exact.exact_entropy_at(model, tokenizer, prompts, direction=v, eta=eta, nucleus="own", **kw) - H0
                 for eta in etas}
        for seed in (7100, 7101):
            ids = torch.randint(0, len(examples), (256,), generator=torch.Generator().manual_seed(seed)).tolist()
            batch = rollout.rollout_shard(model, tokenizer, examples, ids, G=G, kind="E", shard_index=0,
                                          slots=range(len(ids)), seed=seed, rollout_batch_size=4096,
                                          gen_batch_size=4096, reward_fn=rewards.exact_match, **kw)
            events = snis_pass.snis_pass(model, v, batch, etas, pad_token_id=tokenizer.pad_token_id,
                                         temperature=temperature, top_p=top_p,
                                         tf_batch_size=4096)["own_nucleus_differs"].sum(-1)
            for j, eta in enumerate(etas):
                out, _ = fresh_pass.fresh_rollout_shard(model, tokenizer, batch, v, eta, slots=range(len(ids)),
                                                        seed=seed, gen_batch_size=4096, tf_batch_size=4096, **kw)
                row = reduce(out)
                if fresh.events_low(int(events[j]), top_p):
                    flagged += 1
                    continue
                unflagged.append((temperature, top_p, eta, (row["delta_h"] - truth[eta]) / row["se"]))
    assert flagged >= 4 and len(unflagged) >= 8, (flagged, unflagged)
    assert all(abs(z) <= 4 for *_, z in unflagged), unflagged
