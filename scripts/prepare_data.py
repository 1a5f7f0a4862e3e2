"""Stage: the prompt sets of the E and U batches. Each needed split is read (embedded set, local
files or a hub dataset), every prompt rendered (template, chat template) and tokenized, every gold
answer extracted, prompts longer than data.max_prompt_tokens dropped (and counted), and the result
written as results/data/<split>.jsonl; results/data/summary.json records sizes, drops and hashes.

By hand:  python scripts/prepare_data.py CONFIG.yaml POLICY OUT_DIR
"""
import argparse
import logging
from pathlib import Path

from entropy_probe import data, models
from entropy_probe.config import load_config
from entropy_probe.shards import write_json
from entropy_probe.stage import stage_run

log = logging.getLogger("prepare_data")


def main(data_cfg: dict, policy: str, split_paths: dict[str, str], summary_path: str) -> None:
    tokenizer = models.load_tokenizer(policy)
    splits = data.kind_splits(data_cfg)
    reports = {}
    for split in sorted(set(splits.values())):
        rows = data.load_rows(data_cfg, split, policy)
        records, report = data.prepare_split(rows, data_cfg, tokenizer, split)
        report["file"] = split_paths[split]
        report["sha256"] = data.write_prepared(split_paths[split], records)
        reports[split] = report
    summary = {
        "source": data_cfg["source"], "splits": reports,
        **{kind: {"split": split, "file": reports[split]["file"], "size": reports[split]["num_kept"],
                  "sha256": reports[split]["sha256"], "num_dropped_too_long": reports[split]["num_dropped_too_long"]}
           for kind, split in splits.items()},
    }
    write_json(summary_path, summary)
    for kind in ("E", "U"):
        log.info("%s batch: split %r, %d prompts (%d dropped as longer than data.max_prompt_tokens)", kind,
                 summary[kind]["split"], summary[kind]["size"], summary[kind]["num_dropped_too_long"])


def output_paths(data_cfg: dict, out_dir: str) -> tuple[dict[str, str], str]:
    """(split -> prepared jsonl path, summary path) under ``out_dir`` (as the workflow names them)."""
    splits = sorted(set(data.kind_splits(data_cfg).values()))
    return ({s: str(Path(out_dir) / f"{data.prepared_name(s)}.jsonl") for s in splits},
            str(Path(out_dir) / "summary.json"))


if "snakemake" in globals():
    with stage_run(snakemake.log[0]):  # noqa: F821
        _paths, _ = output_paths(snakemake.params.data, str(Path(snakemake.output.summary).parent))  # noqa: F821
        main(snakemake.params.data, snakemake.input.policy, _paths, snakemake.output.summary)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("policy", help="policy directory or policy spec (results/policy.json)")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    with stage_run():
        cfg = load_config(args.config)["data"]
        main(cfg, args.policy, *output_paths(cfg, args.out_dir))
