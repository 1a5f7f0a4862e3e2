"""The coupled sampler (DESIGN §2 "Sampling measure q", §2b "coupled fresh rollouts").

Gumbel-max with counter-based noise: the draws are an exact sample from q (chi-square against
the enumerated q); the noise is a pure function of its key (seed, stream, slot, response,
position, token), distinct keys get distinct, uncorrelated noise with a uniform marginal; and a
response slot draws the same response whatever the chunk, call and shard layout.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy import stats

from entropy_probe import exact, generate, noise, rewards, toy
from entropy_probe.noise import STREAM_E, STREAM_U, NoiseKey
from entropy_probe.plan import plan_batch, shard_slots
from entropy_probe.rollout import rollout_shard

MAX_NEW = 3
ALPHA = 1e-3  # significance of the distribution tests (their seeds are fixed: each outcome is too)


# ----------------------------------------------------------------------------------- the generator

_M32 = 0xFFFFFFFF


def _mix_reference(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & _M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _uniform_reference(seed, stream, slot, response, position, token) -> float:
    """The key layout of entropy_probe/noise.py in plain Python integers."""
    a, b = 0x243F6A88, 0x85A308D3
    for field in (seed & _M32, seed >> 32, stream, slot & _M32, slot >> 32, response, position, token):
        a = _mix_reference(a ^ field)
        b = _mix_reference(b ^ a)
    m = ((a ^ b) << 20) | (b >> 12)
    return (2 * m + 1) / 2 ** 53  # exact in float64


KEYS = [  # (seed, stream, slot, response, position, token), extremes included
    (0, 0, 0, 0, 0, 0), (0, 1, 0, 0, 0, 0), (1, 0, 0, 0, 0, 0), (0, 0, 1, 0, 0, 0), (0, 0, 0, 1, 0, 0),
    (0, 0, 0, 0, 1, 0), (0, 0, 0, 0, 0, 1), (2 ** 64 - 1, 2 ** 32 - 1, 2 ** 62 + 3, 2 ** 32 - 1, 2 ** 32 - 1, 2 ** 32 - 1),
    (12345, 0, 1023, 7, 255, 151935), (2 ** 40 + 7, 1, 2 ** 40, 3, 17, 9),
]


def _key_noise(fn, keys):
    """fn (noise.uniform or noise.gumbel) of each key, one call per key: ``[len(keys)]``."""
    return torch.cat([fn(NoiseKey(seed, stream), torch.tensor([slot]), torch.tensor([response]), position,
                         torch.tensor([token])) for seed, stream, slot, response, position, token in keys])


def test_noise_matches_the_documented_key_layout():
    u = _key_noise(noise.uniform, KEYS)
    assert u.dtype == torch.float64
    assert u.tolist() == [_uniform_reference(*key) for key in KEYS]  # integer steps: bit-exact
    g = _key_noise(noise.gumbel, KEYS)
    torch.testing.assert_close(g, -torch.log(-torch.log(u)), rtol=1e-15, atol=0)
    mixed = noise.mix32(torch.tensor([0, 1, 2 ** 31, 2 ** 32 - 1, 123456789]))
    assert mixed.tolist() == [_mix_reference(x) for x in (0, 1, 2 ** 31, 2 ** 32 - 1, 123456789)]


def test_noise_is_a_pure_function_of_the_key():
    key, V, position = NoiseKey(7, STREAM_E), 1000, 5
    slots, responses = torch.tensor([5, 17, 3, 900, 5]), torch.tensor([0, 2, 1, 0, 3])
    dense = noise.gumbel_noise(key, slots, responses, position, V)
    assert dense.shape == (5, V) and dense.dtype == torch.float64
    assert torch.equal(dense, noise.gumbel_noise(key, slots, responses, position, V))  # repeated call
    for r in range(5):  # alone, or among other rows in another order
        assert torch.equal(noise.gumbel_noise(key, slots[r:r + 1], responses[r:r + 1], position, V)[0], dense[r])
    order = torch.tensor([3, 0, 4, 1, 2])
    others = torch.tensor([11, 12])
    mixed = noise.gumbel_noise(key, torch.cat([others, slots[order]]), torch.cat([others, responses[order]]),
                               position, V)
    assert torch.equal(mixed[2:], dense[order])
    # sparse entries, and reused buffers (with other content in between)
    rows, tokens = torch.tensor([0, 0, 3, 4, 1]), torch.tensor([0, 999, 17, 17, 500])
    sparse = noise.gumbel(key, slots[rows], responses[rows], position, tokens)
    torch.testing.assert_close(sparse, dense[rows, tokens], rtol=1e-15, atol=0)
    out, scratch = torch.empty(5, V, dtype=torch.float64), torch.empty(2 * 5 * V, dtype=torch.int64)
    args = (slots[:, None], responses[:, None], position, torch.arange(V)[None, :])
    noise.gumbel(NoiseKey(8, STREAM_U), *args, out=out, scratch=scratch)
    assert torch.equal(noise.gumbel(key, *args, out=out, scratch=scratch), dense)
    # the per-position state is the same whichever way it is reached
    state = noise.at_position(noise.slot_state(key, slots, responses), position)
    assert torch.equal(noise.gumbel_from_state((state[0][:, None], state[1][:, None]), torch.arange(V)[None]), dense)


def test_keys_that_differ_in_any_field_get_different_noise():
    base = (3, STREAM_E, 10, 1, 4, 77)
    variants = [base] + [tuple(v + 1 if i == j else v for j, v in enumerate(base)) for i in range(6)]
    assert len(set(_key_noise(noise.uniform, variants).tolist())) == len(variants)
    # bulk: 2 seeds x 2 streams x 32 slots x 4 responses x 4 positions x 2048 tokens, no repeated value
    values = []
    for seed in (0, 1):
        for stream in (STREAM_E, STREAM_U):
            slots = torch.arange(32).repeat_interleave(4)
            responses = torch.arange(4).repeat(32)
            for position in range(4):
                values.append(noise.uniform(NoiseKey(seed, stream), slots[:, None], responses[:, None], position,
                                            torch.arange(2048)[None]).flatten())
    values = torch.cat(values)
    assert values.numel() == 2 * 2 * 32 * 4 * 4 * 2048
    assert torch.unique(values).numel() == values.numel()


def test_noise_of_neighbouring_keys_is_uncorrelated():
    """Pearson correlation between noise matrices whose keys differ in one field (and between
    neighbouring tokens of a row) within 4.5 standard errors of 0."""
    R, V = 64, 2048
    slots, responses = torch.arange(R), torch.zeros(R, dtype=torch.long)

    def matrix(seed=0, stream=STREAM_E, slot_shift=0, response=0, position=0):
        return noise.gumbel_noise(NoiseKey(seed, stream), slots + slot_shift, responses + response, position, V)

    base = matrix()
    pairs = {
        "slot": matrix(slot_shift=1), "response": matrix(response=1), "position": matrix(position=1),
        "stream": matrix(stream=STREAM_U), "seed": matrix(seed=1),
    }
    pairs["token"] = torch.roll(base, 1, dims=1)
    bound = 4.5 / math.sqrt(R * V)
    for name, other in pairs.items():
        r = torch.corrcoef(torch.stack([base.flatten(), other.flatten()]))[0, 1]
        assert abs(r) < bound, (name, float(r))


def test_uniform_marginal_and_gumbel_moments():
    R, V = 256, 2048
    u = noise.uniform(NoiseKey(11, STREAM_E), torch.arange(R)[:, None], torch.zeros(R, 1, dtype=torch.long), 2,
                      torch.arange(V)[None]).flatten()
    assert (u > 0).all() and (u < 1).all()
    assert stats.kstest(u.numpy(), "uniform").pvalue > ALPHA
    # the low-order bits are uniform too (52 random bits, not 32): the fraction of u * 2^32
    low = torch.frac(u * 2.0 ** 32)
    assert stats.kstest(low.numpy(), "uniform").pvalue > ALPHA
    g = -torch.log(-torch.log(u))
    n = g.numel()
    assert abs(g.mean().item() - 0.5772156649) < 4.5 * math.sqrt(math.pi ** 2 / 6 / n)  # Euler's γ, Var π²/6
    assert abs(g.var().item() - math.pi ** 2 / 6) < 0.02


def test_noise_key_range_checks():
    with pytest.raises(ValueError):
        NoiseKey(-1, STREAM_E)
    with pytest.raises(ValueError):
        NoiseKey(2 ** 64, STREAM_E)
    with pytest.raises(ValueError):
        noise.gumbel_noise(NoiseKey(0, STREAM_E), torch.tensor([-1]), torch.tensor([0]), 0, 4)
    with pytest.raises(ValueError):
        noise.gumbel_noise(NoiseKey(0, STREAM_E), torch.tensor([0]), torch.tensor([0]), -1, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_is_the_same_on_cuda():
    key, V = NoiseKey(5, STREAM_U), 151936
    slots, responses = torch.arange(8) * 1000, torch.arange(8) % 3
    cpu_u = noise.uniform(key, slots[:, None], responses[:, None], 9, torch.arange(V)[None])
    cuda_u = noise.uniform(key, slots[:, None].cuda(), responses[:, None].cuda(), 9, torch.arange(V, device="cuda")[None])
    assert torch.equal(cpu_u, cuda_u.cpu())  # the integer steps are exact on both
    cpu_g = noise.gumbel_noise(key, slots, responses, 9, V)
    torch.testing.assert_close(noise.gumbel_noise(key, slots, responses, 9, V, device="cuda").cpu(), cpu_g,
                               rtol=1e-14, atol=1e-15)


# ------------------------------------------------------------------------- the logits processor


@pytest.mark.parametrize("nucleus_size", [1, 3, 40, 200])
def test_sparse_dense_and_blocked_noise_paths_agree(monkeypatch, nucleus_size):
    """The sampler adds noise only inside a small nucleus, or over blocks of rows of the whole
    vocabulary: the perturbed log q is the same (each entry's noise is a function of its key)."""
    R, V, position = 6, 200, 2
    gen = torch.Generator().manual_seed(nucleus_size)
    logits = torch.randn(R, V, generator=gen)
    top = logits.topk(nucleus_size, dim=-1).indices
    mask = torch.zeros(R, V, dtype=torch.bool).scatter_(1, top, True)
    lq = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), -1)
    slots, responses = torch.arange(R) + 40, torch.arange(R) % 2

    def perturbed():
        state = noise.at_position(noise.slot_state(NoiseKey(1, STREAM_E), slots, responses), position)
        return generate.perturbed_log_q(lq, mask, state, 0.5).clone()

    monkeypatch.setattr(generate, "_SPARSE_RATIO", 0)  # always dense
    dense = perturbed()
    monkeypatch.setattr(generate, "_NOISE_BLOCK_ELEMENTS", 2 * V + 1)  # blocks of 2 rows
    monkeypatch.setattr(generate, "_NOISE_BLOCK_ELEMENTS_CPU", 2 * V + 1)
    blocked = perturbed()
    monkeypatch.setattr(generate, "_SPARSE_RATIO", 10 ** 9)  # always sparse
    sparse = perturbed()
    expected = lq.double() + noise.gumbel_noise(NoiseKey(1, STREAM_E), slots, responses, position, V)
    for got in (dense, blocked, sparse):
        assert torch.equal(torch.isinf(got), ~mask)
        torch.testing.assert_close(got, expected, rtol=1e-15, atol=1e-15)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


