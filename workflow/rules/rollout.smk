# G responses per prompt from the sampling measure q, one job per shard of each batch.
# Stage: entropy_probe/stages/rollout.py.
rule rollout:
    input:
        # in a trajectory: the E shard at the checkpoint before, redrawn by verification
        unpack(previous_rollout),
        plan=f"{RESULTS}/plan/{{kind}}.json",
        policy=POLICY,
    output:
        rollouts=f"{RESULTS}/rollouts/{{kind}}/shard_{{shard}}.safetensors",
    log:
        f"{RESULTS}/logs/rollout_{{kind}}_{{shard}}.log",
    benchmark:
        benchmark_path("rollout_{kind}_{shard}")
    wildcard_constraints:
        kind="E|U",
        shard=r"\d+",
    conda:
        "../envs/probe.yaml"
    threads: MODEL_THREADS
    resources:
        gpu=GPU,
    params:
        values=params_of("rollout"),
    script:
        STAGE
