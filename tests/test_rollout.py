"""Rollout shards (DESIGN §2 "Sampling measure q", §3): shapes, rewards, noise keys, and
the log q / RB entropies recorded at sampling time against an independent teacher-forced pass."""
from __future__ import annotations

import pytest
import torch

from entropy_probe import measure, rewards, toy
from entropy_probe.stopping import response_lengths
from entropy_probe.plan import plan_batch
from entropy_probe.rollout import check_shapes, rollout_shard

# A small smoke test: E_total_sequences = 16, B_U = 8, G = 2.
SMOKE = dict(seed=0, G=2, E_total_sequences=16, E_sampling_mode="replacement", B_U=8, E_num_shards=1, U_num_shards=1)
PLAN = {kind: plan_batch(kind, SMOKE, 400) for kind in ("E", "U")}


@pytest.fixture(scope="module")
def examples():
    return toy.arithmetic_examples(19)  # the embedded prompt set, in its file order


def _rollout(toy_model, examples, *, kind="E", ids=None, slots=None, G=2, seed=0, temperature=1.0, top_p=0.95,
             rollout_batch_size=4, gen_batch_size=4, max_new_tokens=3):
    """One shard, generated in several chunks and several generate calls per chunk (2 prompts
    per call), so padding and re-assembly are exercised too. Slots default to 0 .. B-1."""
    model, tokenizer = toy_model
    ids = PLAN[kind]["prompt_ids"] if ids is None else ids
    return rollout_shard(
        model, tokenizer, examples, ids, G=G, kind=kind, shard_index=0,
        slots=range(len(ids)) if slots is None else slots, seed=seed, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        rollout_batch_size=rollout_batch_size, gen_batch_size=gen_batch_size,
        reward_fn=rewards.get_reward("exact_match"),
    )


@pytest.fixture(scope="module")
def shards(toy_model, examples):
    """Smoke shards, generated once: {kind: tensors}."""
    return {kind: _rollout(toy_model, examples, kind=kind) for kind in ("E", "U")}


def teacher_force(model, tensors, temperature, top_p):
    """Independent recomputation: one batched forward of the full sequences (positions counted
    from the first real token), then measure.score_tokens on the response columns.
    Returns (token_log_q, entropy, in_nucleus, logits_of_responses), each ``[B*G, T, ...]``."""
    B, G, L = tensors["sequences"].shape
    T = tensors["token_log_q"].shape[-1]
    P = L - T
    ids = tensors["sequences"].reshape(B * G, L)
    mask = tensors["attention_masks"].reshape(B * G, L)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    response_logits = logits[:, P - 1:L - 1]  # z_k scores y_k: the logits one step before it
    lq, h, inside = measure.score_tokens(response_logits, ids[:, P:], temperature, top_p)
    return lq, h, inside, response_logits


def valid_mask(tensors):
    T = tensors["token_log_q"].shape[-1]
    return torch.arange(T)[None, :] < tensors["response_lens"].reshape(-1, 1)


@pytest.mark.parametrize("kind", ["E", "U"])
def test_smoke_shapes(shards, toy_model, examples, kind):
    t = shards[kind]
    B, G = 8, 2  # E: ceil(16 / 2) prompts; U: B_U = 8
    assert check_shapes(t)[:2] == (B, G)
    _, _, L = t["sequences"].shape
    T = t["token_log_q"].shape[-1]
    P = L - T
    assert t["attention_masks"].shape == (B, G, L)
    assert t["rewards"].shape == t["response_lens"].shape == (B, G)
    assert len(t["prompt_lens"]) == len(t["max_lengths"]) == B
    assert t["rb_entropies"].shape == t["token_log_q"].shape == (B, G, T)
    assert 1 <= T <= 3
    assert t["prompt_ids"].tolist() == PLAN[kind]["prompt_ids"]
    assert torch.equal(t["max_lengths"], t["response_lens"].max(-1).values)
    assert t["sequences"].dtype == torch.int64 and t["token_log_q"].dtype == torch.float32
    # prompts: left-padded, the same for every response of a group, matching the tokenizer
    tokenizer = toy_model[1]
    pad = tokenizer.pad_token_id
    for b, pid in enumerate(PLAN[kind]["prompt_ids"]):
        expected = tokenizer(examples[pid]["prompt"])["input_ids"]
        assert t["prompt_lens"][b] == len(expected)
        for g in range(G):
            row, m = t["sequences"][b, g], t["attention_masks"][b, g]
            assert row[P - len(expected):P].tolist() == expected
            assert m[:P].tolist() == [0] * (P - len(expected)) + [1] * len(expected)
            assert (row[:P - len(expected)] == pad).all()
            n = t["response_lens"][b, g]
            assert m[P:].tolist() == [1] * n + [0] * (T - n)
            assert (row[P + n:] == pad).all()
    # zero past the end of each response
    past = ~valid_mask(t).view(B, G, T)
    assert (t["token_log_q"][past] == 0).all() and (t["rb_entropies"][past] == 0).all()


