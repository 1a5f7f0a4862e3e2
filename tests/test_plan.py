"""The batch plans (DESIGN §3): E and U prompt draws and their shard split, one plan per batch."""
from __future__ import annotations

import math

import pytest

from entropy_probe.plan import draw_prompts, plan_batch, shard_offset, split_shards

BASE = dict(dataset_size=400, seed=0, G=4, E_total_sequences=512, E_sampling_mode="replacement",
            B_U=32, E_num_shards=3, U_num_shards=2)


def plan(**changes):
    """Both batches' plans from one set of batch_config values (each plan sees all of them, so a
    plan that depended on the other side's keys would show it)."""
    settings = {**BASE, **changes}
    size = settings.pop("dataset_size")
    return {kind: plan_batch(kind, settings, size) for kind in ("E", "U")}


@pytest.mark.parametrize("E_total,G", [(512, 4), (513, 4), (16, 2), (7, 3), (5, 5)])
def test_number_of_e_prompts_is_ceil(E_total, G):
    p = plan(E_total_sequences=E_total, G=G, E_num_shards=1)
    assert len(p["E"]["prompt_ids"]) == math.ceil(E_total / G)


def test_replacement_mode_repeats_when_e_exceeds_the_dataset():
    p = plan(dataset_size=20, E_total_sequences=4 * 50, B_U=5)  # 50 prompts from 20
    ids = p["E"]["prompt_ids"]
    assert len(ids) == 50 and len(set(ids)) < len(ids)
    assert all(0 <= i < 20 for i in ids)
    assert p["E"]["sampling_mode"] == "replacement"


def test_replacement_mode_draws_uniformly():
    ids = draw_prompts("E", 40_000, 10, seed=3, replacement=True)
    counts = [ids.count(i) for i in range(10)]
    assert min(counts) > 3700 and max(counts) < 4300  # ±7.5 SD of Binomial(40000, 0.1)


def test_distinct_mode():
    p = plan(E_sampling_mode="distinct", E_total_sequences=4 * 100)
    ids = p["E"]["prompt_ids"]
    assert len(ids) == 100 == len(set(ids))
    full = plan(E_sampling_mode="distinct", E_total_sequences=4 * 400)
    assert sorted(full["E"]["prompt_ids"]) == list(range(400))
    with pytest.raises(ValueError, match="401"):
        plan(E_sampling_mode="distinct", E_total_sequences=4 * 401)


def test_u_prompts_are_distinct():
    for B_U in (1, 32, 400):
        ids = plan(B_U=B_U, U_num_shards=1)["U"]["prompt_ids"]
        assert len(ids) == B_U == len(set(ids))
        assert all(0 <= i < 400 for i in ids)
    with pytest.raises(ValueError):
        plan(B_U=401)


def test_e_and_u_are_independent_streams():
    a = plan(B_U=8)
    b = plan(B_U=64)
    assert a["E"] == b["E"]  # changing B_U does not change E
    c = plan(E_total_sequences=4 * 7, E_num_shards=1)
    assert c["U"] == plan()["U"]  # nor E's size U
    assert plan(E_sampling_mode="distinct")["U"] == plan()["U"]
    # and they are not the same stream
    d = plan(E_sampling_mode="distinct", E_total_sequences=4 * 32, B_U=32)
    assert d["E"]["prompt_ids"] != d["U"]["prompt_ids"]


def test_seed_fixes_the_plan():
    assert plan() == plan()
    other = plan(seed=1)
    assert other["E"]["prompt_ids"] != plan()["E"]["prompt_ids"]
    assert other["U"]["prompt_ids"] != plan()["U"]["prompt_ids"]


@pytest.mark.parametrize("n,k", [(10, 3), (128, 2), (7, 7), (5, 1), (33, 4)])
def test_shards_are_whole_contiguous_and_balanced(n, k):
    ids = list(range(100, 100 + n))
    shards = split_shards(ids, k)
    assert len(shards) == k
    assert [i for shard in shards for i in shard] == ids  # contiguous, in order, covering all
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert all(isinstance(i, int) for s in shards for i in s)


def test_plan_shards_cover_the_batches():
    p = plan(dataset_size=20, E_total_sequences=4 * 50, E_num_shards=3, B_U=11, U_num_shards=4)
    for kind, k in (("E", 3), ("U", 4)):
        shards = p[kind]["shards"]
        assert len(shards) == k
        assert [i for s in shards for i in s] == p[kind]["prompt_ids"]
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
        assert [shard_offset(p[kind], i) for i in range(k)] == [sum(sizes[:i]) for i in range(k)]


def test_plan_is_json_ready():
    import json

    p = plan()
    assert json.loads(json.dumps(p)) == p
