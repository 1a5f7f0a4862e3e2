rule rollout:
    input:
        plan=rules.plan.output[0],
        policy=POLICY_DIR,
    output:
        f"{RESULTS}/rollouts/{{kind}}/shard_{{shard}}.safetensors",
    wildcard_constraints:
        kind="E|U",
        shard=r"\d+",
    params:
        cfg=sections("batch_config", "generation", "data", "reward", "model"),
    resources:
        gpu=1 if config["model"]["device"] == "cuda" else 0,
    log:
        f"{RESULTS}/logs/rollout_{{kind}}_{{shard}}.log",
    script:
        "../../scripts/rollout.py"
