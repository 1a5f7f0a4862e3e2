"""Stage: the prompt set of one split. The split is read (embedded set, local files or a hub
dataset), every prompt rendered (template, chat template) and tokenized, every gold answer
extracted, prompts longer than data.max_prompt_tokens dropped (and counted), and the result
written as results/data/<split>.jsonl; results/data/<split>.json records its size, the drops and
the file's hash. The E and the U batch each read the split they are configured with.

By hand:  python scripts/prepare_data.py CONFIG.yaml POLICY SPLIT OUT.jsonl OUT.json
"""
import logging

from entropy_probe import data, models
from entropy_probe.shards import write_json
from entropy_probe.stage import run_stage

log = logging.getLogger("prepare_data")


def main(cfg: dict, policy: str, split: str, jsonl_path: str, report_path: str) -> None:
    data_cfg = cfg["data"]
    tokenizer = models.load_tokenizer(policy)
    rows = data.load_rows(data_cfg, split, policy)
    records, report = data.prepare_split(rows, data_cfg, tokenizer, split)
    report["file"] = jsonl_path
    report["sha256"] = data.write_prepared(jsonl_path, records)
    report["source"] = data_cfg["source"]
    write_json(report_path, report)
    log.info("split %r: %d prompts kept (%d dropped as longer than data.max_prompt_tokens)", split,
             report["num_kept"], report["num_dropped_too_long"])


run_stage(globals(), main, [("policy", "policy directory or policy spec (results/policy.json)"),
                            ("split", "datasets split syntax, e.g. train or test[:500]"), "jsonl_path", "report_path"],
          lambda smk: {"policy": smk.input.policy, "split": smk.params.split, "jsonl_path": smk.output.prompts,
                       "report_path": smk.output.report}, stage="prepare_data")
