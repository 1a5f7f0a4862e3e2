"""``python -m entropy_probe``: the probe's command line.

    python -m entropy_probe stages                          the stages, one per workflow rule
    python -m entropy_probe run STAGE --config FILE ...     run one stage by hand (--help lists its files)
    python -m entropy_probe inspect SHARD [--policy DIR]    a readable summary of any shard
    python -m entropy_probe check-checkpoints CHECKPOINT... whether trainer optimizer states fit their models
    python -m entropy_probe config-docs                     config/README.md, from the schema
"""
from __future__ import annotations

import argparse
import inspect
import logging
import sys

from . import config_schema, models
from .shard_report import summarize_shard
from .stage import run_cli, stage_run
from .stages import STAGES
from .trainer_checkpoint import check_state_fits


def _stages() -> None:
    for name, stage in STAGES.items():
        summary = (inspect.getdoc(stage.run) or "").split("\n\n")[0].replace("\n", " ")
        print(f"{name:<24} {summary[:100]}")


def _parse(command: str, description: str, argv: list[str], *arguments: tuple[tuple[str, ...], dict]):
    parser = argparse.ArgumentParser(prog=f"python -m entropy_probe {command}", description=description)
    for flags, options in arguments:
        parser.add_argument(*flags, **options)
    return parser.parse_args(argv)


def _inspect(argv: list[str]) -> None:
    args = _parse("inspect", "A readable summary of one shard: metadata, tensor shapes, a few decoded responses with "
                  "their rewards, EOS stops, entropy and log q statistics.", argv,
                  (("shard",), dict(help="a .safetensors shard written by the workflow")),
                  (("--policy",), dict(help="policy directory or spec whose tokenizer decodes the tokens (else raw ids)")),
                  (("-n",), dict(type=int, default=4, help="number of responses to show (default 4)")))
    with stage_run():
        tokenizer = models.load_tokenizer(args.policy) if args.policy else None
        print(summarize_shard(args.shard, tokenizer, args.n), end="")


def _check_checkpoints(argv: list[str]) -> None:
    args = _parse("check-checkpoints", "Whether each trainer checkpoint's optimizer.pt is an AdamW state that fits its "
                  "model (the workflow's check before any job runs); one ERROR line and exit status 1 at the first "
                  "that does not.", argv,
                  (("--trainable",), dict(default="auto")),
                  (("--base",), dict(default=None, help="the base model of adapter checkpoints (model.name_or_path)")),
                  (("--trust-remote-code",), dict(action="store_true")),
                  (("checkpoints",), dict(nargs="+")))
    with stage_run():
        logging.getLogger().setLevel(logging.WARNING)  # one line: the error, if any
        for checkpoint in args.checkpoints:
            check_state_fits(checkpoint, args.trainable, args.base, args.trust_remote_code)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command == "run":
        if not rest or rest[0].startswith("-"):
            raise SystemExit(f"usage: python -m entropy_probe run STAGE [options]; stages: {', '.join(STAGES)}")
        if rest[0] not in STAGES:
            raise SystemExit(f"unknown stage {rest[0]!r}; stages: {', '.join(STAGES)}")
        run_cli(rest[0], STAGES[rest[0]], rest[1:])
    elif command == "stages":
        _stages()
    elif command == "inspect":
        _inspect(rest)
    elif command == "check-checkpoints":
        _check_checkpoints(rest)
    elif command == "config-docs":
        print(config_schema.keys_table(), end="")
    else:
        print(__doc__)
        raise SystemExit(0 if command in ("-h", "--help") else 2)
