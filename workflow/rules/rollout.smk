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
        cfg=ROLLOUT_CFG,
    resources:
        gpu=GPU,
    log:
        f"{RESULTS}/logs/rollout_{{kind}}_{{shard}}.log",
    script:
        "../../scripts/rollout.py"
