"""The prompt set of each split (rendered, tokenized, filtered by data.max_prompt_tokens) and the
plan of each batch, which draws prompt ids from its split's set. One job per split and per batch:
a change on the U side leaves the E side alone."""
from __future__ import annotations

from typing import Annotated

import logging

from .. import data, models, prompts as prompt_sets, shards
from ..plan import check_against_prepared, plan_batch
from ..stage import Arg, In, Out

log = logging.getLogger(__name__)


def prepare_data(cfg: dict, *, policy: Annotated[str, In("the policy directory or spec (its tokenizer)")],
                 split: Annotated[str, Arg("datasets split syntax, e.g. train or test[:500]")],
                 prompts: Annotated[str, Out("the prepared prompts, results/data/<split>.jsonl")],
                 report: Annotated[str, Out("their size, drops and hash, results/data/<split>.json")]) -> None:
    """The prompt set of one split: read (embedded set, local files or a hub dataset), every
    prompt rendered (template, chat template) and tokenized, every gold answer extracted, prompts
    longer than data.max_prompt_tokens dropped (and counted)."""
    data_cfg = cfg["data"]
    tokenizer = models.load_tokenizer(policy)
    rows = data.load_rows(data_cfg, split, policy)
    records, summary = prompt_sets.prepare_split(rows, data_cfg, tokenizer, split)
    blob, digest = prompt_sets.serialize_prepared(records)
    shards.write_bytes(prompts, blob)
    shards.write_json(report, summary | {"file": prompts, "sha256": digest, "source": data_cfg["source"]})
    log.info("split %r: %d prompts kept (%d dropped as longer than data.max_prompt_tokens)", split,
             summary["num_kept"], summary["num_dropped_too_long"])


def plan(cfg: dict, *, prepared: Annotated[str, In("the batch's prompt set, results/data/<split>.json")],
         kind: Annotated[str, Arg("the batch: E or U")],
         batch_plan: Annotated[str, Out("the batch's plan, results/plan/<kind>.json")]) -> None:
    """The plan of one batch: its prompt ids (line numbers of the prepared prompt file, whose name
    and hash it records), split into shards. Each batch has its own plan and random stream."""
    batch = cfg["batch_config"]
    prepared_set = shards.read_json(prepared)
    check_against_prepared(kind, batch, prepared_set)
    drawn = plan_batch(kind, batch, prepared_set["num_kept"])
    drawn["data"] = {key: prepared_set[key] for key in ("split", "file", "sha256")}
    shards.write_json(batch_plan, drawn)
    log.info("%s: %d prompts (%s, %d distinct) of %d from split %r, in %d shards", kind, len(drawn["prompt_ids"]),
             drawn["sampling_mode"], len(set(drawn["prompt_ids"])), drawn["dataset_size"], prepared_set["split"],
             len(drawn["shards"]))
