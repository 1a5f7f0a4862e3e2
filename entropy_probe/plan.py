"""The batch plan (DESIGN §3): prompt indices of the E and U batches and their shard split."""
from __future__ import annotations

import numpy as np

# Independent random streams for the two batches, both fixed by the one seed.
_STREAM = {"E": 0, "U": 1}


def draw_prompts(kind: str, num_prompts: int, dataset_size: int, seed: int, replacement: bool) -> list[int]:
    """Dataset indices of ``num_prompts`` prompts, drawn uniformly with or without replacement."""
    rng = np.random.default_rng([seed, _STREAM[kind]])
    if replacement:
        return rng.integers(0, dataset_size, size=num_prompts).tolist()
    if num_prompts > dataset_size:
        raise ValueError(f"{kind}: {num_prompts} distinct prompts requested from a dataset of {dataset_size}")
    return rng.choice(dataset_size, size=num_prompts, replace=False).tolist()


def split_shards(prompt_ids: list[int], num_shards: int) -> list[list[int]]:
    """Contiguous shards of whole prompt groups, sizes differing by at most one."""
    return [part.tolist() for part in np.array_split(np.asarray(prompt_ids, dtype=np.int64), num_shards)]


def shard_slots(batch: dict, shard_index: int) -> list[int]:
    """Global slots of the prompts of shard ``shard_index`` of one batch of the plan
    (``plan["E"]`` or ``plan["U"]``): their positions in the batch's whole prompt list. Shards are
    contiguous, so shard k holds slots offset .. offset + n_k − 1, offset = Σ_{j<k} n_j. The slot
    (not the shard) keys a response's sampling noise (:mod:`entropy_probe.noise`)."""
    shards = batch["shards"]
    offset = sum(len(s) for s in shards[:shard_index])
    ids = shards[shard_index]
    if list(batch["prompt_ids"][offset:offset + len(ids)]) != list(ids):
        raise ValueError(f"plan shard {shard_index} is not the contiguous slice of the batch's prompt ids at {offset}")
    return list(range(offset, offset + len(ids)))


def make_plan(
    *, dataset_size: int, seed: int, G: int, E_total_sequences: int, E_sampling_mode: str,
    B_U: int, E_num_shards: int, U_num_shards: int, U_dataset_size: int | None = None,
) -> dict:
    """The plan as a JSON-ready dict: per batch, the prompt ids and the ids of each shard.
    ``dataset_size`` is the size of the E batch's prompt set; ``U_dataset_size`` that of the U
    batch's when it comes from another split (default: the same set)."""
    u_size = dataset_size if U_dataset_size is None else U_dataset_size
    num_e = -(-E_total_sequences // G)
    e_ids = draw_prompts("E", num_e, dataset_size, seed, replacement=E_sampling_mode == "replacement")
    u_ids = draw_prompts("U", B_U, u_size, seed, replacement=False)
    return {
        "seed": seed,
        "G": G,
        "dataset_size": dataset_size,
        "E": {"sampling_mode": E_sampling_mode, "prompt_ids": e_ids, "shards": split_shards(e_ids, E_num_shards),
              "dataset_size": dataset_size},
        "U": {"sampling_mode": "distinct", "prompt_ids": u_ids, "shards": split_shards(u_ids, U_num_shards),
              "dataset_size": u_size},
    }
