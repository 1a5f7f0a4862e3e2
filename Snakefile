# Entropy probe: predicts (δH₁ = η·X·v) and measures (ΔH with θ's nucleus by SNIS, and the
# sampler's own ΔH by coupled fresh rollouts) how one optimizer step changes a policy's entropy.
# README.md is the front door; docs/ explains every stage and output.
#
#   snakemake --cores 2                       the default target (all stages), config/config.yaml
#   snakemake --cores 2 rollouts              up to the rollout shards
#   snakemake --cores 2 --configfile my.yaml  another config: my.yaml on the schema's defaults
#   snakemake --report report.html            the report (its landing page: the table and the plot)
# With model.checkpoints (a trainer's run) the default target is the report over training
# (results/trajectory.*), one probe per pair of checkpoints under results/pairs/<pair>/.
from snakemake.utils import min_version

min_version("9.0")


# A user's config file means what it says: with --configfile it is read on the schema's defaults
# alone (merged into config/config.yaml, an empty mapping there could not remove the default's).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/policy.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/rollout.smk"
include: "workflow/rules/teacher_force.smk"
include: "workflow/rules/update.smk"
include: "workflow/rules/statistics.smk"
include: "workflow/rules/fresh.smk"
include: "workflow/rules/attribution.smk"
include: "workflow/rules/variants.smk"
include: "workflow/rules/checkpoint.smk"
include: "workflow/rules/report.smk"


rule rollouts:
    input:
        every_run(shard_paths(f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors", "E")),
        every_run(shard_paths(f"{RESULTS}/rollouts/U/shard_{{shard}}.safetensors", "U")),


rule all:
    default_target: True
    input:
        rules.trajectory.output if PAIR_CONFIGS else rules.summary.output,
