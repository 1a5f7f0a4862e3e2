# Entropy probe: predicts (δH₁ = η·X·v) and measures (ΔH by SNIS) how one policy-gradient step
# changes a policy's entropy. See README.md and shared DESIGN notes for the math.
#
#   snakemake --cores 2                       the default target (all stages)
#   snakemake --cores 2 rollouts              up to the rollout shards
#   snakemake --cores 2 --configfile my.yaml  another config (validated first)

configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/policy.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/rollout.smk"


rule rollouts:
    input:
        expand(f"{RESULTS}/rollouts/E/shard_{{i:03d}}.safetensors", i=range(config["batch_config"]["E_num_shards"])),
        expand(f"{RESULTS}/rollouts/U/shard_{{i:03d}}.safetensors", i=range(config["batch_config"]["U_num_shards"])),


rule all:
    default_target: True
    input:
        rules.rollouts.input,
