"""Fresh rollouts by verification (entropy_probe/verify.py) are the sample that regenerating every
response token by token draws: on the embedded policy (answers of up to 3 tokens with EOS, two
samplers, stop strings) and on a mid-size random Llama (V = 2048, 40-token responses, the dense
noise of top_p = 1 and the nucleus noise of top_p = 0.9), the same tokens, lengths and stop
reasons, and the same sampling-time entropies and log q to float tolerance, for every η of the
default sweep and two much larger η. A float near-tie between the teacher-forced and the
incremental logits would show as a different token: none is expected, none is allowed. Only the
diverged suffixes are generated one by one: fewer tokens than regeneration at the smallest η,
never more. The workflow records that cost per η and shard.
"""
from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO

from entropy_probe import fresh_pass, rewards, rollout, shards
from entropy_probe.toy import build_tokenizer
from toy_batches import G, MAX_NEW_TOKENS, PROMPTS, direction

DEFAULT_ETAS = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["estimator"]["eta_list"]
LARGE_ETAS = [0.1, 0.3]  # along toy_batches.direction: most responses change
PER_TOKEN = ("token_log_q", "rb_entropies", "tempered_entropies")


def e_batch(model, tokenizer, prompts, *, temperature, top_p, max_new_tokens, num_prompts, stop_strings=()):
    ids = torch.randint(0, len(prompts), (num_prompts,), generator=torch.Generator().manual_seed(0)).tolist()
    return rollout.rollout_shard(
        model, tokenizer, prompts, ids, G=G, kind="E", shard_index=0, slots=range(num_prompts), seed=0,
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, rollout_batch_size=1024,
        gen_batch_size=4096, reward_fn=rewards.exact_match, stop_strings=stop_strings)


def both_ways(model, tokenizer, batch, u, eta, **sampling):
    """(verified, regenerated), each (fresh-rollout tensors, cost)."""
    return tuple(fresh_pass.fresh_rollout_shard(model, tokenizer, batch, u, eta, slots=range(batch["prompt_ids"].numel()),
                                                seed=0, gen_batch_size=4096, method=method, **sampling)
                 for method in ("verification", "regeneration"))


def assert_same_sample(verified, regenerated, where):
    for name in ("response_tokens", "response_lens", "stop_reason", "changed"):
        assert torch.equal(verified[name], regenerated[name]), (where, name)
    for name in PER_TOKEN:
        torch.testing.assert_close(verified[name], regenerated[name], rtol=0, atol=2e-5, msg=lambda m: f"{where} {name}: {m}")


def check_cost(v_cost, r_cost, batch, where):
    assert v_cost["teacher_forced_tokens"] == int(batch["response_lens"].sum()), where
    assert r_cost["teacher_forced_tokens"] == 0 and r_cost["generated_tokens"] == r_cost["regeneration_tokens"], where
    assert v_cost["regeneration_tokens"] == r_cost["regeneration_tokens"], where
    assert v_cost["generated_tokens"] <= r_cost["generated_tokens"], where


@pytest.mark.parametrize("temperature,top_p,stop_strings", [(1.0, 0.95, ()), (0.7, 0.8, ("1",)), (1.0, 1.0, ())])
def test_verification_draws_what_regeneration_draws_on_the_embedded_policy(toy_model, temperature, top_p, stop_strings):
    model, tokenizer = toy_model
    batch = e_batch(model, tokenizer, PROMPTS, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS,
                    num_prompts=96, stop_strings=stop_strings)
    u = direction(model)
    changed = {}
    for eta in DEFAULT_ETAS + LARGE_ETAS:
        (verified, v_cost), (regenerated, r_cost) = both_ways(
            model, tokenizer, batch, u, eta, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS,
            stop_strings=stop_strings)
        assert_same_sample(verified, regenerated, eta)
        check_cost(v_cost, r_cost, batch, eta)
        changed[eta] = int(verified["changed"].sum())
        if eta == min(DEFAULT_ETAS):
            assert v_cost["generated_tokens"] < r_cost["generated_tokens"] / 10, (eta, v_cost, r_cost)
    # the sweep covers both regimes: nothing moves at the smallest η, most responses at the largest
    assert changed[min(DEFAULT_ETAS)] <= 2 and changed[max(LARGE_ETAS)] > verified["changed"].numel() / 2, changed
    if stop_strings:  # the stop strings end responses, also where a response changed
        assert (batch["stop_reason"] == 1).any() and (verified["stop_reason"] == 1).any()