# ------------------------------------------------------------------- exactness against enumeration


def _leaf_of(enum, tokens, lengths, prompt_of_row, vocab):
    """Index of the enumerated leaf of each sampled response (asserting it is one)."""
    def keys(prompt_index, lens, toks):
        key = prompt_index * (MAX_NEW + 1) + lens
        for k in range(MAX_NEW):
            key = key * vocab + toks[:, k]
        return key

    leaf_keys = keys(enum.prompt_index, enum.lengths, enum.tokens)
    order = torch.argsort(leaf_keys)
    sample_keys = keys(prompt_of_row, lengths, tokens)
    where = torch.searchsorted(leaf_keys[order], sample_keys).clamp(max=leaf_keys.shape[0] - 1)
    leaf = order[where]
    assert (leaf_keys[leaf] == sample_keys).all(), "a sampled response is not an enumerated leaf (q = 0)"
    return leaf


def _chi_square(counts, expected, min_expected=5.0):
    """Pearson's chi-square of counts against expected counts, cells with expected < min_expected
    merged into one; returns (statistic, degrees of freedom, p-value)."""
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    statistic = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return statistic, dof, float(stats.chi2.sf(statistic, dof))


def _richest_prompts(model, tokenizer, count: int, draws: int, min_expected: float = 5.0) -> list[str]:
    """The ``count`` prompts of the embedded set whose responses under τ = 0.7, top_p = 0.8 give
    the most chi-square degrees of freedom at ``draws`` draws (cells below ``min_expected`` merged)."""
    prompts = [e["prompt"] for e in toy.arithmetic_examples(19)]
    with torch.no_grad():
        enum = exact.enumerate_responses(model, tokenizer, prompts, temperature=0.7, top_p=0.8,
                                         max_new_tokens=MAX_NEW)
    expected = draws * enum.q.detach()
    big = torch.bincount(enum.prompt_index, weights=(expected >= min_expected).double(), minlength=len(prompts))
    rest = torch.bincount(enum.prompt_index, weights=torch.where(expected < min_expected, expected, 0.0),
                          minlength=len(prompts))
    dof = big + (rest > 0).double() - 1
    return [prompts[i] for i in sorted(range(len(prompts)), key=lambda i: (-float(dof[i]), i))[:count]]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_gumbel_max_draws_are_exact_samples_from_q(toy_model, temperature, top_p):
    """20,480 responses (4 prompts x 1,280 slots x G = 4): the response frequencies match the
    enumerated q (chi-square per prompt and pooled, rare cells merged), and so do the recorded
    log q and S. The prompts are those with the most chi-square cells in the tight nucleus of
    τ = 0.7, top_p = 0.8 (chosen from the trained policy, whose training rounds differently on
    different CPUs)."""
    model, tokenizer = toy_model
    slots_per_prompt, G = 1280, 4
    prompts = _richest_prompts(model, tokenizer, 4, slots_per_prompt * G)
    with torch.no_grad():
        enum = exact.enumerate_responses(model, tokenizer, prompts, temperature=temperature, top_p=top_p,
                                         max_new_tokens=MAX_NEW)
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    rollouts = generate.sample(
        model, encoded["input_ids"].repeat_interleave(slots_per_prompt, 0),
        encoded["attention_mask"].repeat_interleave(slots_per_prompt, 0), G, temperature=temperature,
        top_p=top_p, max_new_tokens=MAX_NEW, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, noise_key=NoiseKey(2024, STREAM_E),
        slots=range(len(prompts) * slots_per_prompt),
    )
    n = slots_per_prompt * G
    tokens = torch.nn.functional.pad(rollouts.response_tokens, (0, MAX_NEW - rollouts.response_tokens.shape[1]),
                                     value=tokenizer.pad_token_id)
    prompt_of_row = torch.arange(len(prompts)).repeat_interleave(n)
    leaf = _leaf_of(enum, tokens, rollouts.response_lens, prompt_of_row, len(tokenizer))
    torch.testing.assert_close(rollouts.token_log_q.double().sum(1), enum.log_q[leaf], atol=1e-4, rtol=0)
    torch.testing.assert_close(rollouts.entropies.double().sum(1), enum.entropy_sum[leaf], atol=1e-4, rtol=0)
    counts = torch.bincount(leaf, minlength=enum.q.shape[0]).double()
    pooled, pooled_dof = 0.0, 0
    for b in range(len(prompts)):
        mine = enum.prompt_index == b
        statistic, dof, p = _chi_square(counts[mine], n * enum.q[mine].detach())
        assert dof >= 2 and p > ALPHA, (prompts[b], statistic, dof, p)
        pooled, pooled_dof = pooled + statistic, pooled_dof + dof
    assert pooled_dof >= 10 and stats.chi2.sf(pooled, pooled_dof) > ALPHA, (pooled, pooled_dof)
    if top_p < 1.0:  # power: the same draws reject the untruncated, untempered measure π
        with torch.no_grad():
            full = exact.enumerate_responses(model, tokenizer, prompts, temperature=1.0, top_p=1.0,
                                             max_new_tokens=MAX_NEW)
        full_counts = torch.bincount(_leaf_of(full, tokens, rollouts.response_lens, prompt_of_row, len(tokenizer)),
                                     minlength=full.q.shape[0]).double()
        mine = full.prompt_index == 0
        assert _chi_square(full_counts[mine], n * full.q[mine])[2] < ALPHA