def test_rewards_are_exact_match_and_vary_within_some_groups(shards, toy_model, examples):
    tokenizer = toy_model[1]
    for kind, t in shards.items():
        B, G, L = t["sequences"].shape
        P = L - t["token_log_q"].shape[-1]
        for b, pid in enumerate(PLAN[kind]["prompt_ids"]):
            for g in range(G):
                # the response without its final EOS; a sampled pad is a real token and stays
                end = int(t["response_lens"][b, g] - t["stopped_at_eos"][b, g].long())
                text = tokenizer.decode(t["sequences"][b, g, P:P + end], skip_special_tokens=False)
                assert t["rewards"][b, g] == float(text == examples[pid]["answer"])
        varying = (t["rewards"] != t["rewards"][:, :1]).any(-1)
        assert varying.any(), f"{kind}: no group with varying rewards"
        assert set(t["rewards"].unique().tolist()) == {0.0, 1.0}


def test_same_seed_same_tensors_different_seed_different(toy_model, examples, shards):
    again = _rollout(toy_model, examples, kind="E")
    assert again.keys() == shards["E"].keys()
    for name, tensor in shards["E"].items():
        assert torch.equal(again[name], tensor), name
    other = _rollout(toy_model, examples, kind="E", seed=1)
    assert not torch.equal(other["token_log_q"], shards["E"]["token_log_q"])
    assert other["prompt_ids"].tolist() == shards["E"]["prompt_ids"].tolist()
    # E and U streams draw apart: same prompts and slots, different samples
    as_u = _rollout(toy_model, examples, kind="U", ids=PLAN["E"]["prompt_ids"])
    assert not torch.equal(as_u["token_log_q"], shards["E"]["token_log_q"])
    # so do other slots of the same prompts
    shifted = _rollout(toy_model, examples, kind="E", slots=range(100, 100 + len(PLAN["E"]["prompt_ids"])))
    assert not torch.equal(shifted["token_log_q"], shards["E"]["token_log_q"])


def test_response_lens_from_first_eos(shards, toy_model):
    eos = toy_model[1].eos_token_id
    for t in shards.values():
        B, G, L = t["sequences"].shape
        T = t["token_log_q"].shape[-1]
        responses = t["sequences"][:, :, L - T:].reshape(B * G, T)
        for row, n, stopped in zip(responses.tolist(), t["response_lens"].flatten().tolist(),
                                   t["stopped_at_eos"].flatten().tolist()):
            if eos in row:
                assert stopped and n == row.index(eos) + 1
            else:
                assert not stopped and n == T


