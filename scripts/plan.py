"""Stage: the plan of one batch (E or U): its prompt ids, split into shards, written as JSON. Prompt
ids are line numbers of the batch's prepared prompt file (prepare_data); the plan records which
file and its hash. Each batch has its own plan file and random stream, so a change of one batch's
keys leaves the other batch's plan untouched.

By hand:  python scripts/plan.py CONFIG.yaml {E,U} PREPARED_SPLIT.json OUT.json
"""
import logging

from entropy_probe.config import ConfigError
from entropy_probe.plan import num_prompts, plan_batch
from entropy_probe.shards import read_json, write_json
from entropy_probe.stage import run_stage


def check_size(kind: str, batch: dict, prepared: dict) -> None:
    """B_U and the distinct E draw against the prepared (filtered) prompt set."""
    dropped = prepared.get("num_dropped_too_long", 0)
    where = (f"the {kind} prompt set (split {prepared['split']!r}) has {prepared['num_kept']} prompts"
             + (f" after data.max_prompt_tokens dropped {dropped}" if dropped else ""))
    needed = num_prompts(kind, batch)
    if kind == "U" and needed > prepared["num_kept"]:
        raise ConfigError(f"batch_config.B_U: {needed} distinct prompts, but {where}")
    if kind == "E" and batch["E_sampling_mode"] == "distinct" and needed > prepared["num_kept"]:
        raise ConfigError(f"batch_config.E_total_sequences: distinct mode needs {needed} prompts, but {where}")


def main(cfg: dict, kind: str, prepared_path: str, out_path: str) -> None:
    batch = cfg["batch_config"]
    prepared = read_json(prepared_path)
    check_size(kind, batch, prepared)
    plan = plan_batch(kind, batch, prepared["num_kept"])
    plan["data"] = {key: prepared[key] for key in ("split", "file", "sha256")}
    write_json(out_path, plan)
    logging.getLogger("plan").info(
        "%s: %d prompts (%s, %d distinct) of %d from split %r, in %d shards", kind, len(plan["prompt_ids"]),
        plan["sampling_mode"], len(set(plan["prompt_ids"])), plan["dataset_size"], prepared["split"],
        len(plan["shards"]))


run_stage(globals(), main, [("kind", "E or U", {"choices": ["E", "U"]}),
                            ("prepared_path", "results/data/<split>.json (prepare_data)"), "out_path"],
          lambda smk: {"kind": smk.wildcards.kind, "prepared_path": smk.input.prepared, "out_path": smk.output[0]},
          stage=lambda args: f"plan_{args['kind']}")