# -------------------------------------------------------------- layout invariance and coupling


@pytest.fixture(scope="module")
def examples():
    return toy.arithmetic_examples(19)  # the embedded prompt set, in its file order


LAYOUT_G = 3
PLAN_ARGS = dict(seed=0, G=LAYOUT_G, E_total_sequences=24 * LAYOUT_G, E_sampling_mode="replacement")


def make_plan(E_num_shards: int) -> dict:
    return {"E": plan_batch("E", PLAN_ARGS | {"E_num_shards": E_num_shards}, 400)}


def _shards(toy_model, examples, *, num_shards, rollout_batch_size, gen_batch_size, temperature, top_p):
    """The whole E batch of the plan, generated shard by shard with the plan's slots, as a list of
    per-slot records (response tokens, log q, entropies, reward, stop reason)."""
    model, tokenizer = toy_model
    plan = make_plan(num_shards)
    records = []
    for k, ids in enumerate(plan["E"]["shards"]):
        t = rollout_shard(
            model, tokenizer, examples, ids, G=LAYOUT_G, kind="E", shard_index=k, slots=shard_slots(plan["E"], k),
            seed=3, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW,
            rollout_batch_size=rollout_batch_size, gen_batch_size=gen_batch_size,
            reward_fn=rewards.get_reward("exact_match"),
        )
        T = t["token_log_q"].shape[-1]
        for b in range(len(ids)):
            for g in range(LAYOUT_G):
                n = int(t["response_lens"][b, g])
                records.append((t["sequences"][b, g, -T:][:n], t["token_log_q"][b, g, :n], t["rb_entropies"][b, g, :n],
                                float(t["rewards"][b, g]), int(t["stop_reason"][b, g])))
    assert len(records) == 24 * LAYOUT_G
    return records


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.9), (0.7, 0.8)])
def test_a_slot_draws_the_same_response_whatever_the_layout(toy_model, examples, temperature, top_p):
    settings = dict(temperature=temperature, top_p=top_p)
    reference = _shards(toy_model, examples, num_shards=1, rollout_batch_size=24, gen_batch_size=1000, **settings)
    layouts = [dict(num_shards=1, rollout_batch_size=5, gen_batch_size=7),
               dict(num_shards=3, rollout_batch_size=1, gen_batch_size=3),
               dict(num_shards=5, rollout_batch_size=4, gen_batch_size=1)]  # gen_batch_size < G: one prompt per call
    for layout in layouts:
        records = _shards(toy_model, examples, **layout, **settings)
        for (tokens, lq, h, reward, reason), (ref_tokens, ref_lq, ref_h, ref_reward, ref_reason) in zip(records, reference):
            assert torch.equal(tokens, ref_tokens), layout
            assert (reward, reason) == (ref_reward, ref_reason)
            # float rounding only: the logits of a row change in the last bits with its padding
            torch.testing.assert_close(lq, ref_lq, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)
    distinct = {tuple(r[0].tolist()) for r in reference}
    assert len(distinct) > 5, "the layouts agree trivially: too few distinct responses"


