rule e_stats:
    input:
        policy=POLICY_DIR,
        rollouts=shard_paths(f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors", "E"),
    output:
        f"{RESULTS}/estimates/e_stats.json",
    params:
        cfg=ROLLOUT_CFG,
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/e_stats.log",
    script:
        "../../scripts/e_stats.py"


rule teacher_force_x:
    input:
        rollout=f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors",
        policy=POLICY_DIR,
        stats=rules.e_stats.output[0],
    output:
        f"{RESULTS}/teacher_force/{{kind}}/shard_{{shard}}.safetensors",
    wildcard_constraints:
        kind="X",
    params:
        cfg=sections("batch_config", "generation", "model", estimator=ESTIMATOR_KEYS),
    resources:
        gpu=GPU,
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/teacher_force_{{kind}}_{{shard}}.log",
    script:
        "../../scripts/teacher_force.py"


rule teacher_force_y:
    input:
        rollout=f"{RESULTS}/rollouts/U/shard_{{shard}}.safetensors",
        policy=POLICY_DIR,
    output:
        f"{RESULTS}/teacher_force/{{kind}}/shard_{{shard}}.safetensors",
    wildcard_constraints:
        kind="Y",
    params:
        cfg=sections("batch_config", "generation", "model", estimator=["param_filter"], update=["loss_normalization"]),
    resources:
        gpu=GPU,
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/teacher_force_{{kind}}_{{shard}}.log",
    script:
        "../../scripts/teacher_force.py"


rule reduce_gradients:
    input:
        lambda wc: shard_paths(
            f"{RESULTS}/teacher_force/{wc.kind}/shard_{{shard}}.safetensors", "E" if wc.kind == "X" else "U"
        ),
    output:
        f"{RESULTS}/gradients/{{kind}}.safetensors",
    wildcard_constraints:
        kind="X|Y",
    conda:
        "../envs/probe.yaml"
    log:
        f"{RESULTS}/logs/reduce_gradients_{{kind}}.log",
    script:
        "../../scripts/reduce_gradients.py"
