"""Stage: the prompt set of one split. The split is read (embedded set, local files or a hub
dataset), every prompt rendered (template, chat template) and tokenized, every gold answer
extracted, prompts longer than data.max_prompt_tokens dropped (and counted), and the result
written as results/data/<split>.jsonl; results/data/<split>.json records its size, the drops and
the file's hash. The E and the U batch each read the split they are configured with.

By hand:  python scripts/prepare_data.py CONFIG.yaml POLICY SPLIT OUT.jsonl OUT.json
"""
import argparse
import logging

from entropy_probe import data, models
from entropy_probe.shards import write_json
from entropy_probe.stage import config_for, rule_config, stage_run

log = logging.getLogger("prepare_data")


def main(data_cfg: dict, policy: str, split: str, jsonl_path: str, report_path: str) -> None:
    tokenizer = models.load_tokenizer(policy)
    rows = data.load_rows(data_cfg, split, policy)
    records, report = data.prepare_split(rows, data_cfg, tokenizer, split)
    report["file"] = jsonl_path
    report["sha256"] = data.write_prepared(jsonl_path, records)
    report["source"] = data_cfg["source"]
    write_json(report_path, report)
    log.info("split %r: %d prompts kept (%d dropped as longer than data.max_prompt_tokens)", split,
             report["num_kept"], report["num_dropped_too_long"])


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        main(rule_config(snakemake)["data"], snakemake.input.policy, snakemake.params.split,  # noqa: F821
             snakemake.output.prompts, snakemake.output.report)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("policy", help="policy directory or policy spec (results/policy.json)")
    parser.add_argument("split", help="datasets split syntax, e.g. train or test[:500]")
    parser.add_argument("out_jsonl")
    parser.add_argument("out_json")
    args = parser.parse_args()
    with stage_run():
        main(config_for(args.config, "prepare_data")["data"], args.policy, args.split, args.out_jsonl, args.out_json)
