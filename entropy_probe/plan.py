"""The batch plan (DESIGN §3): the prompt indices of the E and the U batch and their shard split,
one file per batch, each fixed by the seed and its own random stream, so that a change on one
side leaves the other side's plan (and everything after it) untouched; and the checks of the
``batch_config`` sizes against each other and against the prompt sets.

Torch-free: the Snakefile checks the sizes while it parses."""
from __future__ import annotations

import math

import numpy as np

from .data import dataset_size
from .errors import ConfigError

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


def num_prompts(kind: str, batch: dict) -> int:
    """E: ceil(E_total_sequences / G) prompts; U: B_U."""
    return math.ceil(batch["E_total_sequences"] / batch["G"]) if kind == "E" else batch["B_U"]


def plan_batch(kind: str, batch: dict, dataset_size: int) -> dict:
    """The plan of one batch as a JSON-ready dict: its prompt ids (E: with replacement or
    distinct per ``E_sampling_mode``; U: distinct) and the ids of each shard. ``batch`` holds
    the ``batch_config`` keys of that side only."""
    mode = batch["E_sampling_mode"] if kind == "E" else "distinct"
    ids = draw_prompts(kind, num_prompts(kind, batch), dataset_size, batch["seed"], replacement=mode == "replacement")
    return {"kind": kind, "seed": batch["seed"], "sampling_mode": mode, "dataset_size": dataset_size,
            "prompt_ids": ids, "shards": split_shards(ids, batch[f"{kind}_num_shards"])}


def shard_offset(plan: dict, shard_index: int) -> int:
    """Position in the batch's prompt list of shard ``shard_index``'s first prompt."""
    return sum(len(s) for s in plan["shards"][:shard_index])


def shard_slots(plan: dict, shard_index: int) -> list[int]:
    """Global slots of the prompts of shard ``shard_index`` of a batch's plan: their positions in
    the batch's whole prompt list (shards are contiguous slices). The slot, not the shard, keys a
    response's sampling noise (:mod:`entropy_probe.noise`), so re-sharding changes no response."""
    offset, ids = shard_offset(plan, shard_index), plan["shards"][shard_index]
    if list(plan["prompt_ids"][offset:offset + len(ids)]) != list(ids):
        raise ValueError(f"plan shard {shard_index} is not the contiguous slice of the batch's prompt ids at {offset}")
    return list(range(offset, offset + len(ids)))


def check_config(config: dict) -> None:
    """The ``batch_config`` sizes: at least one prompt group, shards no more than prompts, and the
    distinct draws within the prompt sets where their size is known before any job
    (:func:`entropy_probe.data.dataset_size`; otherwise :func:`check_against_prepared`)."""
    batch = config["batch_config"]
    if batch["E_total_sequences"] < batch["G"]:
        raise ConfigError(f"batch_config.E_total_sequences: {batch['E_total_sequences']} is smaller than "
                          f"batch_config.G = {batch['G']} (one prompt group)")
    n_e = num_prompts("E", batch)
    u_size, e_size = dataset_size(config, "U"), dataset_size(config, "E")
    if u_size is not None and batch["B_U"] > u_size:
        raise ConfigError(f"batch_config.B_U: {batch['B_U']} distinct prompts > dataset size {u_size}")
    if e_size is not None and batch["E_sampling_mode"] == "distinct" and n_e > e_size:
        raise ConfigError(f"batch_config.E_total_sequences: distinct mode needs ceil({batch['E_total_sequences']}"
                          f"/{batch['G']}) = {n_e} prompts > dataset size {e_size}")
    if batch["E_num_shards"] > n_e:
        raise ConfigError(f"batch_config.E_num_shards: {batch['E_num_shards']} shards > {n_e} E prompts")
    if batch["U_num_shards"] > batch["B_U"]:
        raise ConfigError(f"batch_config.U_num_shards: {batch['U_num_shards']} shards > B_U = {batch['B_U']}")


def check_against_prepared(kind: str, batch: dict, prepared: dict) -> None:
    """B_U and the distinct E draw against the prepared (filtered) prompt set of the batch's split
    (``prepared``: the prepare_data stage's report)."""
    dropped = prepared.get("num_dropped_too_long", 0)
    where = (f"the {kind} prompt set (split {prepared['split']!r}) has {prepared['num_kept']} prompts"
             + (f" after data.max_prompt_tokens dropped {dropped}" if dropped else ""))
    needed = num_prompts(kind, batch)
    if kind == "U" and needed > prepared["num_kept"]:
        raise ConfigError(f"batch_config.B_U: {needed} distinct prompts, but {where}")
    if kind == "E" and batch["E_sampling_mode"] == "distinct" and needed > prepared["num_kept"]:
        raise ConfigError(f"batch_config.E_total_sequences: distinct mode needs {needed} prompts, but {where}")