@pytest.fixture(scope="module")
def random_llama():
    """A random Llama, V = 2048, with logits scaled to a per-token entropy of about two nats, so
    that responses run to their 40 tokens (EOS has probability ~1/V)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    gen = torch.Generator().manual_seed(1)
    u = {k: 0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in model.named_parameters()}
    return model, tokenizer, u


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_verification_draws_what_regeneration_draws_on_long_responses(random_llama, top_p):
    model, tokenizer, u = random_llama
    prompts = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    batch = e_batch(model, tokenizer, prompts, temperature=1.0, top_p=top_p, max_new_tokens=40, num_prompts=12)
    assert int(batch["response_lens"].min()) >= 32
    fractions = {}
    for eta in [DEFAULT_ETAS[0], DEFAULT_ETAS[2], DEFAULT_ETAS[-1], 3e-2, 1.0]:
        (verified, v_cost), (regenerated, r_cost) = both_ways(model, tokenizer, batch, u, eta, temperature=1.0,
                                                              top_p=top_p, max_new_tokens=40)
        assert_same_sample(verified, regenerated, eta)
        check_cost(v_cost, r_cost, batch, eta)
        fractions[eta] = v_cost["generated_tokens"] / r_cost["generated_tokens"]
    assert fractions[DEFAULT_ETAS[0]] < 0.05 and fractions[1.0] > 0.5, fractions


def test_the_workflow_records_the_cost_of_each_eta(default_run):
    """Each fresh-rollout shard's header and each row of delta_h_sampler.json carry the tokens the
    verification teacher-forced and generated, against what regeneration would generate."""
    results = default_run / "results"
    report = shards.read_json(results / "delta_h_sampler.json")
    e_tokens = sum(int(shards.read_shard(p)[0]["response_lens"].sum())
                   for p in sorted((results / "rollouts" / "E").glob("shard_*.safetensors")))
    for row in report["rows"]:
        cost = row["cost"]
        assert cost["method"] == "verification" and cost["teacher_forced_tokens"] == e_tokens, row
        assert 0 <= cost["generated_tokens"] <= cost["regeneration_tokens"], row
    smallest = min(report["rows"], key=lambda r: r["eta"])["cost"]
    assert smallest["generated_tokens"] < smallest["regeneration_tokens"] / 10, smallest
    [path, *_] = sorted((results / "fresh").glob("eta_*/shard_*.safetensors"))
    header = shards.read_shard(path)[1]
    assert set(header["cost"]) >= {"teacher_forced_tokens", "generated_tokens", "regeneration_tokens", "seconds"}


@pytest.mark.parametrize("temperature,top_p,stop_strings", [(1.0, 0.95, ()), (0.7, 0.8, ("1",))])
def test_a_checkpoints_e_shard_by_verification_is_the_one_it_would_draw(toy_model, temperature, top_p, stop_strings):
    """In a trajectory the E shard at checkpoint t+1 is drawn from checkpoint t's by verification:
    the shard rollout_shard draws at t+1 (same slots, same noise), token for token, with the same
    rewards, stop reasons and prompt layout, and its sampling-time values to float tolerance."""
    import copy

    model, tokenizer = toy_model
    sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS, stop_strings=stop_strings)
    before = e_batch(model, tokenizer, PROMPTS, num_prompts=96, **sampling)
    u = direction(model)
    for eta in (1e-3, 3e-2):  # a small step (few responses change) and a large one
        after = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in after.named_parameters():
                p.add_(eta * u[name].to(p.dtype))
        drawn = e_batch(after, tokenizer, PROMPTS, num_prompts=96, **sampling)
        verified, cost = fresh_pass.verified_rollout_shard(
            after, tokenizer, before, PROMPTS, reward_fn=rewards.exact_match, slots=range(96), seed=0,
            gen_batch_size=4096, tf_batch_size=64, **sampling)
        assert verified.keys() == drawn.keys()
        for name, value in drawn.items():
            if name in ("token_log_q", "rb_entropies", "tempered_entropies"):
                torch.testing.assert_close(verified[name], value, rtol=0, atol=2e-5)
            else:
                assert torch.equal(verified[name], value), (eta, name)
        changed = int((verified["sequences"] != before["sequences"]).any(-1).sum())
        assert cost["generated_tokens"] <= cost["regeneration_tokens"], cost
        print(f"η {eta}: {changed} of {96 * G} responses changed; generated {cost['generated_tokens']} of "
              f"{cost['regeneration_tokens']}")
        assert 0 < changed < 96 * G