def test_response_lengths_never_use_pad_ids():
    eos = pad = 7  # pad and EOS are the same id, as in many real tokenizers
    tokens = torch.tensor([[3, 4, eos, pad, pad], [eos, pad, pad, pad, pad], [1, 2, 3, 4, 5], [2, eos, 2, eos, pad]])
    lens, stopped = response_lengths(tokens, eos)
    assert lens.tolist() == [3, 1, 5, 2]
    assert stopped.tolist() == [True, True, False, True]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampling_time_log_q_and_entropies_match_teacher_forcing(toy_model, examples, temperature, top_p):
    """The key invariant: what the sampler recorded is what teacher forcing recomputes."""
    t = _rollout(toy_model, examples, kind="E", temperature=temperature, top_p=top_p)
    lq, h, inside, _ = teacher_force(toy_model[0], t, temperature, top_p)
    valid = valid_mask(t)
    stored_lq = t["token_log_q"].reshape(valid.shape)
    stored_h = t["rb_entropies"].reshape(valid.shape)
    assert inside[valid].all(), "a sampled token lies outside its recomputed nucleus"
    torch.testing.assert_close(stored_lq[valid], lq[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored_h[valid], h[valid], atol=1e-5, rtol=1e-5)
    # the EOS tokens are scored too
    eos_positions = valid & (t["sequences"][:, :, -valid.shape[1]:].reshape(valid.shape) == toy_model[1].eos_token_id)
    assert eos_positions.sum() == t["stopped_at_eos"].sum() > 0
    torch.testing.assert_close(stored_lq[eos_positions], lq[eos_positions], atol=1e-5, rtol=1e-5)
    assert (stored_h[valid] > 0).any()
    if top_p == 1.0 and temperature == 1.0:  # q is the model distribution
        _, _, _, logits = teacher_force(toy_model[0], t, temperature, top_p)
        tokens = t["sequences"][:, :, -valid.shape[1]:].reshape(valid.shape)
        pi = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
        torch.testing.assert_close(stored_lq[valid], pi[valid], atol=1e-5, rtol=1e-5)


def test_tokens_outside_the_nucleus_are_never_sampled(toy_model, examples):
    """top_p = 0.5 at a high temperature: many plausible tokens are cut. Had the sampler ignored
    the nucleus, the expected number of sampled tokens outside it would be the summed excluded
    mass (asserted large below); none is found."""
    temperature, top_p = 1.5, 0.5
    ids = list(range(0, 400, 10))  # 40 prompts x 4 responses
    t = _rollout(toy_model, examples, kind="E", ids=ids, G=4, temperature=temperature, top_p=top_p,
                 rollout_batch_size=20, gen_batch_size=80)
    lq, _, inside, logits = teacher_force(toy_model[0], t, temperature, top_p)
    valid = valid_mask(t)
    assert inside[valid].all()
    assert torch.isfinite(t["token_log_q"].reshape(valid.shape)[valid]).all()
    p = torch.softmax(logits.double() / temperature, -1)
    mask = measure.nucleus_mask(logits, temperature, top_p)
    excluded_mass = (p * ~mask).sum(-1)[valid]
    assert excluded_mass.sum() > 20, "the test's nucleus cuts too little to detect a broken sampler"
    torch.testing.assert_close(t["token_log_q"].reshape(valid.shape)[valid], lq[valid], atol=1e-5, rtol=1e-5)


def test_checkpoint_generation_config_does_not_change_q(toy_model, examples, shards):
    """Settings in a checkpoint's generation_config.json (as real instruct models ship them) must
    not reach the sampler: it samples from q with the configured τ and top_p only."""
    model = toy_model[0]
    saved = model.generation_config.to_dict()
    for key, value in dict(repetition_penalty=3.0, min_p=0.3, min_new_tokens=3, top_k=2, temperature=0.3,
                           top_p=0.5, no_repeat_ngram_size=1).items():
        setattr(model.generation_config, key, value)
    try:
        t = _rollout(toy_model, examples, kind="E")
    finally:
        model.generation_config = type(model.generation_config).from_dict(saved)
    for name, tensor in shards["E"].items():
        assert torch.equal(t[name], tensor), name


def test_inspector_summarizes_a_written_shard(shards, toy_model, tmp_path):
    from entropy_probe.shard_report import rollout_statistics, summarize_shard
    from entropy_probe.shards import write_shard

    t = shards["E"]
    path = tmp_path / "shard.safetensors"
    write_shard(path, t, {"batch_kind": "E", "shard_index": 0})
    stats = rollout_statistics(t)
    lens = t["response_lens"].double()
    assert stats["mean_rb_entropy_per_token"] == pytest.approx(t["rb_entropies"].double().sum().item() / lens.sum().item())
    assert stats["mean_log_q_per_token"] == pytest.approx(t["token_log_q"].double().sum().item() / lens.sum().item())
    assert stats["mean_log_q_per_token"] < 0 < stats["mean_rb_entropy_per_token"]
    assert stats["eos_stop_share"] == t["stopped_at_eos"].double().mean().item()
    varying = (t["rewards"] != t["rewards"][:, :1]).any(-1).double().mean().item()
    assert stats["varying_reward_group_share"] == varying > 0
    raw = summarize_shard(path, None, n_examples=3)  # no tokenizer: raw token ids
    B, G, L = t["sequences"].shape
    P = L - t["token_log_q"].shape[-1]
    first = t["sequences"][0, 0, P:P + t["response_lens"][0, 0]].tolist()
    assert f"response 0: {first}" in raw
    assert "batch_kind: E" in raw and "sequences" in raw and str(list(t["sequences"].shape)) in raw
    assert len([line for line in raw.splitlines() if line.strip().startswith("response ")]) == 3
    decoded = summarize_shard(path, toy_model[1], n_examples=2)
    assert repr(toy_model[1].decode(first, skip_special_tokens=False)) in decoded and "<eos>" in decoded
    # with the legends the rollout stage writes: stop reasons and reward outcomes by name
    from entropy_probe import rewards, stopping

    legends = {"stop_reasons": {str(k): v for k, v in stopping.STOP_REASONS.items()},
               "reward": {"name": "exact_match", "codes": rewards.legend()}}
    write_shard(path, t, {"batch_kind": "E", "shard_index": 0} | legends)
    stats = rollout_statistics(t, legends)
    assert stats["stop_share/eos"] == t["stopped_at_eos"].double().mean().item()
    assert sum(v for k, v in stats.items() if k.startswith("stop_share/")) == pytest.approx(1.0)
    assert stats["reward_outcome_share/pass"] == (t["reward_codes"] == rewards.PASS).double().mean().item()
    assert stats["reward_outcome_share/pass"] == pytest.approx(t["rewards"].double().mean().item())  # exact match: 1 iff pass
    named = summarize_shard(path, None, n_examples=G)
    first_stop = stopping.STOP_REASONS[int(t["stop_reason"][0, 0])]
    first_outcome = rewards.OUTCOMES[int(t["reward_codes"][0, 0])]
    assert f"stop: {first_stop}" in named and f"({first_outcome})" in named
    assert "stop_share/eos:" in named and "reward_outcome_share/pass:" in named
