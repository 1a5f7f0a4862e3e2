"""The script of every rule: runs the rule's stage (entropy_probe.stages) on the job's files.
By hand: python -m entropy_probe run STAGE --help."""
from entropy_probe.stage import run_job
from entropy_probe.stages import STAGES

run_job(snakemake, STAGES[snakemake.rule])  # noqa: F821 (the job object Snakemake gives every script)