def test_plan_slots_are_the_batch_positions_of_each_shard():
    plan = make_plan(5)
    slots = [shard_slots(plan["E"], k) for k in range(5)]
    assert sum(slots, []) == list(range(24))
    for k, ids in enumerate(plan["E"]["shards"]):
        assert [plan["E"]["prompt_ids"][s] for s in slots[k]] == ids
    with pytest.raises(ValueError):  # shards that are not contiguous slices of the batch
        shard_slots({"prompt_ids": [1, 2, 3, 4], "shards": [[1], [3, 4]]}, 1)


def test_same_noise_couples_draws_at_nearby_parameters(toy_model):
    """The point of the coupling: redrawn at slightly moved parameters with the same noise, almost
    every response is the same; with independent noise only about Σ q² of them would be."""
    model, tokenizer = toy_model
    moved = copy.deepcopy(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in moved.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen))
    encoded = tokenizer(["3+5=", "12+7=", "9+9=", "0+0="], padding=True, return_tensors="pt")
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=MAX_NEW, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, slots=range(4))

    def draws(m, seed):
        r = generate.sample(m, encoded["input_ids"], encoded["attention_mask"], 256, noise_key=NoiseKey(seed, STREAM_E), **kw)
        return [tuple(row[:n].tolist()) for row, n in zip(r.response_tokens, r.response_lens)]

    base = draws(model, 0)
    same = sum(a == b for a, b in zip(base, draws(moved, 0))) / len(base)
    independent = sum(a == b for a, b in zip(base, draws(moved, 1))) / len(base)
    assert same > 0.95 and independent < 0.8, (same, independent)
