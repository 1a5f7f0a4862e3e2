# The update vector v (DESIGN §2 "Y and v"; or the trainer's step between two checkpoints) and the
# jackknife over U shards. Stages: entropy_probe/stages/update.py.
rule update_vector:
    input:
        unpack(update_vector_inputs),
        policy=POLICY,
    output:
        v=f"{RESULTS}/update/v.safetensors",
    log:
        f"{RESULTS}/logs/update_vector.log",
    benchmark:
        benchmark_path("update_vector")
    conda:
        "../envs/probe.yaml"
    threads: 1
    params:
        values=params_of("update_vector"),
    script:
        STAGE


rule u_jackknife:
    input:
        unpack(update_state_inputs),
        X=f"{RESULTS}/gradients/X.safetensors",
        Y=shard_paths(f"{RESULTS}/teacher_force/Y/shard_{{shard}}.safetensors", "U"),
        policy=POLICY,
    output:
        jackknife=f"{RESULTS}/estimates/u_jackknife.json",
    log:
        f"{RESULTS}/logs/u_jackknife.log",
    benchmark:
        benchmark_path("u_jackknife")
    conda:
        "../envs/probe.yaml"
    threads: 1
    params:
        values=params_of("u_jackknife"),
    script:
        STAGE
